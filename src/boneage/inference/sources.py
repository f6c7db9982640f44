"""Archive discovery for ``boneage predict``: what to analyse, streamed from files, folders, globs and DICOMDIRs.

``open_sources(inputs, recursive)`` yields a ``SourceItem`` for each file to analyse and a ``Skipped`` for each
file or folder left out: its ``reason`` is one of the ``SKIP_*`` categories (for counting), its ``detail`` one
sentence for the user. Nothing is collected into a list, so an archive of a million files streams.

Folders
    A file is analysed if its first bytes say PNG, JPEG or DICOM ('DICM' at byte 128, whatever its name:
    ``IM0001``, ``x.IMA``, ``1.2.840.113619.2.55.3.604688119.1``). A file named like an image (``IMAGE_SUFFIXES``)
    is analysed whatever its content, so a broken export is reported by ``read_image`` instead of skipped.
    Hidden and system files, other files, subfolders (without ``recursive``), unreadable files, repeated
    folders and symlink loops are skipped. Symlinked folders are followed, each real folder read once; a
    symlinked file whose target the walk reaches itself is skipped as a duplicate (hard links are not).
Order
    A folder of at most ``SORT_LIMIT`` entries is read sorted by name, so small runs are deterministic. A larger
    one is read in the file system's order and listed twice (files, then subfolders), so that no more than
    ``SORT_LIMIT`` entries of a folder are ever held. Files come before subfolders, depth first. Glob matches
    follow the same rule.
DICOM CDs
    Without ``recursive``, a ``DICOMDIR`` at the top of a folder is read: the images it lists (in subfolders
    such as ``DICOM/PAT0/STU0/SER0/IM0``) are analysed, then the DICOMDIR is skipped (``SKIP_DICOMDIR``). With
    ``recursive`` the walk finds the images itself and the DICOMDIR is skipped. In a walk, a DICOMDIR is known by
    its name (the standard requires it); a file given by name is also recognised by its SOP class.
Keys
    With one input, a key is the posix path relative to its root: the folder, the non-glob start of a glob
    (``scans/**/*.dcm`` -> ``sub/x.dcm``), a DICOMDIR's folder, or a file's name. With several inputs each key
    starts with its input's path relative to the inputs' common folder, written with ``/`` (``scans`` and
    ``/data/more`` given from ``/data`` -> ``scans/5.png`` and ``more/5.png``): never an absolute path. The
    same file or folder given twice is skipped the second time (``SKIP_DUPLICATE``), and so is a file that
    overlapping inputs (``scans`` and ``scans/5.png``) reach again.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import itertools
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Iterable, Iterator, Sequence, TypeVar

from boneage.inference.source_paths import (  # noqa: F401 (sniff_kind, is_dicom_file: re-exported)
    InputPlan, dicomdir_files, existing_file, glob_start, is_dicom_file, is_dicomdir, is_hidden, key_prefix,
    plan_inputs, sniff_kind)
from boneage.image_files import IMAGE_SUFFIXES

SORT_LIMIT = 10_000  # entries of one folder read sorted; beyond, the file system's order (see the module doc)
SKIP_HIDDEN = "hidden or system file"
SKIP_DICOMDIR = "DICOMDIR"
SKIP_NOT_IMAGE = "not an image"
SKIP_LOOP = "symlink loop"
SKIP_UNREADABLE = "unreadable file"
SKIP_SUBFOLDER = "subfolder (use --recursive)"
SKIP_DUPLICATE = "given twice"


@dataclass(frozen=True)
class SourceItem:
    """One file (or upload) to analyse."""

    key: str  # posix path relative to the input root (e.g. "a/b/IM0001.IMA"); unique within a run
    path: Path | None  # the file to read (None when ``data`` is given, e.g. an upload)
    data: bytes | None = None
    size: int = -1  # st_size (bytes) or len(data)
    mtime_ns: int = -1  # st_mtime_ns, -1 for uploads
    root: str = ""  # the input root as given (folder, or the file's parent for file arguments)


@dataclass(frozen=True)
class Skipped:
    """A file or folder (key ending in '/') left out, and why."""

    key: str
    reason: str  # one of the SKIP_* categories: short, for counting
    detail: str  # one sentence for the user


Found = SourceItem | Skipped
_Entry = tuple[str, bool, bool]  # name, is a folder, is a link
_T = TypeVar("_T", str, _Entry)


def _sorted_if_small(entries: Iterable[_T], limit: int) -> tuple[list[_T], bool]:
    """All of ``entries`` sorted if there are at most ``limit``; else ([], False) and the caller streams them."""
    batch = list(itertools.islice(entries, limit + 1))
    return (sorted(batch), True) if len(batch) <= limit else ([], False)


def _file(key: str, path: str, root: str) -> Found:
    """Classify one file a walk or a glob found (files given by name are always analysed)."""
    name = key.rsplit("/", 1)[-1]
    if is_hidden(name):
        return Skipped(key, SKIP_HIDDEN, f"{key}: a hidden or system file (macOS ._ copy, .DS_Store, Thumbs.db...)")
    if name.upper() == "DICOMDIR":
        return Skipped(key, SKIP_DICOMDIR, f"{key}: the index of a DICOM CD; the images are read from their files")
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return Skipped(key, SKIP_NOT_IMAGE, f"{key}: not a regular file (a device, pipe or socket)")
        kind = sniff_kind(path)
    except OSError as exc:
        return Skipped(key, SKIP_UNREADABLE, f"{key}: cannot be read ({exc.strerror or type(exc).__name__}); "
                       "check that it exists and its permissions")
    if kind is None and PurePath(name).suffix.lower() not in IMAGE_SUFFIXES:
        return Skipped(key, SKIP_NOT_IMAGE, f"{key}: neither PNG, JPEG nor DICOM; not read")
    return SourceItem(key, Path(path), size=st.st_size, mtime_ns=st.st_mtime_ns, root=root)


def _link_target(key: str, path: str, real_root: str) -> str | None:
    """The key (relative to ``real_root``) of the file a link leads to, when it differs from ``key`` and lies
    inside the root outside hidden folders; else None (a broken link, too)."""
    real = os.path.realpath(path)
    try:
        target = PurePath(os.path.relpath(real, real_root))
    except ValueError:  # another drive (Windows)
        return None
    if not os.path.isfile(real):
        return None
    if target.parts[:1] == ("..",) or any(is_hidden(p) for p in target.parts) or target.as_posix() == key:
        return None
    return target.as_posix()


def _folder_id(path: str) -> tuple[int, int]:
    st = os.stat(path)  # not DirEntry.stat(): it has no inode numbers on Windows
    return st.st_dev, st.st_ino


def _entries(it: Iterator[os.DirEntry[str]]) -> Iterator[_Entry]:
    for entry in it:
        try:
            is_dir, is_link = entry.is_dir(), entry.is_symlink()
        except OSError:
            is_dir, is_link = False, False
        yield entry.name, is_dir, is_link


def _listing(folder: str) -> Iterator[_Entry]:
    """(name, is a folder, is a link) of each entry, in the file system's order; stops quietly if listing fails
    (the folder vanished midway: what was listed stays)."""
    try:
        with os.scandir(folder) as it:
            yield from _entries(it)
    except OSError:
        return


class _Walk:
    """One folder walk: the real folders visited so far, and what a top-level DICOMDIR already gave."""

    def __init__(self, root: Path, recursive: bool) -> None:
        self.root, self.recursive = str(root), recursive
        self.real_root = os.path.realpath(root)
        self.visited: dict[tuple[int, int], str] = {}
        self.listed_files: set[str] = set()  # upper-cased top-level names the DICOMDIR gave
        self.listed_folders: set[str] = set()

    def run(self) -> Iterator[Found]:
        try:
            self.visited[_folder_id(self.root)] = "."
        except OSError as exc:
            yield Skipped(".", SKIP_UNREADABLE, f"{self.root}: cannot open the folder ({exc.strerror})")
            return
        if not self.recursive:  # only a DICOMDIR at the top counts, and only without recursive
            top = next((n for n, d, _ in _listing(self.root) if n.upper() == "DICOMDIR" and not d), None)
            if top is not None:
                yield from self._dicomdir(top)
        yield from self._folder(self.root, "")

    def _dicomdir(self, name: str) -> Iterator[Found]:
        self.listed_files.add(name.upper())
        for found in read_dicomdir(Path(self.root, name)):
            if isinstance(found, Skipped) and found.key == name:
                yield found  # unreadable: the subfolders are reported as such
                return
            first, _, rest = found.key.partition("/")
            (self.listed_folders if rest else self.listed_files).add(first.upper())
            yield found
        yield Skipped(name, SKIP_DICOMDIR, f"{name}: the index of a DICOM CD; the images it lists were read")

    def _folder(self, folder: str, prefix: str) -> Iterator[Found]:
        """Files first, then subfolders; ``prefix`` is the folder's key plus '/' ('' at the root)."""
        try:
            with os.scandir(folder) as it:
                entries, complete = _sorted_if_small(_entries(it), SORT_LIMIT)
        except OSError as exc:
            where = prefix or f"{folder}/"
            yield Skipped(prefix or ".", SKIP_UNREADABLE, f"{where}: cannot list the folder ({exc.strerror})")
            return
        subfolders = []
        for name, is_dir, is_link in entries if complete else _listing(folder):
            key = prefix + name
            if not prefix and name.upper() in (self.listed_folders if is_dir else self.listed_files):
                continue  # read through the DICOMDIR
            if is_dir and is_hidden(name):
                yield Skipped(key + "/", SKIP_HIDDEN, f"{key}/: a hidden or system folder; not read")
            elif is_dir and not self.recursive:
                yield Skipped(key + "/", SKIP_SUBFOLDER, f"{key}/: a subfolder; pass --recursive to read it")
            elif is_dir:
                if complete:  # else listed again below
                    subfolders.append(name)
            elif is_link and (target := self._read_elsewhere(key, os.path.join(folder, name))):
                yield Skipped(key, SKIP_DUPLICATE, f"{key}: a link to {target}, which is read itself")
            else:
                yield _file(key, os.path.join(folder, name), self.root)
        if self.recursive:
            later = subfolders if complete else (n for n, d, _ in _listing(folder) if d and not is_hidden(n))
            for name in later:
                yield from self._subfolder(os.path.join(folder, name), prefix + name)

    def _read_elsewhere(self, key: str, path: str) -> str | None:
        target = _link_target(key, path, self.real_root)
        return target if target is not None and (self.recursive or "/" not in target) else None

    def _subfolder(self, path: str, key: str) -> Iterator[Found]:
        try:
            ident = _folder_id(path)
        except OSError as exc:
            yield Skipped(key + "/", SKIP_UNREADABLE, f"{key}/: cannot open the folder ({exc.strerror})")
            return
        earlier = self.visited.get(ident)
        if earlier is not None:
            above = earlier == "." or key.startswith(earlier + "/")
            why = "links back to a folder above it" if above else f"is the same folder as {earlier}/ (read once)"
            yield Skipped(key + "/", SKIP_LOOP, f"{key}/: {why}")
            return
        self.visited[ident] = key
        yield from self._folder(path, key + "/")


def walk_folder(root: Path, recursive: bool = False) -> Iterator[SourceItem | Skipped]:
    """Stream the images in ``root`` (and its subfolders if ``recursive``) and what was skipped (module doc)."""
    return _Walk(Path(root), recursive).run()


def read_dicomdir(path: Path) -> Iterator[SourceItem | Skipped]:
    """The images a DICOMDIR lists (its IMAGE records), keyed relative to its folder; missing ones are skipped.

    A damaged DICOMDIR gives one ``Skipped`` keyed by its own name."""
    path = Path(path)
    folder = path.parent
    try:
        files = dicomdir_files(path)
    except Exception as exc:  # pydicom raises many types on a damaged file
        yield Skipped(path.name, SKIP_UNREADABLE, f"{path}: not a readable DICOMDIR ({type(exc).__name__}); "
                      "give its folder with --recursive instead")
        return
    seen: set[str] = set()
    for record_type, raw in files:
        parts = tuple(p.strip() for p in raw)
        key = "/".join(parts)
        if any(p in ("", ".", "..") or re.search(r"[/\\:]", p) for p in parts):
            yield Skipped(key, SKIP_UNREADABLE, f"{key}: the DICOMDIR refers to a file outside its folder; not read")
            continue
        found = existing_file(folder, parts)
        key = found.relative_to(folder).as_posix() if found is not None else key
        if key.upper() in seen:
            yield Skipped(key, SKIP_DUPLICATE, f"{key}: listed twice in the DICOMDIR; read once")
        elif found is None:
            yield Skipped(key, SKIP_UNREADABLE, f"{key}: listed in the DICOMDIR but missing; copy the whole CD")
        elif record_type != "IMAGE":
            yield Skipped(key, SKIP_NOT_IMAGE, f"{key}: a DICOMDIR {record_type or 'untyped'} record, not an image")
        else:
            st = found.stat()
            yield SourceItem(key, found, size=st.st_size, mtime_ns=st.st_mtime_ns, root=str(folder))
        seen.add(key.upper())


def _glob_matches(path: tuple[str, ...], pattern: tuple[str, ...], recursive: bool) -> bool:
    """Whether glob ``pattern`` (split at '/') would match ``path`` (no '*' across '/'; '**' any depth)."""
    if not pattern:
        return not path
    if pattern[0] == "**" and recursive:
        return any(_glob_matches(path[i:], pattern[1:], recursive) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatch(path[0], pattern[0]) and _glob_matches(path[1:], pattern[1:], recursive)


def _glob(pattern: str, recursive: bool) -> Iterator[Found]:
    """Files matching ``pattern``, keyed relative to its non-glob start (sorted up to ``SORT_LIMIT``).

    A recursive '**' walks the start folder (``glob`` would follow symlink loops) and keeps what matches, with
    the folders the walk could not read or met twice. Otherwise ``glob.iglob`` lists the matches, and a link to
    a file the pattern also matches is skipped as a duplicate.
    """
    start, rest = glob_start(pattern)
    if recursive and "**" in rest:
        for found in walk_folder(Path(start), recursive=True) if os.path.isdir(start) else ():
            if isinstance(found, Skipped) and found.reason in (SKIP_LOOP, SKIP_UNREADABLE) and found.key[-1:] in "/.":
                yield found  # a folder the walk could not read, or met twice
            elif _glob_matches(tuple(found.key.split("/")), rest, recursive):
                yield found
        return
    real_start = os.path.realpath(start)
    matches, complete = _sorted_if_small(glob.iglob(pattern), SORT_LIMIT)
    for match in matches if complete else glob.iglob(pattern):
        if os.path.isdir(match):
            continue  # a glob selects files; a folder it matches is not walked
        key = PurePath(os.path.relpath(match, start)).as_posix()
        target = _link_target(key, match, real_start)
        if target is not None and _glob_matches(tuple(target.split("/")), rest, recursive):
            yield Skipped(key, SKIP_DUPLICATE, f"{key}: reached through a link to {target}, which is read itself")
        else:
            yield _file(key, match, start)


def _file_input(plan: InputPlan) -> Iterator[Found]:
    path = Path(plan.given)
    if path.is_file() and is_dicomdir(path):
        yield from _prefixed(read_dicomdir(path), plan.label and key_prefix(str(path.parent)), plan.given)
        return
    try:
        st = path.stat()
        size, mtime_ns = st.st_size, st.st_mtime_ns
    except OSError:  # missing: read_image reports it, per file
        size = mtime_ns = -1
    yield SourceItem(plan.label or path.name, path, size=size, mtime_ns=mtime_ns, root=str(path.parent))


def _prefixed(found: Iterable[Found], label: str, given: str) -> Iterator[Found]:
    """``found`` with keys under ``label`` (several inputs); the key '.' (the root itself) becomes the input."""
    for one in found:
        if one.key == ".":
            yield dataclasses.replace(one, key=label or key_prefix(given) or ".")
        else:
            yield dataclasses.replace(one, key=f"{label}/{one.key}") if label else one


def open_sources(inputs: Sequence[str | Path], recursive: bool = False) -> Iterator[SourceItem | Skipped]:
    """Stream what ``inputs`` (files, folders, globs, DICOMDIRs) hold to analyse, and what was skipped.

    Keys, order and skip rules: the module doc. A file given by name is always an item (a missing one too:
    ``read_image`` reports it); so is a glob that matches no file (its pattern). Memory stays bounded except
    when inputs overlap (a folder and a file or folder inside it): then the files they give are remembered
    (device and inode numbers) so that none is analysed twice.
    """
    seen: set[tuple[int, int] | str] = set()
    for plan in plan_inputs(inputs):
        if plan.same_as is not None:
            key = plan.label or key_prefix(plan.given)
            yield Skipped(key, SKIP_DUPLICATE, f"{plan.given}: the same {plan.kind} as {plan.same_as}; read once")
            continue
        if plan.kind == "folder":
            found: Iterable[Found] = _prefixed(walk_folder(Path(plan.given), recursive), plan.label, plan.given)
        elif plan.kind == "glob":
            found = _prefixed(_glob(plan.given, recursive), plan.label, plan.given)
        else:
            found = _file_input(plan)
        matched = False
        for one in found:
            matched = True
            if plan.overlaps and isinstance(one, SourceItem) and one.path is not None:
                try:
                    st = os.stat(one.path)
                    ident: tuple[int, int] | str = (st.st_dev, st.st_ino)
                except OSError:
                    ident = os.path.realpath(one.path)
                if ident in seen:
                    one = Skipped(one.key, SKIP_DUPLICATE, f"{one.key}: an earlier input gave this file; read once")
                seen.add(ident)
            yield one
        if plan.kind == "glob" and not matched:  # read_image reports "file not found", as for a missing file
            yield SourceItem(key_prefix(plan.given), Path(plan.given), root=glob_start(plan.given)[0])


def upload_item(name: str, data: bytes) -> SourceItem:
    """An uploaded file for the web service: key = its printable base name ('upload' if nothing is left)."""
    base = re.split(r"[/\\]", name)[-1]
    key = "".join(ch for ch in base if ch.isprintable()).strip() or "upload"
    return SourceItem(key, None, data=data, size=len(data), root="")
