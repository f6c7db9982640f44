"""``boneage dicom-node``: a real C-STORE SCP fed by dcmtk's ``storescu`` and pynetdicom, scoring into a real Orthanc
(``tests/orthanc.py``): the round trip and its latency, every kind of bad input and peer, a destination that is
down (dead-letter/, retried at the next start) and SIGTERM while busy (nothing lost)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pydicom
import pytest
from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation, generate_uid

from boneage.errors import BoneAgeError
from dicom_fixtures import LEAK_STRINGS, hand_pixels, make_dicom
from helpers_predict import make_checkpoint
from orthanc import free_port, need, orthanc  # noqa: F401  (orthanc: a fixture)

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

from boneage.dicom.forward import Destination  # noqa: E402
from boneage.dicom.node import NodeOptions  # noqa: E402
from boneage.dicom.scp import TOO_LARGE, DicomNode  # noqa: E402

NODE, ALLOWED = "BONEAGE", "ALLOWED"
SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.7"
BONE_AGE_LOINC = "37362-1"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small gated checkpoint, its predictor (no TTA, CPU) and a pseudonym key, shared by the module."""
    from boneage.inference.batch import load_predictor

    root = tmp_path_factory.mktemp("node-model")
    checkpoint = make_checkpoint(root / "a.pt")
    key = root / "pseudonym.key"
    key.write_bytes(os.urandom(32))
    return {"checkpoint": checkpoint, "key": key,
            "predictor": load_predictor([checkpoint], tta=False, device="cpu")}


@pytest.fixture
def node_log() -> Iterator[io.StringIO]:
    """What the node logs (INFO and up), whatever handlers ``boneage.cli`` set on the ``boneage`` logger."""
    logger, text = logging.getLogger("boneage.dicom.node"), io.StringIO()
    handler, level = logging.StreamHandler(text), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield text
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _options(model: dict[str, Any], spool: Path, destination: str, **kw: Any) -> NodeOptions:
    return NodeOptions(checkpoints=[str(model["checkpoint"])], ae_title=NODE, port=0, allow=[ALLOWED],
                       destination=destination, spool=str(spool), tta=False, device="cpu",
                       pseudonym_key=str(model["key"]), **kw)


@contextlib.contextmanager
def running(model: dict[str, Any], spool: Path, destination: str, **kw: Any) -> Iterator[DicomNode]:
    node = DicomNode(_options(model, spool, destination, **kw), predictor=model["predictor"])
    node.start()
    try:
        yield node
    finally:
        node.stop(linger=0.5)


def wait_for(what: Callable[[], Any], timeout: float = 30.0, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def scu(calling: str = ALLOWED) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class in (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation):
        ae.add_requested_context(sop_class)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae


def store(port: int, *datasets: Any, calling: str = ALLOWED) -> list[int]:
    """C-STORE with pynetdicom; the status of each (-1: none)."""
    assoc = scu(calling).associate("127.0.0.1", port, ae_title=NODE)
    assert assoc.is_established
    try:
        return [int(getattr(assoc.send_c_store(ds), "Status", -1)) for ds in datasets]
    finally:
        assoc.release()


def echo(port: int) -> int:
    assoc = scu().associate("127.0.0.1", port, ae_title=NODE)
    assert assoc.is_established
    status = int(assoc.send_c_echo().Status)
    assoc.release()
    return status


def storescu(port: int, *paths: Path, calling: str = ALLOWED) -> None:
    subprocess.run(["storescu", "-aet", calling, "-aec", NODE, "127.0.0.1", str(port), *map(str, paths)],
                   check=True, capture_output=True, timeout=60)


def numbers(items: Any) -> Iterator[tuple[str, float]]:
    for item in items:
        if item.ValueType == "NUM":
            yield item.ConceptNameCodeSequence[0].CodeValue, float(item.MeasuredValueSequence[0].NumericValue)
        yield from numbers(getattr(item, "ContentSequence", []))


def stored(server: Any) -> dict[str, list[dict[str, Any]]]:
    """Orthanc's instances by kind: {"sr": [...], "sc": [...]} (each with its MainDicomTags and id)."""
    found: dict[str, list[dict[str, Any]]] = {"sr": [], "sc": []}
    for instance in server.instances():
        ds = pydicom.dcmread(io.BytesIO(server.file(instance["ID"])))
        kind = "sr" if ds.SOPClassUID.startswith(SR_CLASS) else "sc" if ds.SOPClassUID == SC_CLASS else "other"
        found.setdefault(kind, []).append({"id": instance["ID"], "ds": ds})
    return found


def hand(path: Path, seed: int = 0, **kw: Any) -> Path:
    return make_dicom(path, hand_pixels(seed=seed), **kw)


# --- in-process ----------------------------------------------------------------------------------------


def test_a_study_goes_round_trip_and_the_sr_holds_what_predict_says(model, orthanc, tmp_path, node_log):  # noqa: F811
    """storescu -> node -> SR + SC in Orthanc, in the source's study; the SR's bone age is predict's."""
    need("storescu")
    from boneage.inference.batch import predict_file

    source = hand(tmp_path / "hand.dcm", seed=4)
    spool = tmp_path / "spool"
    with running(model, spool, f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}") as node:
        started = time.perf_counter()
        storescu(node.port, source)
        wait_for(lambda: stored(orthanc)["sr"], every=0.02)
        latency = time.perf_counter() - started
        print(f"\ndicom-node round trip (storescu start -> SR visible in Orthanc): {latency:.2f} s")
        found = wait_for(lambda: (lambda f: f if f["sc"] else None)(stored(orthanc)))
    expected = predict_file(model["predictor"], source, heatmap=False)
    original = pydicom.dcmread(source)
    (sr,), (sc,) = found["sr"], found["sc"]
    assert sr["ds"].StudyInstanceUID == sc["ds"].StudyInstanceUID == original.StudyInstanceUID
    assert sr["ds"].PatientID == original.PatientID  # results belong in the patient's record
    ages = [v for code, v in numbers(sr["ds"].ContentSequence) if code == BONE_AGE_LOINC]
    assert ages == [pytest.approx(expected["bone_age_months"], abs=1e-6)]
    assert not list((spool / "incoming").iterdir()) and not list((spool / "outgoing").iterdir())
    assert latency < 30
    for secret in (*LEAK_STRINGS, original.SOPInstanceUID, original.StudyInstanceUID):
        assert secret not in node_log.getvalue()


def test_bad_inputs_and_peers_are_refused_while_the_node_stays_up(model, tmp_path, node_log):
    noise = make_dicom(tmp_path / "noise.dcm", np.random.default_rng(1).integers(0, 256, (300, 300), dtype=np.uint8),
                       bits_stored=8)  # the out-of-distribution gate refuses it (tests/test_ood.py)
    chest = make_dicom(tmp_path / "chest.dcm", modality="CR", body_part="CHEST")
    ds = pydicom.dcmread(chest)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.save_as(chest, enforce_file_format=True)
    cut = hand(tmp_path / "cut.dcm")
    cut.write_bytes(cut.read_bytes()[:-5000])
    big = make_dicom(tmp_path / "big.dcm", hand_pixels(600, 500))
    spool = tmp_path / "spool"
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (noise, chest, cut, big)]
    dead = f"PACS@127.0.0.1:{free_port()}"  # nothing is sent: every input is refused
    with running(model, spool, dead, max_bytes=200_000) as node:
        assert echo(node.port) == 0
        statuses = store(node.port, *(pydicom.dcmread(p) for p in (noise, chest, cut, big)))
        assert statuses == [0, 0, 0, TOO_LARGE]  # the first three are spooled and scored; the big one is not
        wait_for(lambda: len(list((spool / "refused").glob("*.json"))) == 3)
        rejected = scu("STRANGER").associate("127.0.0.1", node.port, ae_title=NODE)
        assert rejected.is_rejected
        _half_association(node.port)
        _half_p_data(node.port)
        assert echo(node.port) == 0  # still up
        assert node.refused == 3 and node.scored == 0
    reasons = sorted(json.loads(p.read_text())["reason"] for p in (spool / "refused").glob("*.json"))
    assert reasons == ["header: body part CHEST", "out of distribution", "unreadable"], reasons
    assert "'STRANGER'" in node_log.getvalue() and "not in --allow" in node_log.getvalue()
    assert not list((spool / "incoming").iterdir())
    for secret in (*LEAK_STRINGS, *uids):
        assert secret not in node_log.getvalue()
        assert not any(secret in p.read_text() for p in (spool / "refused").glob("*.json"))


def _half_association(port: int) -> None:
    """A peer that sends half an A-ASSOCIATE-RQ and hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x01\x00\x00\x00\x01\x00\x00\x01\x00\x00BONEAGE  ")


def _half_p_data(port: int) -> None:
    """A peer that opens an association, sends half a P-DATA-TF PDU and hangs up."""
    assoc = scu().associate("127.0.0.1", port, ae_title=NODE)
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(b"\x04\x00" + (4000).to_bytes(4, "big") + (3996).to_bytes(4, "big") + b"\x01\x00" + b"\x00" * 200)
    raw.shutdown(socket.SHUT_RDWR)
    assoc.kill()


def test_a_peer_that_sends_far_past_the_limit_is_aborted(model, tmp_path, node_log):
    """More than twice --max-bytes (plus a PDU) in one message: A-ABORT before it is all in memory."""
    big = pydicom.dcmread(make_dicom(tmp_path / "big.dcm", hand_pixels(600, 500)))  # 600 kB
    with running(model, tmp_path / "spool", f"PACS@127.0.0.1:{free_port()}", max_bytes=2048) as node:
        assoc = scu().associate("127.0.0.1", node.port, ae_title=NODE)
        assert int(getattr(assoc.send_c_store(big), "Status", -1)) == -1  # no answer: aborted
        assert echo(node.port) == 0
    assert "aborted after" in node_log.getvalue()
    assert not list((tmp_path / "spool" / "incoming").iterdir())


def test_the_queue_bound_answers_out_of_resources(model, tmp_path):
    """Scorer busy, queue (of 1) full: 0xA700, and the sender keeps the instance; what was acknowledged is on disk."""
    spool = tmp_path / "spool"
    gate = threading.Event()
    files = [pydicom.dcmread(hand(tmp_path / f"h{i}.dcm", seed=i)) for i in range(4)]
    with running(model, spool, f"PACS@127.0.0.1:{free_port()}", queue_size=1) as node:
        node.score = lambda path: gate.wait(10)  # type: ignore[method-assign]  # a scorer that is busy
        assert store(node.port, files[0]) == [0]
        wait_for(node.queue.empty)  # the scorer holds it
        statuses = store(node.port, *files[1:])
        gate.set()
    assert statuses == [0, 0xA700, 0xA700]
    assert len(list((spool / "incoming").glob("*.dcm"))) == 2


# --- subprocess: a destination that is down, SIGTERM, restart ----------------------------------------------


class NodeProcess:
    """``python -m boneage dicom-node`` in a subprocess; its port from the line it prints."""

    def __init__(self, model: dict[str, Any], spool: Path, destination: str, *extra: str) -> None:
        args = [sys.executable, "-m", "boneage", "dicom-node", "--checkpoint", str(model["checkpoint"]),
                "--ae-title", NODE, "--port", "0", "--allow", f"OTHER,{ALLOWED}", "--destination", destination,
                "--spool", str(spool), "--no-tta", "--device", "cpu", "--pseudonym-key", str(model["key"]), *extra]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        line = self.process.stdout.readline()  # type: ignore[union-attr]
        assert "listening on" in line, line + self.process.stderr.read()  # type: ignore[union-attr]
        self.port = int(line.split("listening on ")[1].split(";")[0].rsplit(":", 1)[1])

    def stop(self) -> tuple[int, str, str]:
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=60)
        return self.process.returncode, out, err


def test_dead_letter_and_sigterm_lose_nothing_and_a_restart_sends_it_all(model, orthanc, tmp_path):  # noqa: F811
    need("storescu")
    spool = tmp_path / "spool"
    files = [hand(tmp_path / f"hand{i}.dcm", seed=10 + i) for i in range(5)]
    first = NodeProcess(model, spool, f"PACS@127.0.0.1:{free_port()}", "--retries", "1", "--retry-delay", "0.1")
    storescu(first.port, files[0])
    wait_for(lambda: list((spool / "dead-letter").iterdir()), timeout=60)
    storescu(first.port, *files[1:])  # acknowledged = on disk; then SIGTERM while the scorer is busy
    code, out, err = first.stop()
    assert code == 0, err
    held = [*(spool / "incoming").glob("*.dcm"), *(spool / "outgoing").iterdir(), *(spool / "dead-letter").iterdir()]
    assert len(held) == 5, (held, out)  # every acknowledged instance is in exactly one place
    assert "left to do" in out

    second = NodeProcess(model, spool, f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}")
    found = wait_for(lambda: (lambda f: f if len(f["sr"]) == len(f["sc"]) == 5 else None)(stored(orthanc)),
                     timeout=60, every=0.25)
    code, out2, err2 = second.stop()
    assert code == 0, err2
    studies = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in files}
    assert {x["ds"].StudyInstanceUID for x in found["sr"]} == studies
    assert all(not list((spool / d).iterdir()) for d in ("incoming", "outgoing", "dead-letter", "refused"))
    assert "dead-letter" in err and "moved to dead-letter/" in err
    for secret in (*LEAK_STRINGS, *studies):
        assert secret not in err + out + err2 + out2


# --- options ------------------------------------------------------------------------------------------------


def test_the_cli_hands_one_typed_options_object_to_the_node(monkeypatch):
    from boneage import cli
    from boneage.dicom import node

    seen: dict[str, NodeOptions] = {}
    monkeypatch.setattr(node, "run_node", lambda options: seen.update(options=options) or 0)
    base = ["dicom-node", "--checkpoint", "m.pt", "--ae-title", "BONEAGE", "--port", "104", "--allow", "A,B",
            "--allow", "C", "--destination", "PACS@pacs.local:4242", "--spool", "spool"]
    assert cli.main(base) == 0
    assert seen["options"] == NodeOptions(checkpoints=["m.pt"], ae_title="BONEAGE", port=104, allow=["A,B", "C"],
                                          destination="PACS@pacs.local:4242", spool="spool")
    assert seen["options"].checked().allow == ["A", "B", "C"]
    assert cli.main([*base, "--bind", "0.0.0.0", "--max-bytes", "5000", "--retries", "0", "--no-tta",
                     "--heatmap", "--device", "cpu"]) == 0
    o = seen["options"]
    assert (o.bind, o.max_bytes, o.retries, o.tta, o.heatmap, o.device) == ("0.0.0.0", 5000, 0, False, True, "cpu")


@pytest.mark.parametrize("field, value, message", [
    ("destination", "PACS@host", "AET@HOST:PORT"), ("destination", "pacs:104", "AET@HOST:PORT"),
    ("ae_title", "A" * 17, "--ae-title"), ("allow", ["BAD\\AET"], "--allow"), ("allow", [" , "], "--allow")])
def test_bad_options_name_the_flag(field, value, message):
    options = NodeOptions(checkpoints=["m.pt"], ae_title="BONEAGE", port=0, allow=["A"],
                          destination="PACS@127.0.0.1:104", spool="s")
    with pytest.raises(BoneAgeError, match=message):
        dataclasses.replace(options, **{field: value}).checked()
    assert str(Destination.parse("PACS@[::1]:104")) == "PACS@[::1]:104"


def test_a_fresh_uid_never_names_a_spool_file(model, tmp_path):
    """Spool names are pseudonyms: no UID in any path under the spool."""
    uid = generate_uid()
    spool = tmp_path / "spool"
    with running(model, spool, f"PACS@127.0.0.1:{free_port()}") as node:
        ds = pydicom.dcmread(hand(tmp_path / "h.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        assert store(node.port, ds) == [0]
        names = [str(p.relative_to(spool)) for p in spool.rglob("*")]
    assert not any(uid in n for n in names)
