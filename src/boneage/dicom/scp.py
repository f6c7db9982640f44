"""The DICOM node of ``boneage dicom-node``: a C-STORE SCP that scores hand radiographs as they arrive and sends
the results on (options and command: ``boneage.dicom.node``).

Receiving
    A Storage SCP (pynetdicom) for Computed Radiography and Digital X-Ray (for presentation and for processing)
    images, and Verification (C-ECHO). Associations are accepted only from the calling AE titles in ``allow`` and
    only when called by this node's AE title; others are rejected and logged with the AE titles (not patient
    identifiers). It listens on 127.0.0.1 unless ``bind`` says otherwise. Each instance is written whole to the
    spool's ``incoming/<pseudonym>.dcm`` (``boneage.dicom.spool``) before the success status goes back, so an
    acknowledged instance is never lost. Then it is queued for scoring; when the bounded queue is full, or the node
    is stopping, the answer is 0xA700 (out of resources) and the sender retries later. An instance larger than
    ``max_bytes`` is refused with 0xC001 (not stored); a peer that keeps sending past twice that is aborted, so
    memory stays bounded. A peer that disconnects mid-association costs nothing but its own instance.
Scoring
    One worker thread runs each spooled file through ``Pipeline`` exactly as ``boneage predict`` would (the DICOM
    header check refuses what is no hand radiograph), builds the Structured Report and Secondary Capture
    (``boneage.dicom.sr.result_objects``) into ``outgoing/``, then removes the input. An input that is refused or
    cannot be read moves to ``refused/`` with a JSON reason. The sender thread (``boneage.dicom.forward``) stores
    results on the destination, with retries, else in ``dead-letter/``.
Stopping and restarting
    ``stop()`` (SIGTERM or SIGINT under ``boneage.dicom.node.run_node``) stops accepting associations, lets open
    ones finish for a few seconds, finishes the input being scored and the group being sent, and leaves the rest in
    the spool. At start the node moves ``dead-letter/`` back to ``outgoing/``, scores what ``incoming/`` holds
    before new arrivals, and sends what ``outgoing/`` holds: nothing acknowledged is lost.
Privacy
    Log lines and the refused JSON name an instance only by its keyed pseudonym (``boneage.privacy``) and never
    quote a UID; pynetdicom's own message dumps are switched off.
"""

from __future__ import annotations

import io
import logging
import queue
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boneage.dicom.forward import Destination, Sender
from boneage.dicom.spool import Spool, redact
from boneage.errors import BoneAgeError

if TYPE_CHECKING:  # at run time the node passes its options in: scp does not import node (node imports scp)
    from boneage.dicom.node import NodeOptions

log = logging.getLogger("boneage.dicom.node")

STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
}
VERIFICATION = "1.2.840.10008.1.1"
TRANSFER_SYNTAXES = {  # what the decoders of the [dicom] extra read (pydicom, pylibjpeg)
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1 (Process 14, Selection Value 1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 (Lossless Only)",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
SUCCESS, OUT_OF_RESOURCES, TOO_LARGE = 0x0000, 0xA700, 0xC001
MAX_PDU = 256 * 1024
LINGER_S = 5.0  # how long stop() lets open associations finish before aborting them


def _model_info(predictor: Any) -> Any:
    from boneage.dicom.sr import model_info

    return model_info(predictor)


def _encode(dataset: Any) -> bytes:
    from pydicom import dcmwrite

    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


class DicomNode:
    """The node (module doc): ``start()`` returns the port it listens on, ``stop()`` shuts it down cleanly."""

    def __init__(self, options: NodeOptions, predictor: Any = None) -> None:
        from boneage.inference.batch import load_predictor
        from boneage.inference.pipeline import AnalysisOptions, Pipeline
        from boneage.privacy import load_key

        self.options = options = options.checked()
        self.destination = Destination.parse(options.destination)
        self.key = load_key(options.pseudonym_key)
        self.spool = Spool(Path(options.spool)).open()
        if predictor is None:
            predictor = load_predictor(options.checkpoints, tta=options.tta, device=options.device,
                                       precision=options.precision)
        self.pipeline = Pipeline(predictor, AnalysisOptions(
            heatmap=options.heatmap, interval_level=options.interval_level, ood_check=options.ood_check,
            header_check=options.header_check, key=self.key))
        self.model = _model_info(predictor)
        self.queue: queue.Queue[Path] = queue.Queue(options.queue_size)
        self.stopping = threading.Event()
        self.sender = Sender(self.spool, self.destination, options.ae_title, retries=options.retries,
                             retry_delay=options.retry_delay, stop=self.stopping)
        self.scored = self.refused = 0
        self.port = 0
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._ae: Any = None
        self._server: Any = None

    # --- receiving ----------------------------------------------------------------------------------------

    def start(self) -> int:
        """Recover the spool, start the scorer and sender threads, then listen; the port."""
        from pynetdicom import AE, _config, evt

        _config.LOG_HANDLER_LEVEL = "none"  # its DIMSE dumps quote UIDs
        _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
        revived = self.spool.revive()
        backlog = self.spool.pending()
        if revived or backlog or self.spool.groups():
            log.info("spool: %d input(s) to score, %d result group(s) to send (%d from dead-letter/)",
                     len(backlog), len(self.spool.groups()), revived)
        self._threads = [threading.Thread(target=self._score_loop, args=(backlog,), name="boneage-scorer"),
                         threading.Thread(target=self.sender.run, name="boneage-sender")]
        for thread in self._threads:
            thread.start()
        ae = AE(ae_title=self.options.ae_title)
        ae.require_calling_aet = list(self.options.allow)
        ae.require_called_aet = True
        ae.maximum_pdu_size = MAX_PDU
        ae.maximum_associations = self.options.max_associations
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 30, 60, 60
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                               (evt.EVT_DATA_RECV, self._on_data), (evt.EVT_DIMSE_RECV, self._on_message)]
        try:
            self._server = ae.start_server((self.options.bind, self.options.port), block=False,
                                           evt_handlers=handlers)
        except OSError as exc:
            self.stop()
            raise BoneAgeError(f"cannot listen on {self.options.bind}:{self.options.port} ({exc.strerror or exc}); "
                               "choose another --port or stop the program using it") from exc
        self._ae = ae
        self.port = int(self._server.server_address[1])
        return self.port

    def _on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        calling, called = requestor.ae_title, getattr(requestor.primitive, "called_ae_title", "?")
        why = ("calling AE title not in --allow" if calling not in self.options.allow
               else "called AE title is not this node's" if called != self.options.ae_title
               else "too many associations")
        log.warning("association from %r (calling) to %r (called) at %s rejected: %s", calling, called,
                    requestor.address, why)

    def _on_data(self, event: Any) -> None:
        """Memory guard: abort an association that sends more than twice ``max_bytes`` in one message."""
        assoc = event.assoc
        received = getattr(assoc, "_boneage_bytes", 0) + len(event.data)
        setattr(assoc, "_boneage_bytes", received)
        if received > 2 * self.options.max_bytes + MAX_PDU and not getattr(assoc, "_boneage_aborted", False):
            setattr(assoc, "_boneage_aborted", True)
            log.warning("association from %r aborted after %d bytes of one message (--max-bytes %d)",
                        assoc.requestor.ae_title, received, self.options.max_bytes)
            assoc.abort(block=False)

    def _on_message(self, event: Any) -> None:
        setattr(event.assoc, "_boneage_bytes", 0)

    def _on_store(self, event: Any) -> Any:
        """C-STORE: spool, then queue; the status (module doc)."""
        from pydicom import Dataset

        from boneage.privacy import pseudonym

        uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "") or secrets.token_hex(16)
        name = pseudonym(uid, self.key)
        calling = event.assoc.requestor.ae_title
        if self._closing:
            return OUT_OF_RESOURCES
        data = event.encoded_dataset(include_meta=True)
        if len(data) > self.options.max_bytes:
            log.warning("%s from %r refused: %d bytes, more than --max-bytes %d", name, calling, len(data),
                        self.options.max_bytes)
            status = Dataset()
            status.Status = TOO_LARGE
            status.ErrorComment = f"instance larger than {self.options.max_bytes} bytes"
            return status
        path = self.spool.incoming / f"{name}.dcm"
        already = path.exists()  # the same instance again, not yet scored: it is queued or in the backlog
        try:
            self.spool.receive(name, data)
        except OSError as exc:
            log.error("%s from %r not stored: cannot write the spool (%s)", name, calling, exc.strerror or exc)
            return OUT_OF_RESOURCES
        if not already:
            try:
                self.queue.put_nowait(path)
            except queue.Full:
                path.unlink(missing_ok=True)
                log.warning("%s from %r deferred: %d instances wait for scoring (the sender retries)", name,
                            calling, self.options.queue_size)
                return OUT_OF_RESOURCES
        log.info("%s received from %r (%d bytes)", name, calling, len(data))
        return SUCCESS

    # --- scoring ------------------------------------------------------------------------------------------

    def _score_loop(self, backlog: list[Path]) -> None:
        while not self.stopping.is_set():
            if backlog:
                path = backlog.pop(0)
            else:
                try:
                    path = self.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
            try:
                self.score(path)
            except OSError as exc:  # the spool's disk: the input stays in incoming/ for the next start
                log.error("%s: not scored, cannot write the spool (%s)", path.stem, exc.strerror or exc)
            except Exception as exc:  # noqa: BLE001 - the scorer outlives any one input
                log.error("%s: not scored (%s: %s); left in incoming/ for the next start", path.stem,
                          type(exc).__name__, redact(str(exc))[:200])

    def score(self, path: Path) -> None:
        """Score one spooled input: results to outgoing/, or the input to refused/ (module doc)."""
        from pydicom import dcmread

        from boneage.dicom.sr import result_objects
        from boneage.inference.sources import SourceItem

        name = path.stem
        try:
            st = path.stat()
        except FileNotFoundError:
            return  # the same instance twice in the queue: scored already
        started = time.perf_counter()
        item = SourceItem(f"{name}.dcm", path, size=st.st_size, mtime_ns=st.st_mtime_ns, root=str(path.parent))
        [(_, record, analysis)] = list(self.pipeline.analyse([(item, self.pipeline.prepare(item))]))
        if analysis is None or record.get("status") not in (None, "ok"):
            self._refuse(path, record.get("status") or "failed", record.get("reason") or "", record.get("error"))
            return
        try:
            source = dcmread(path, stop_before_pixels=True)
            blobs = [_encode(ds) for ds in result_objects(record, source, analysis, model=self.model)]
        except Exception as exc:  # noqa: BLE001 - one input never stops the node
            self._refuse(path, "failed", "result objects", f"cannot build the results ({type(exc).__name__})")
            return
        self.spool.write_results(name, blobs)
        path.unlink(missing_ok=True)
        self.scored += 1
        self.sender.wake.set()
        log.info("%s: bone age %.1f months (%.2f s); results queued for %s", name, record["bone_age_months"],
                 time.perf_counter() - started, self.destination)

    def _refuse(self, path: Path, status: str, reason: str, error: Any) -> None:
        message = redact(str(error or reason))
        self.spool.refuse(path, {"instance": path.stem, "status": status, "reason": reason, "error": message})
        self.refused += 1
        log.warning("%s %s (%s): %s; moved to refused/", path.stem, status, reason, message)

    # --- stopping -----------------------------------------------------------------------------------------

    def stop(self, linger: float = LINGER_S, timeout: float = 120.0) -> None:
        """Stop accepting, let open associations finish (``linger`` s), finish the input being scored and the
        group being sent; the rest stays in the spool."""
        self._closing = True
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._ae is not None:
            deadline = time.monotonic() + linger
            while self._ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in self._ae.active_associations:
                assoc.abort()
        self.stopping.set()
        self.sender.wake.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
