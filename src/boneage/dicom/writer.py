"""``boneage predict ... --dicom-out DIR``: an SR and a Secondary Capture (``boneage.dicom.sr``) for every analysed
DICOM input, written beside the other reports.

Files: ``DIR/<2 hex>/SR_<16 hex>.dcm`` and ``SC_<16 hex>.dcm``, the shard and name being those of the input's
reports (HMAC-SHA-256 of the input's key under the site's pseudonym key, ``boneage.report.writers.report_stem``):
no UID, no identifier, no file name in them. Each file is written whole, then renamed (``boneage.atomic``). Inputs
that are not DICOM files, and records that were not analysed, get nothing; one file's failure is a warning naming
the input's public key and the error's type, never its message (which could quote the header), and the batch goes
on.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import logging
from pathlib import Path
from typing import Any, Sequence

from boneage.errors import BoneAgeError

log = logging.getLogger("boneage.dicom")
PACS_MISSING = "--dicom-out needs highdicom and pydicom: pip install 'boneage[pacs]'"
NAME_HEX = 16  # as report_stem's names of inputs without a name hint


def check_dicom_out(out: str | Path) -> Path:
    """Before any model loads: the packages are there, and ``out`` exists (created) and is writable;
    ``BoneAgeError`` naming what to do otherwise."""
    from boneage.atomic import writable_dir

    if any(importlib.util.find_spec(name) is None for name in ("highdicom", "pydicom")):
        raise BoneAgeError(PACS_MISSING)
    return writable_dir(out, "--dicom-out")


class DicomWriter:
    """Writes the SR and the SC of each analysed DICOM input into ``out_dir`` and counts what it did.

    ``model`` says which model wrote the results; without it, it is made once, at the first result, from
    ``checkpoints`` (hashed then) and the record's model fields. ``key``: the site's pseudonym key (file names)."""

    def __init__(self, out_dir: str | Path, *, model: Any | None = None, checkpoints: Sequence[str | Path] = (),
                 key: bytes = b"") -> None:
        self.out_dir, self.key = Path(out_dir), key
        self.checkpoints = list(checkpoints)
        self._model = model
        self.written = self.not_dicom = self.failed = 0

    def model(self, record: dict[str, Any]) -> Any:
        """The ``ModelInfo`` of the run (checkpoint files hashed once)."""
        if self._model is None:
            from boneage.dicom.sr import ModelInfo

            self._model = ModelInfo.from_files(self.checkpoints, architectures=record.get("architectures") or (),
                                               mae_months=record.get("model_mae_months"))
        return self._model

    def stem(self, key: str) -> tuple[Path, str]:
        """(shard folder, name) of the input ``key``: the shard and 16-hex name of its reports."""
        digest = hmac.new(self.key, key.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
        return self.out_dir / digest[:2], digest[2:2 + NAME_HEX]

    def write(self, item: Any, record: dict[str, Any], analysis: Any) -> list[Path]:
        """The SR and SC of one input (a ``SourceItem``): their paths, or [] when there is nothing to write."""
        if record.get("status") != "ok":
            return []
        if (record.get("image") or {}).get("format") != "dicom" or item.path is None:
            self.not_dicom += 1
            return []
        try:
            import pydicom

            from boneage.dicom.sr import result_objects

            source = pydicom.dcmread(item.path, stop_before_pixels=True)
            objects = result_objects(record, source, analysis, model=self.model(record))
            shard, name = self.stem(item.key)
            paths = [self._save(ds, shard / f"{kind}_{name}.dcm") for kind, ds in zip(("SR", "SC"), objects)]
        except Exception as exc:  # noqa: BLE001 - one input's outputs must not end the batch
            self.failed += 1
            log.warning("%s: no DICOM outputs (%s)", record.get("file"), type(exc).__name__)
            return []
        self.written += 1
        return paths

    @staticmethod
    def _save(ds: Any, path: Path) -> Path:
        from boneage.atomic import atomic_path

        with atomic_path(path) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        return path

    def summary(self) -> str:
        """The closing line's part: ``DICOM outputs: 3 in DIR (2 inputs were not DICOM)``."""
        notes = [f"{self.not_dicom} input{'s were' if self.not_dicom != 1 else ' was'} not DICOM"
                 if self.not_dicom else "", f"{self.failed} failed" if self.failed else ""]
        notes = [n for n in notes if n]
        return f"DICOM outputs: {self.written} in {self.out_dir}" + (f" ({'; '.join(notes)})" if notes else "")


def open_dicom_writer(out: str | Path | None, checkpoints: Sequence[str | Path], key: bytes) -> DicomWriter | None:
    """``predict``'s writer for ``--dicom-out`` (None without it), the folder checked first (``check_dicom_out``)."""
    if out is None:
        return None
    return DicomWriter(check_dicom_out(out), checkpoints=checkpoints, key=key)
