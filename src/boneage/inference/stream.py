"""Batched, parallel prediction over many files: ``boneage predict --batch-size N --workers W``.

Files are read and prepared (``read_image`` -> ``analysis.prepare``: the quality gate and the one preprocessing
path) in ``W`` worker processes (0: in this process), with at most ``PREFETCH_BATCHES`` batches in flight, so a
folder of 10,000 files never sits in memory. The models run on batches of ``N`` (``analysis.run_models``: the
ensemble, TTA views and the out-of-distribution gate, batched), then each file is finished and its reports are
written as its batch completes (``analysis.finish``, the same code as one file). A file that cannot be read or
prepared becomes that file's error record; the rest go on. ``prepared_stream`` yields in input order.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Sequence

from boneage.errors import BoneAgeError, about_file
from boneage.inference.analysis import Pending, prepare
from boneage.io import read_image

PREFETCH_BATCHES = 2


def _load(args: tuple[Path, Sequence[Any], str | None, float | None, bool | None, bool, bool]) -> Pending | str:
    """Worker: one file -> a ``Pending`` or its error message."""
    path, configs, sex, age, right_hand, keep_identifiers, keep_image = args
    try:
        image, meta = read_image(path, right_hand=right_hand, keep_identifiers=keep_identifiers)
        return prepare(configs, image, meta, sex=sex, chronological_age=age, keep_image=keep_image)
    except BoneAgeError as exc:
        return about_file(path, exc)
    except Exception as exc:  # noqa: BLE001 - one file must not end the batch
        return f"{path}: unexpected error ({type(exc).__name__}: {exc})"


def prepared_stream(paths: Sequence[Path], configs: Sequence[Any], *, sex: str | None, age: float | None,
                    right_hand: bool | None, keep_identifiers: bool, keep_image: bool, workers: int,
                    batch_size: int) -> Iterator[list[tuple[Path, Pending | str]]]:
    """Batches of (path, prepared image or error message), in input order."""
    jobs = [(p, list(configs), sex, age, right_hand, keep_identifiers, keep_image) for p in paths]
    if workers <= 0:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            yield [(job[0], _load(job)) for job in chunk]
        return
    with mp.get_context("spawn").Pool(workers) as pool:
        pending: deque[tuple[Path, Any]] = deque()
        queued = iter(jobs)
        limit = PREFETCH_BATCHES * batch_size
        batch: list[tuple[Path, Pending | str]] = []
        while True:
            while len(pending) < limit:
                job = next(queued, None)
                if job is None:
                    break
                pending.append((job[0], pool.apply_async(_load, (job,))))
            if not pending:
                break
            path, result = pending.popleft()
            batch.append((path, result.get()))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
