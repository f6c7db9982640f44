"""What one ``boneage predict`` run counts and shows: rows by status and reason, the first rows for the console, and
progress: a tqdm bar with the rate (and the ETA once a background listing has counted the inputs) for a person at a
terminal, else a progress line every ``PROGRESS_EVERY_S`` (logs, ``nohup``, platform jobs, Ray)."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any, Sequence

from boneage.inference.sources import open_sources

log = logging.getLogger("boneage.predict")
TABLE_ROWS = 20  # the console table shows at most this many rows; the rest are in the table file
PROGRESS_EVERY_S = 30.0


class Run:
    """What one ``predict`` run counts and shows: rows by status and reason, the console rows, progress."""

    def __init__(self, label: str, paths: Sequence[str] = (), recursive: bool = False) -> None:
        self.counts: Counter[str] = Counter()
        self.reasons: Counter[tuple[str, str]] = Counter()
        self.shown: list[dict[str, Any]] = []
        self.more = 0
        self.start = self.last = time.monotonic()
        self.bar = _progress(label)
        if self.bar is not None and paths:  # the total, for the ETA: a second listing, in the background
            threading.Thread(target=self._count, args=(list(paths), recursive), daemon=True).start()

    def _count(self, paths: list[str], recursive: bool) -> None:
        total = sum(1 for _ in open_sources(paths, recursive=recursive))
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def add(self, record: dict[str, Any]) -> None:
        status = record.get("status") or ("failed" if record.get("error") else "ok")
        self.counts[status] += 1
        if status != "ok":
            self.reasons[(status, record.get("reason") or "other")] += 1
        if status in ("failed", "refused"):
            log.warning("error: %s", record["error"])
        elif status == "skipped":
            log.debug("skipped %s: %s", record["file"], record["error"])
        if status != "skipped":
            if len(self.shown) < TABLE_ROWS:
                self.shown.append(record)
            else:
                self.more += 1
        if self.bar is not None:
            self.bar.update(1)
        elif time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.last = time.monotonic()
            done = sum(self.counts.values())
            log.info("progress: %d rows (%s), %.1f files/s", done, self.summary(), done / (self.last - self.start))

    def resumed(self) -> None:
        """An input already in the table: counted, not scored again."""
        self.counts["resumed"] += 1
        if self.bar is not None:
            self.bar.update(1)

    def summary(self) -> str:
        parts = []
        for status in ("ok", "failed", "refused", "skipped", "resumed"):
            n = self.counts[status]
            if not n:
                continue
            why = sorted(((r, c) for (s, r), c in self.reasons.items() if s == status), key=lambda x: -x[1])
            parts.append(f"{n} {status}" + (f" ({', '.join(f'{r}: {c}' for r, c in why)})" if why else ""))
        return "; ".join(parts) or "nothing"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(label: str) -> Any:
    """A tqdm bar (count and rate; the ETA once a background listing has counted the inputs) on stderr for a person
    at a terminal; None elsewhere (logs, CI, pipes, platform jobs: a progress line every ``PROGRESS_EVERY_S``)."""
    import sys

    if not sys.stderr.isatty() or not log.isEnabledFor(logging.INFO):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(unit="file", file=sys.stderr, desc=label)
