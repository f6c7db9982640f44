"""The path-level half of ``boneage.inference.sources``: what a file is from its name and first bytes, what a
DICOMDIR lists, and how the inputs of one run relate (``plan_inputs``). ``sources`` re-exports ``sniff_kind``,
``is_dicom_file``, ``is_dicomdir`` and ``is_hidden``.

Nothing here decodes an image: ``boneage.io.read_image`` does, and reports what is wrong with a file.
"""

from __future__ import annotations

import glob
import itertools
import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterator, Sequence

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
SYSTEM_NAMES = ("thumbs.db", "desktop.ini")  # compared in lower case
DICOM_SUFFIXES = (".dcm", ".dicom")
SNIFF_BYTES = 132


def is_hidden(name: str) -> bool:
    """Names starting with '.' (macOS ``._x.png``, ``.DS_Store``), ``Thumbs.db`` and ``desktop.ini``."""
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def kind_of(head: bytes) -> str | None:
    """'png', 'jpeg' or 'dicom' from a file's first ``SNIFF_BYTES`` bytes, None for anything else."""
    if head.startswith(b"\x89PNG"):
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[128:132] == b"DICM":
        return "dicom"
    return None


def sniff_kind(path: str | Path) -> str | None:
    """``kind_of`` the first 132 bytes of ``path`` (one read); raises OSError for an unreadable file."""
    with open(path, "rb") as fh:
        return kind_of(fh.read(SNIFF_BYTES))


def is_dicom_file(path: str | Path) -> bool:
    """'DICM' at byte 128 whatever the name (``IM0001``, ``x.IMA``, ``x.DCM``, ``1.2.840.113619.2.55.3.604688119.1``);
    also any ``.dcm``/``.dicom`` file, with or without the preamble (``read_image`` lets pydicom try those)."""
    if Path(path).suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        return sniff_kind(path) == "dicom"
    except OSError:
        return False


def is_dicomdir(path: str | Path) -> bool:
    """A file named DICOMDIR (any case), or a DICOM file whose SOP class is Media Storage Directory Storage."""
    path = Path(path)
    if path.name.upper() == "DICOMDIR":
        return True
    if not path.is_file() or not is_dicom_file(path):
        return False
    try:
        import pydicom

        from boneage.image_files import quiet_pydicom

        with quiet_pydicom():
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True, specific_tags=["SOPClassUID"])
            return str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS
    except Exception:  # anything unreadable is not a DICOMDIR; read_image reports it
        return False


def dicomdir_files(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(record type, ReferencedFileID parts) of each record of a DICOMDIR that refers to a file.

    Raises whatever pydicom raises on a damaged file. Held in memory: the DICOMDIR is, too.
    """
    import pydicom

    from boneage.image_files import quiet_pydicom

    with quiet_pydicom():  # a lock: released before the caller yields anything
        ds = pydicom.dcmread(str(path), force=True)
        if "DirectoryRecordSequence" not in ds:
            raise ValueError("no DirectoryRecordSequence: not a DICOMDIR")
        files = []
        for record in ds.DirectoryRecordSequence:
            ref = record.get("ReferencedFileID", None)
            if ref:
                parts = (str(ref),) if isinstance(ref, str) else tuple(str(p) for p in ref)
                files.append((str(record.get("DirectoryRecordType", "")).strip().upper(), parts))
    return files


def existing_file(folder: Path, parts: tuple[str, ...]) -> Path | None:
    """The file ``parts`` names under ``folder``: as written, else in lower case (CDs mounted with lower-case
    names); None if neither is a file."""
    for candidate in (parts, tuple(p.lower() for p in parts)):
        path = folder.joinpath(*candidate)
        if path.is_file():
            return path
    return None


def key_prefix(given: str) -> str:
    """An input as a key prefix: ``os.path.normpath`` written with '/'; '' for the current folder."""
    prefix = PurePath(os.path.normpath(given)).as_posix()
    return "" if prefix == "." else prefix


def glob_start(pattern: str) -> tuple[str, tuple[str, ...]]:
    """The folder before a glob's first wildcard ('.' if none) and the pattern's parts from there."""
    parts = PurePath(pattern).parts
    fixed = list(itertools.takewhile(lambda p: not glob.has_magic(p), parts[:-1]))
    return (str(PurePath(*fixed)) if fixed else "."), parts[len(fixed):]


def _ancestors(path: str) -> Iterator[str]:
    """``path`` and every folder above it."""
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


@dataclass
class InputPlan:
    """One input of ``open_sources``, before anything is listed."""

    given: str
    kind: str  # folder | glob | file (a DICOMDIR given by name is a file until it is opened)
    real: str  # the real path of the folder, of the glob's start, or of the file
    label: str = ""  # the key prefix with several inputs (a file's whole key), '' with one
    same_as: str | None = None  # an earlier input naming the same folder, glob or file: skip this one
    overlaps: bool = False  # another input can reach the same files: remember what this one gives


def plan_inputs(inputs: Sequence[str | Path]) -> list[InputPlan]:
    """Kinds, key prefixes, repeated inputs and overlapping inputs (a folder and something inside it).

    Costs one stat and one realpath per input, so thousands of files from a shell glob are fine.
    """
    plans = []
    for given in map(str, inputs):
        kind = "glob" if glob.has_magic(given) else "folder" if os.path.isdir(given) else "file"
        plans.append(InputPlan(given, kind, os.path.realpath(glob_start(given)[0] if kind == "glob" else given)))
    if len(plans) < 2:
        return plans
    first: dict[tuple[str, str], InputPlan] = {}
    roots: dict[str, list[InputPlan]] = {}  # real folders whose files an input reads, at any depth
    bases = [os.path.abspath(glob_start(p.given)[0] if p.kind == "glob" else p.given) for p in plans]
    common = os.path.commonpath(bases)
    for plan, base in zip(plans, bases):
        start, rest = glob_start(plan.given)
        plan.label = key_prefix(os.path.relpath(base, common))  # never an absolute path: keys go into tables
        earlier = first.setdefault((plan.kind, plan.real + ("|" + "/".join(rest) if plan.kind == "glob" else "")), plan)
        if earlier is not plan:
            plan.same_as = earlier.given
        elif plan.kind != "file" or os.path.basename(plan.real).upper() == "DICOMDIR":
            roots.setdefault(plan.real if plan.kind != "file" else os.path.dirname(plan.real), []).append(plan)
    for plan in plans:
        if plan.same_as is None:
            for other in (o for a in _ancestors(plan.real) for o in roots.get(a, ()) if o is not plan):
                plan.overlaps = other.overlaps = True
    return plans
