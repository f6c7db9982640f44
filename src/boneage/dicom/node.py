"""``boneage dicom-node``: its typed options (``NodeOptions``), its flags and the command that runs it.

The node itself (receiving, scoring, stopping) is ``boneage.dicom.scp.DicomNode``; its spool
``boneage.dicom.spool``; its sender ``boneage.dicom.forward``. ``docs/pacs.md`` ("The DICOM node") has the
conformance statement. Needs the ``[pacs]`` extra (pynetdicom, highdicom).
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
from typing import Callable, Sequence

from boneage.cli_types import int_in, interval_level, log_to_stderr, options_from_args, out_folder, positive_float
from boneage.dicom.forward import Destination, check_ae_title
from boneage.errors import BoneAgeError

SUMMARY = "a DICOM node: score the hand radiographs sent to it (C-STORE), send the results on (docs/pacs.md)"
EXAMPLES = """examples:
  boneage dicom-node --checkpoint best.pt --ae-title BONEAGE --port 11112 --allow MODALITY1,PACS \\
      --destination ORTHANC@127.0.0.1:4242 --spool /var/spool/boneage
  storescu -aet MODALITY1 -aec BONEAGE 127.0.0.1 11112 hand.dcm       # send it a radiograph (dcmtk)

SIGTERM or Ctrl+C stops it; what is not done stays in the spool and is done at the next start, dead-letter/ too."""


@dataclasses.dataclass(frozen=True)
class NodeOptions:
    """Everything ``boneage dicom-node`` does, typed: the CLI builds one from its flags (same names)."""

    checkpoints: Sequence[str]
    ae_title: str
    port: int  # 0: a free port (printed)
    allow: Sequence[str]  # calling AE titles accepted
    destination: str  # AET@HOST:PORT
    spool: str
    bind: str = "127.0.0.1"
    max_bytes: int = 100_000_000  # per instance
    queue_size: int = 32  # received instances waiting for the scorer; more get 0xA700
    max_associations: int = 4
    retries: int = 3  # extra attempts per result group, with exponential backoff
    retry_delay: float = 1.0  # seconds before the first retry
    tta: bool = True
    heatmap: bool = False
    interval_level: float = 0.9  # boneage.inference.conformal.DEFAULT_LEVEL (not imported: the CLI parses fast)
    ood_check: bool = True
    header_check: bool = True
    device: str = "auto"
    precision: str = "fp32"
    pseudonym_key: str | None = None

    def checked(self) -> NodeOptions:
        """These options with the AE titles validated (``BoneAgeError`` naming the flag)."""
        allow = [check_ae_title(t, "--allow") for item in self.allow for t in item.split(",") if t.strip()]
        if not allow:
            raise BoneAgeError("--allow: give the calling AE titles that may send (e.g. --allow MODALITY1,PACS)")
        Destination.parse(self.destination)
        if self.max_bytes < 1024:
            raise BoneAgeError(f"--max-bytes: {self.max_bytes} is too small; give at least 1024")
        return dataclasses.replace(self, ae_title=check_ae_title(self.ae_title, "--ae-title"), allow=allow)


def run_node(options: NodeOptions) -> int:
    """``boneage dicom-node``: run until SIGTERM or SIGINT, then stop cleanly (module doc)."""
    import signal

    from boneage.dicom.scp import DicomNode

    node = DicomNode(options)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        port = node.start()
        o = node.options
        print(f"boneage dicom-node: {o.ae_title} listening on {o.bind}:{port}; accepts {', '.join(o.allow)}; "
              f"results to {node.destination}; spool {o.spool}", flush=True)
        while not stop.wait(0.5):
            pass
        print("boneage dicom-node: stopping (the spool keeps what is not done)", flush=True)
    finally:
        node.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    counts = node.spool.counts()
    print(f"boneage dicom-node: stopped; scored {node.scored}, refused {node.refused}, sent {node.sender.sent}; "
          f"left to do: {counts['incoming']} input(s), {counts['outgoing']} result group(s), "
          f"{counts['dead-letter']} in dead-letter/", flush=True)
    return 0


def add_arguments(p: argparse.ArgumentParser, device_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """The flags of ``boneage dicom-node`` (``device_args`` adds --device and --precision); runs ``main``."""
    p.add_argument("--checkpoint", required=True, action="append", metavar="PT",
                   help="checkpoint .pt (repeat for an ensemble)")
    p.add_argument("--ae-title", required=True, metavar="AET", help="this node's AE title (callers must call it)")
    p.add_argument("--port", required=True, type=int_in(0, 65535), metavar="N",
                   help="DICOM port to listen on (0: a free one, printed)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDRESS",
                   help="address to listen on; 127.0.0.1 = this machine only")
    p.add_argument("--allow", required=True, action="append", metavar="AET[,AET...]",
                   help="calling AE titles that may send (repeatable); other associations are rejected")
    p.add_argument("--destination", required=True, metavar="AET@HOST:PORT",
                   help="the C-STORE SCP (e.g. the PACS) that receives the SR and Secondary Capture")
    p.add_argument("--spool", required=True, type=out_folder, metavar="DIR",
                   help="folder for received instances and results until they are sent (patient data: keep it "
                        "private)")
    p.add_argument("--max-bytes", type=int_in(1024), default=100_000_000, metavar="N",
                   help="largest instance accepted; larger ones get failure status 0xC001")
    p.add_argument("--queue-size", type=int_in(1, 100_000), default=32, metavar="N",
                   help="received instances waiting to be scored; more get 0xA700 (out of resources: the sender "
                        "retries)")
    p.add_argument("--max-associations", type=int_in(1, 100), default=4, metavar="N",
                   help="associations at once; more are rejected")
    p.add_argument("--retries", type=int_in(0, 100), default=3, metavar="N",
                   help="retries of a failed send (exponential backoff), then dead-letter/ (retried at start)")
    p.add_argument("--retry-delay", type=positive_float, default=1.0, metavar="S",
                   help="seconds before the first retry; each next one waits twice as long")
    p.add_argument("--no-tta", dest="tta", action="store_false", default=True,
                   help="switch test-time augmentation off (faster)")
    p.add_argument("--heatmap", action="store_true", help="Grad-CAM heatmap in the Secondary Capture (slower)")
    p.add_argument("--interval-level", type=interval_level, default=0.9, metavar="P",
                   help="coverage of the conformal prediction interval, e.g. 0.9 or 90%%")
    p.add_argument("--no-ood-check", dest="ood_check", action="store_false", default=True,
                   help="score images that the model's out-of-distribution check refuses (with a warning)")
    p.add_argument("--no-header-check", dest="header_check", action="store_false", default=True,
                   help="score DICOMs whose Modality or BodyPartExamined say they are no hand radiograph")
    p.add_argument("--pseudonym-key", metavar="FILE",
                   help="the site's secret key for the pseudonyms that name instances in logs and the spool "
                        "(default: $BONEAGE_PSEUDONYM_KEY, else ~/.config/boneage/pseudonym.key)")
    device_args(p)
    p.add_argument("--verbose", "-v", action="store_true", help="also debug details")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """The ``boneage dicom-node`` command: ``NodeOptions`` from the parsed flags, log lines on stderr, run."""
    log_to_stderr(False, args.verbose)
    return run_node(options_from_args(NodeOptions, args, checkpoints=args.checkpoint, allow=args.allow))
