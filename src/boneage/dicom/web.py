"""``boneage predict --dicomweb URL``: radiographs from a DICOMweb server (QIDO-RS, WADO-RS), results back (STOW-RS).

What is read
    ``--study UID``: the study's instances (QIDO-RS ``/studies/{uid}/instances``). ``--since DATE``: the studies
    with a StudyDate on or after DATE (QIDO-RS ``StudyDate=DATE-``), then each one's instances. Where the search
    result gives an instance's Modality, only CR and DX are retrieved; structured reports (an earlier ``--store``'s
    among them) and the rest become skipped rows (``SKIP_NOT_RADIOGRAPH``). Search results are read a page
    (``PAGE`` rows) at a time.
Retrieval
    Each instance is retrieved (WADO-RS, in its stored transfer syntax) into the run's download folder
    (``download_folder``: a hidden folder under ``--out``, removed at the end) when the pipeline asks for it, one
    at a time, and deleted once its batch is written (``DicomWebResults.finish``): memory and disk hold a few
    instances, whatever the length of the list. An instance that cannot be retrieved is a skipped row (``unreadable
    file``); a server that cannot be reached, or fails a search, is a ``BoneAgeError`` naming the URL and what to
    check.
Keys and resume
    An instance's key (the table's ``file``) is ``dicomweb/<pseudonym of its SOP Instance UID>``
    (``boneage.privacy``), never a raw UID. Its resume identity is that key alone (size and mtime are -1: a server
    has no file times, and an instance never changes without a new UID). So a rerun, with ``--study`` or
    ``--since``, searches the server again but retrieves, scores and stores only the instances not yet in the
    table; another pseudonym key (``--pseudonym-key``) makes every instance new.
Store
    With ``--store``, each instance scored ``ok`` has its Structured Report and Secondary Capture
    (``boneage.dicom.sr.result_objects``) sent to the same server (STOW-RS) once its row is written. A failed store
    is logged (by the row's key) and counted, and makes the exit status 1; the row stays in the table, so a rerun
    does not store it again: rerun into a new ``--out`` for that.
Privacy
    No UID or patient identifier reaches a log line or a message: the URL is shown without user info or query,
    server errors by their HTTP status, and the loggers of ``dicomweb_client`` and ``retrying`` (which name UIDs in
    URLs) are kept to errors.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from boneage.errors import BoneAgeError
from boneage.inference.sources import SKIP_UNREADABLE, SourceItem, Skipped
from boneage.privacy import pseudonym

log = logging.getLogger("boneage.dicomweb")

KEY_PREFIX = "dicomweb/"
SKIP_NOT_RADIOGRAPH = "not a radiograph (QIDO)"
RADIOGRAPHS = frozenset({"CR", "DX"})
PAGE = 500  # search results per QIDO-RS request
TIMEOUT_S = 30.0  # per HTTP request
RETRIES, RETRY_WAIT_MS = 3, 250  # attempts per request (connection errors, 408/429/503/504), exponential back-off
DOWNLOADS = ".boneage-dicomweb-"  # prefix of the download folder under --out
INSTALL = "pip install 'boneage[pacs]'"
_STUDY, _SERIES, _SOP, _SOP_CLASS, _MODALITY = "0020000D", "0020000E", "00080018", "00080016", "00080060"
_SR_CLASSES = "1.2.840.10008.5.1.4.1.1.88."  # every Structured Report storage class starts so
_UID = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")


def public_url(url: str) -> str:
    """``url`` as messages show it: scheme, host, port and path only (no user info, query or fragment)."""
    parts = urlsplit(url)
    try:
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    except ValueError:  # a port that is no number
        host = parts.hostname or ""
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def parse_since(text: str) -> str:
    """``--since`` (YYYY-MM-DD or YYYYMMDD) as a DICOM date, YYYYMMDD; ``BoneAgeError`` otherwise."""
    for form in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.datetime.strptime(text.strip(), form).strftime("%Y%m%d")
        except ValueError:
            continue
    raise BoneAgeError(f"--since {text!r}: give a date as YYYY-MM-DD or YYYYMMDD")


def check_request(paths: Sequence[str], url: str | None, study: str | None, since: str | None,
                  store: bool) -> None:
    """``BoneAgeError`` unless the inputs are PATHs, or ``--dicomweb URL`` with one of ``--study``/``--since``
    (the study UID is not repeated in the message: it is an identifier)."""
    if url is None:
        if not paths:
            raise BoneAgeError("give the images to analyse: PATHs (files, folders, globs) or --dicomweb URL")
        given = [flag for flag, v in (("--study", study), ("--since", since), ("--store", store)) if v]
        if given:
            raise BoneAgeError(f"{', '.join(given)}: only with --dicomweb URL")
        return
    if paths:
        raise BoneAgeError("give PATHs or --dicomweb URL, not both")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        raise BoneAgeError(f"--dicomweb {public_url(url)}: give the server's DICOMweb root as an http(s) URL without "
                           "user name, e.g. http://pacs:8042/dicom-web")
    if (study is None) == (since is None):
        raise BoneAgeError("--dicomweb needs --study UID or --since DATE (one of them)")
    if study is not None and not (_UID.match(study) and len(study) <= 64):
        raise BoneAgeError("--study: not a DICOM UID (digits and dots, at most 64 characters)")
    if since is not None:
        parse_since(since)


def connect(url: str) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for ``url`` with short retries; the third-party logs kept to errors."""
    try:
        from dicomweb_client import DICOMwebClient
    except ImportError:
        raise BoneAgeError(f"--dicomweb needs dicomweb-client: {INSTALL}") from None
    for name in ("dicomweb_client", "retrying"):  # their info and warning lines quote URLs with UIDs
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        client = DICOMwebClient(url.rstrip("/"), timeout=TIMEOUT_S)
    except ValueError:
        raise BoneAgeError(f"--dicomweb {public_url(url)}: not a URL the DICOMweb client accepts; give the "
                           "DICOMweb root, e.g. http://pacs:8042/dicom-web") from None
    client.set_http_retry_params(retry=True, max_attempts=RETRIES, wait_exponential_multiplier=RETRY_WAIT_MS)
    return client


def explain(exc: BaseException) -> tuple[str, str]:
    """(what happened, what to check) for an error of a DICOMweb request, without its text (URLs hold UIDs)."""
    import requests

    response = getattr(exc, "response", None)
    if response is None and type(exc).__name__ == "RetryError":  # retrying: the last of several 5xx answers
        response = getattr(getattr(exc, "last_attempt", None), "value", None)
    code = getattr(response, "status_code", None)
    if isinstance(code, int):
        if code in (401, 403):
            return f"access denied (HTTP {code})", "check that the server lets this machine in without a login"
        if code == 404:
            return "not found (HTTP 404)", ("check that the URL is the DICOMweb root (Orthanc: http://host:8042/"
                                            "dicom-web, with its DICOMweb plugin) and that the study exists")
        if code >= 500:
            return f"a server error (HTTP {code})", "see the server's log"
        return f"the request refused (HTTP {code})", "check the URL and the server's DICOMweb settings"
    if isinstance(exc, requests.Timeout):
        return f"no answer within {TIMEOUT_S:.0f} s", "check that the server is up and not overloaded"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect", "check that the server runs and the host name and port"
    if isinstance(exc, requests.RequestException):
        return f"the request failed ({type(exc).__name__})", "check the URL"
    return f"an answer that is not DICOMweb ({type(exc).__name__})", "check that the URL is the DICOMweb root"


class _Server:
    """One DICOMweb server: searches and retrievals whose errors become one readable sentence."""

    def __init__(self, url: str) -> None:
        self.shown = public_url(url)
        self.client = connect(url)

    def failure(self, what: str, exc: BaseException) -> BoneAgeError:
        happened, check = explain(exc)
        return BoneAgeError(f"DICOMweb server {self.shown}: {what}: {happened}; {check}")

    def search(self, what: str, method: Callable[..., list[dict[str, Any]]], **query: Any
               ) -> Iterator[dict[str, Any]]:
        """QIDO-RS results a page at a time; stops at an empty page or at a server that ignores ``offset`` (the
        first page again)."""
        offset, heads = 0, set()
        while True:
            try:
                page = method(limit=PAGE, offset=offset, **query)
            except Exception as exc:
                raise self.failure(what, exc) from None
            if not isinstance(page, list) or not page:
                return
            head = json.dumps(page[0], sort_keys=True)
            if head in heads:
                return
            heads.add(head)
            yield from (row for row in page if isinstance(row, dict))
            offset += len(page)


def _value(row: dict[str, Any], tag: str) -> str | None:
    """The first value of ``tag`` in a DICOM JSON result row, as text; None when absent."""
    element = row.get(tag)
    values = (element.get("Value") if isinstance(element, dict) else None) or [None]
    return None if values[0] is None else str(values[0]).strip()


def _instances(server: _Server, study: str | None, since: str | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(study UID, instance search result) of ``study``, or of each study since ``since``."""
    fields = [_STUDY, _SERIES, _SOP, _SOP_CLASS, _MODALITY]
    if study is not None:
        studies: Iterable[str] = [study]
    else:
        assert since is not None
        found = server.search(f"searching the studies since {since}", server.client.search_for_studies,
                              search_filters={"StudyDate": f"{parse_since(since)}-"}, fields=[_STUDY])
        studies = _unique(uid for uid in (_value(row, _STUDY) for row in found) if uid and _UID.match(uid))
    for uid in studies:
        for row in server.search("searching a study's instances", server.client.search_for_instances,
                                 study_instance_uid=uid, fields=fields):
            yield _value(row, _STUDY) or uid, row


def _unique(uids: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for uid in uids:
        if uid not in seen:
            seen.add(uid)
            yield uid


def _refusal(key: str, row: dict[str, Any]) -> Skipped | None:
    """The skipped row of an instance the search result already shows is no radiograph; None when it may be."""
    modality, sop_class = _value(row, _MODALITY), _value(row, _SOP_CLASS) or ""
    if sop_class.startswith(_SR_CLASSES):
        return Skipped(key, SKIP_NOT_RADIOGRAPH, f"{key}: a structured report, not an image")
    if modality is not None and modality.upper() not in RADIOGRAPHS:
        return Skipped(key, SKIP_NOT_RADIOGRAPH, f"{key}: modality {modality[:16]!r} in the server's index; only "
                       "CR and DX radiographs are retrieved")
    return None


def dicomweb_items(url: str, *, study: str | None = None, since: str | None = None, workdir: Path, key: bytes,
                   known: Callable[[str], bool] | None = None) -> Iterator[SourceItem | Skipped]:
    """The instances of ``study``, or of the studies since ``since``, on the DICOMweb server at ``url``: each
    radiograph retrieved into ``workdir`` when asked for, one at a time (module doc). Keys are
    ``dicomweb/<pseudonym under key>``; an instance whose key ``known`` holds (already in the table) is yielded
    without being retrieved (``path`` None), for the caller to count. ``BoneAgeError`` when the server cannot be
    searched."""
    server = _Server(url)
    workdir = Path(workdir)
    for study_uid, row in _instances(server, study, since):
        series_uid, sop_uid = _value(row, _SERIES), _value(row, _SOP)
        name = pseudonym(sop_uid, key) if sop_uid else "unknown"
        item_key = KEY_PREFIX + name
        if not (series_uid and sop_uid):
            yield Skipped(item_key, SKIP_UNREADABLE, f"{item_key}: the server's search result lacks its series or "
                          "instance UID; not retrieved")
            continue
        refusal = _refusal(item_key, row)
        if refusal is not None:
            yield refusal
        elif known is not None and known(item_key):
            yield SourceItem(item_key, None, root=server.shown)
        else:
            yield _retrieve(server, (study_uid, series_uid, sop_uid), workdir / f"{name}.dcm", item_key)


def _retrieve(server: _Server, uids: tuple[str, str, str], path: Path, key: str) -> SourceItem | Skipped:
    """WADO-RS one instance into ``path``; a skipped row when the server cannot give it."""
    import pydicom

    try:
        dataset = server.client.retrieve_instance(*uids)
    except Exception as exc:
        import requests

        if isinstance(exc, requests.ConnectionError):  # the server went away: nothing more can be read
            raise server.failure("retrieving an instance", exc) from None
        happened, _ = explain(exc)
        return Skipped(key, SKIP_UNREADABLE, f"{key}: the server did not give the instance: {happened}")
    try:
        pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    except Exception as exc:  # an instance without file meta information, or one pydicom cannot encode
        path.unlink(missing_ok=True)
        return Skipped(key, SKIP_UNREADABLE, f"{key}: the instance the server gave cannot be saved "
                       f"({type(exc).__name__})")
    return SourceItem(key, path, size=-1, mtime_ns=-1, root=server.shown)


@contextlib.contextmanager
def download_folder(out: str | Path | None) -> Iterator[Path]:
    """A new folder for the retrieved instances, removed at the end: hidden under ``out`` (where those of killed
    runs are removed first), else in the system's temp folder."""
    if out is not None:
        for stale in Path(out).glob(DOWNLOADS + "*"):
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=DOWNLOADS, dir=out))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class DicomWebResults:
    """What follows each written batch of a ``--dicomweb`` run: with ``store``, the SR and Secondary Capture of
    each instance scored ok sent to the server (STOW-RS); then the retrieved files deleted. The model that the
    results name (``ModelInfo``) is read from the checkpoints and the first record, once."""

    def __init__(self, url: str, *, store: bool, checkpoints: Sequence[str | Path] = ()) -> None:
        self.shown = public_url(url)
        self.store, self.checkpoints = store, tuple(checkpoints)
        self.client = connect(url) if store else None
        self.model: Any = None
        self.stored = self.failed = 0

    def finish(self, batch: Iterable[tuple[SourceItem, dict[str, Any], Any]]) -> None:
        for item, record, analysis in batch:
            try:
                if self.store and record.get("status") == "ok" and item.path is not None:
                    self._store(item, record, analysis)
            finally:
                if item.path is not None:
                    Path(item.path).unlink(missing_ok=True)

    def _objects(self, item: SourceItem, record: dict[str, Any], analysis: Any) -> list[Any]:
        import pydicom

        from boneage.dicom.sr import ModelInfo, result_objects

        if self.model is None:
            self.model = ModelInfo.from_files(self.checkpoints, architectures=record.get("architectures") or (),
                                              mae_months=record.get("model_mae_months"))
        assert item.path is not None
        source = pydicom.dcmread(item.path, stop_before_pixels=True)
        return result_objects(record, source, analysis, model=self.model)

    def _store(self, item: SourceItem, record: dict[str, Any], analysis: Any) -> None:
        name = record.get("file") or item.key
        try:
            objects = self._objects(item, record, analysis)
        except Exception as exc:  # a header the SR cannot be derived from; messages of sr.py name no identifier
            log.warning("%s: no results to store (%s)", name, type(exc).__name__)
            self.failed += 1
            return
        try:
            answer = self.client.store_instances(objects) if self.client is not None else None
        except Exception as exc:
            happened, check = explain(exc)
            log.warning("%s: its results were not stored in %s: %s; %s", name, self.shown, happened, check)
            self.failed += 1
            return
        refused = len(getattr(answer, "FailedSOPSequence", None) or [])
        if refused:
            log.warning("%s: %s refused %d of its %d result objects", name, self.shown, refused, len(objects))
            self.failed += 1
        else:
            self.stored += 1

    def summary(self) -> str:
        """One line for the end of the run ('' without ``store``)."""
        if not self.store:
            return ""
        return (f"stored the SR and Secondary Capture of {self.stored} instances in {self.shown}"
                + (f"; {self.failed} not stored (see the warnings)" if self.failed else ""))
