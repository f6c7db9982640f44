"""The DICOM node's spool: every instance on disk from the moment it is acknowledged until the PACS has its results.

Layout under the spool folder (``boneage dicom-node --spool DIR``)::

    incoming/<pseudonym>.dcm        received, acknowledged, not yet scored
    outgoing/<pseudonym>/*.dcm      the results of one input (SR and Secondary Capture), not yet sent
    dead-letter/<pseudonym>/*.dcm   results the destination did not take after every retry
    refused/<pseudonym>.dcm + .json inputs that were not scored, and why (the pseudonym is the only identifier)
    tmp/                            partial writes (deleted at start)

Every write is atomic (a temp file or folder in ``tmp/``, fsync'd, then renamed), so a crash at any point leaves an
instance in exactly one place, whole. File names are keyed pseudonyms (``boneage.privacy``) of the SOP Instance
UID, never the UID itself. Plain files and folders: nothing here needs pydicom or pynetdicom.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

FOLDERS = ("incoming", "outgoing", "dead-letter", "refused", "tmp")
_NAME = re.compile(r"^[0-9a-z][0-9a-z.-]{0,80}$")  # pseudonyms, group names and result file names
_UID = re.compile(r"(?<![\w.])[0-2](?:\.[0-9]+){3,}(?![\w.])")


def redact(text: str) -> str:
    """``text`` with anything shaped like a DICOM UID (dotted digits, 4+ parts) replaced by ``<uid>``: for error
    messages that came from a decoder, which may quote one."""
    return _UID.sub("<uid>", text)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"not a spool name: {name!r}")
    return name


@dataclass(frozen=True)
class Spool:
    """The spool folder (module doc); ``Spool(root).open()`` creates its folders and clears partial writes."""

    root: Path

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def outgoing(self) -> Path:
        return self.root / "outgoing"

    @property
    def dead_letter(self) -> Path:
        return self.root / "dead-letter"

    @property
    def refused(self) -> Path:
        return self.root / "refused"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def open(self) -> Spool:
        """Create the folders (owner-only: they hold patient data) and delete what an earlier run left in tmp/."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in FOLDERS:
            (self.root / name).mkdir(exist_ok=True, mode=0o700)
        for leftover in self.tmp.iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        return self

    def _write_tmp(self, data: bytes, folder: Path | None = None) -> Path:
        fd, tmp = tempfile.mkstemp(dir=folder or self.tmp, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def receive(self, name: str, data: bytes) -> Path:
        """Write one received instance to ``incoming/<name>.dcm`` atomically and durably; return its path."""
        target = self.incoming / f"{_check_name(name)}.dcm"
        os.replace(self._write_tmp(data), target)
        _fsync_dir(self.incoming)
        return target

    def pending(self) -> list[Path]:
        """The instances in incoming/, oldest first (what an earlier run acknowledged but did not score)."""
        files = [p for p in self.incoming.glob("*.dcm") if _NAME.match(p.stem)]
        return sorted(files, key=lambda p: (_mtime(p), p.name))

    def write_results(self, name: str, blobs: Sequence[bytes]) -> Path:
        """The encoded results of one input as the group ``outgoing/<name>/`` (``1.dcm``, ``2.dcm``... in sending
        order), appearing whole; a second group of the same name (the same instance received again) gets
        ``<name>.2``, ``<name>.3``..."""
        folder = Path(tempfile.mkdtemp(dir=self.tmp, suffix=".partial"))
        try:
            for i, blob in enumerate(blobs, 1):
                os.replace(self._write_tmp(blob, folder), folder / f"{i}.dcm")
            _fsync_dir(folder)
            target = self._free(self.outgoing, _check_name(name))
            os.replace(folder, target)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        _fsync_dir(self.outgoing)
        return target

    @staticmethod
    def _free(parent: Path, name: str) -> Path:
        target, n = parent / name, 1
        while target.exists():
            n += 1
            target = parent / f"{name}.{n}"
        return target

    def groups(self) -> list[Path]:
        """The result groups waiting in outgoing/, oldest first."""
        found = [p for p in self.outgoing.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(found, key=lambda p: (_mtime(p), p.name))

    def to_dead_letter(self, group: Path) -> Path:
        """Move a group the destination would not take to dead-letter/."""
        target = self._free(self.dead_letter, group.name)
        os.replace(group, target)
        _fsync_dir(self.dead_letter)
        return target

    def revive(self) -> int:
        """Move every dead-letter group back to outgoing/ (done at start: a restart retries them); the count."""
        count = 0
        for group in sorted(self.dead_letter.iterdir()):
            if group.is_dir() and _NAME.match(group.name):
                os.replace(group, self._free(self.outgoing, group.name))
                count += 1
        _fsync_dir(self.outgoing)
        return count

    def refuse(self, path: Path, why: Mapping[str, Any]) -> Path:
        """Move an input that was not scored to refused/, with ``why`` as ``<name>.json`` beside it."""
        name = path.stem
        body = json.dumps({**why, "refused_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1)
        os.replace(self._write_tmp(body.encode()), self.refused / f"{name}.json")
        if path.exists():
            os.replace(path, self.refused / f"{name}.dcm")
        _fsync_dir(self.refused)
        return self.refused / f"{name}.json"

    def counts(self) -> dict[str, int]:
        """How many inputs or groups each folder holds (for logs and tests)."""
        return {"incoming": len(self.pending()), "outgoing": len(self.groups()),
                "dead-letter": sum(1 for p in self.dead_letter.iterdir() if p.is_dir()),
                "refused": sum(1 for _ in self.refused.glob("*.json"))}


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def group_files(group: Path) -> Iterator[Path]:
    """The files of a result group in sending order."""
    files = [p for p in group.glob("*.dcm") if p.stem.isdigit()]
    yield from sorted(files, key=lambda p: int(p.stem))
