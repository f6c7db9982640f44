"""The local engine: inputs prepared in worker processes while the model runs on the previous batch.

``prepared_batches`` reads and prepares inputs (``pipeline.prepare_item``: decode, header check, quality gate, the
one preprocessing path) in ``workers`` processes (0: in this process), in chunks, with at most
``PREFETCH_BATCHES`` batches in flight, so an archive of a million files never sits in memory and the decoding
overlaps the model. ``analysed_batches`` runs each batch through ``Pipeline.analyse``. Both keep the input order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

from boneage.inference.pipeline import AnalysisOptions, Pipeline, prepare_item
from boneage.inference.sources import SourceItem

PREFETCH_BATCHES = 2
Prepared = list[tuple[SourceItem, Any]]  # (input, analysis.Pending or pipeline.Failure)


def _prepare_chunk(args: tuple[list[SourceItem], Sequence[Any], AnalysisOptions]) -> Prepared:
    """Worker: a few inputs -> their prepared images or failure records."""
    items, configs, options = args
    return [(item, prepare_item(item, configs, options)) for item in items]


def _init_worker() -> None:
    """One thread per worker process for OpenCV and BLAS: the processes are the parallelism."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2

    cv2.setNumThreads(1)


def prepared_batches(items: Iterable[SourceItem], configs: Sequence[Any], options: AnalysisOptions, *,
                     workers: int, batch_size: int) -> Iterator[Prepared]:
    """Batches of (input, prepared image or failure), in input order."""
    source = iter(items)
    if workers <= 0:
        while todo := list(islice(source, batch_size)):
            yield _prepare_chunk((todo, configs, options))
        return
    chunk = max(1, min(8, batch_size // (2 * workers)))
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
        in_flight: deque[Any] = deque()
        limit = max(2, PREFETCH_BATCHES * batch_size // chunk)
        batch: Prepared = []
        while True:
            while len(in_flight) < limit:
                part = list(islice(source, chunk))
                if not part:
                    break
                in_flight.append(pool.apply_async(_prepare_chunk, ((part, list(configs), options),)))
            if not in_flight:
                break
            batch.extend(in_flight.popleft().get())
            while len(batch) >= batch_size:
                yield batch[:batch_size]
                batch = batch[batch_size:]
        if batch:
            yield batch


def analysed_batches(pipeline: Pipeline, items: Iterable[SourceItem], *, workers: int, batch_size: int
                     ) -> Iterator[list[tuple[SourceItem, dict[str, Any], Any]]]:
    """The local engine: (input, record, analysis or None) per input, a batch at a time."""
    for prepared in prepared_batches(items, pipeline.configs, pipeline.options, workers=workers,
                                     batch_size=batch_size):
        yield list(pipeline.analyse(prepared))
