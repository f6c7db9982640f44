"""The DICOM node's sender: C-STORE each result group in the spool's outgoing/ to the destination, with retries.

A group (the SR and Secondary Capture of one input) is sent over one association; each file is deleted as soon as
the destination answers success or a warning, so a retry sends only what is left. A failed attempt (no
association, a failure status, a lost connection) is retried ``retries`` times with exponential backoff
(``retry_delay``, 2x, 4x... seconds); a group that still fails moves to ``dead-letter/``, which the node moves back to
``outgoing/`` at its next start. Stopping interrupts a backoff wait, never a send: the group stays in outgoing/.
Log lines name the group (the input's pseudonym), the destination and the status, never a UID.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from boneage.dicom.spool import Spool, group_files, redact
from boneage.errors import BoneAgeError

log = logging.getLogger("boneage.dicom.node")

# Outcomes of a C-STORE that mean the destination has the object: success and the Bxxx warnings
_WARNINGS = range(0xB000, 0xC000)
_AE_TITLE = re.compile(r"^[^\\\x00-\x1f\x7f]{1,16}$")


def check_ae_title(text: str, what: str) -> str:
    """An AE title (1-16 characters, no backslash or control character, not only spaces), stripped; else
    ``BoneAgeError`` naming ``what`` (the flag)."""
    title = text.strip()
    if not title or not _AE_TITLE.match(title):
        raise BoneAgeError(f"{what}: {text!r} is not an AE title (1 to 16 characters, no backslash or control "
                           "characters)")
    return title


@dataclass(frozen=True)
class Destination:
    """Where results go: a C-STORE SCP's AE title, host and port (``AET@HOST:PORT``)."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``AET@HOST:PORT`` (an IPv6 host in brackets: ``PACS@[::1]:104``); ``BoneAgeError`` if malformed."""
        aet, at, address = text.rpartition("@")
        host, colon, port = address.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not (at and colon and host and port.isdigit() and 0 < int(port) < 65536):
            raise BoneAgeError(f"--destination: {text!r} is not AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242)")
        return cls(check_ae_title(aet, "--destination"), host, int(port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


class Sender:
    """Sends the spool's outgoing groups to ``destination`` as ``ae_title`` until ``stop`` is set (``run``)."""

    def __init__(self, spool: Spool, destination: Destination, ae_title: str, *, retries: int = 3,
                 retry_delay: float = 1.0, stop: threading.Event | None = None, timeout: float = 30.0) -> None:
        self.spool, self.destination, self.ae_title = spool, destination, ae_title
        self.retries, self.retry_delay, self.timeout = retries, retry_delay, timeout
        self.stop = stop or threading.Event()
        self.wake = threading.Event()  # set when a new group is written
        self.sent = self.dead = 0

    def run(self) -> None:
        """The sender thread: every group in outgoing/, oldest first; then wait for more (or 1 s)."""
        while not self.stop.is_set():
            groups = self.spool.groups()
            if not groups:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            for group in groups:
                if self.stop.is_set():
                    return
                self.deliver(group)

    def deliver(self, group: Path) -> bool:
        """Send one group with retries; on giving up move it to dead-letter/. Whether it was delivered."""
        delay = self.retry_delay
        for attempt in range(self.retries + 1):
            error = self.send(group)
            if error is None:
                shutil.rmtree(group, ignore_errors=True)
                self.sent += 1
                log.info("%s: results stored on %s", group.name, self.destination)
                return True
            if attempt == self.retries:
                break
            log.warning("%s: sending to %s failed (%s); retry %d of %d in %.1f s", group.name, self.destination,
                        error, attempt + 1, self.retries, delay)
            if self.stop.wait(delay):
                return False  # stopping: the group stays in outgoing/ for the next start
            delay *= 2
        self.spool.to_dead_letter(group)
        self.dead += 1
        log.error("%s: %s did not take the results after %d attempts (%s); moved to dead-letter/ (retried at the "
                  "next start)", group.name, self.destination, self.retries + 1, error)
        return False

    def send(self, group: Path) -> str | None:
        """One attempt: C-STORE what is left of ``group`` over one association; None, or what went wrong."""
        from pydicom import dcmread
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        files = list(group_files(group))
        if not files:
            return None
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(10.0, self.timeout)
        try:
            for path in files:
                meta = dcmread(path, stop_before_pixels=True).file_meta
                syntaxes = list(dict.fromkeys([meta.TransferSyntaxUID, ExplicitVRLittleEndian,
                                               ImplicitVRLittleEndian]))
                if meta.MediaStorageSOPClassUID not in {c.abstract_syntax for c in ae.requested_contexts}:
                    ae.add_requested_context(meta.MediaStorageSOPClassUID, syntaxes)
        except Exception as exc:  # noqa: BLE001 - a damaged result file: dead-letter it, with the reason
            return f"unreadable result file ({type(exc).__name__})"
        assoc = ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title)
        if not assoc.is_established:
            return "association rejected" if assoc.is_rejected else "destination unreachable or aborted"
        try:
            for path in files:
                status = assoc.send_c_store(path)
                code = int(getattr(status, "Status", -1))
                if code == -1:
                    return "no response (connection lost or timed out)"
                if code != 0 and code not in _WARNINGS:
                    comment = redact(str(getattr(status, "ErrorComment", "") or ""))[:80]
                    return f"status 0x{code:04X}" + (f": {comment}" if comment else "")
                path.unlink(missing_ok=True)
        except Exception as exc:  # noqa: BLE001 - whatever the network does, the group stays for a retry
            assoc.abort()
            return f"{type(exc).__name__}: {redact(str(exc))[:80]}"
        assoc.release()
        return None
