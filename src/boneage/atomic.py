"""One way to write a file: to a temp file in the same folder, then rename (``atomic_write``).

A reader never sees a half-written checkpoint, report, model or metrics file, and an error while
writing leaves the old file in place. A process killed mid-write (``kill -9``) leaves only a
``.<name>.<random>.partial`` file; ``remove_partial_files(folder)`` deletes those and is called when
a command starts writing into a folder it owns (a run folder, a report folder, the cache).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

PARTIAL_SUFFIX = ".partial"


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, fsync: bool = False,
                 encoding: str | None = None) -> Iterator[IO]:
    """``with atomic_write(p, "w") as fh: fh.write(...)``: ``p`` appears whole when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding, newline="" if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """For writers that need a file name (ONNX): yields a temp path that is renamed to ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return Path(path)


def remove_partial_files(folder: str | Path) -> list[Path]:
    """Delete the temp files that killed writes left in ``folder`` (not recursive); returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(f".*{PARTIAL_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def writable_dir(path: str | Path, flag: str) -> Path:
    """Create the output folder ``path`` and prove it is writable (before any model loads), then remove the temp
    files of writes killed in an earlier run; ``BoneAgeError`` naming ``flag`` and the reason otherwise."""
    from boneage.errors import BoneAgeError

    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".boneage-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise BoneAgeError(f"{flag} {path}: cannot write there ({exc.strerror or exc}); give a folder you can "
                           "write to") from exc
    remove_partial_files(folder)
    return folder


def truncate_torn_line(path: str | Path, block: int = 1 << 16) -> int:
    """Cut ``path`` after its last newline if it does not end with one (an append killed midway): the bytes cut,
    0 if none. Reads backwards a block at a time, so a large table is never read whole."""
    with Path(path).open("r+b") as fh:
        size = end = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        keep = 0
        while end > 0:
            start = max(0, end - block)
            fh.seek(start)
            cut = fh.read(end - start).rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return size - keep


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
