"""The bad-input sweep: what a careless or hostile user tries on the CLI and the API, counted.

Every CLI case runs ``python -m boneage ...`` as a subprocess and is judged by its exit code (0, 1 or 2
expected; 128+ or a signal is a native crash) and its stderr (``Traceback`` is a traceback). Every API case
is a request to the app (in-process) and is judged by its status (5xx is a failure). Live-socket cases (a
stalled upload, a chunked upload over the limit) run against ``boneage serve``. Writes
``results/sweep.json``::

    python -m benchmarks.sweep
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.common import DEFAULT_OUT_DIR, REPO_ROOT, free_port, hardware_info, log, write_result
from boneage.data.synth import render_phantom

sys.path.insert(0, str(REPO_ROOT / "tests"))
from dicom_fixtures import hand_pixels, make_dicom  # noqa: E402
from helpers_predict import make_checkpoint  # noqa: E402

OVERRIDES = ["preprocess.clahe_tile=0", "train.epochs=0", "train.batch_size=-4", "train.lr=-1", "preprocess.size=0",
             "data.limit=-5", "train.max_minutes=-1", "train.optimizer=adamx", "model.name=resnet9000",
             "train.engine=tpu", "augment.level=max", "data.val_fraction=2", "train.nope=1", "nosection.x=1",
             "train.epochs", "=3", "train.lr=abc", "train.epochs=1e400", "data.n_folds=3 data.fold=5",
             "model.dropout=1.5", "train.ema_decay=1", "preprocess.clahe_clip_limit=-1", "train.num_threads=-2",
             "train.seed=x", "model.width=0", "train.warmup_pct=2"]


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _files(folder: Path) -> dict[str, Path]:
    """Bad and odd inputs for ``predict``, each a file."""
    good = hand_pixels(300, 240, bits=8)
    files = {"good": _png(folder / "good.png", good)}
    data = files["good"].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "random.jpg").write_bytes(os.urandom(2000))
    _png(folder / "bomb.png", np.zeros((9999, 9999), np.uint8))
    _png(folder / "blank.png", np.full((300, 300), 90, np.uint8))
    _png(folder / "tiny.png", good[:60, :60])
    _png(folder / "noise.png", np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8))
    Image.fromarray(np.full((300, 300, 3), (200, 150, 120), np.uint8)).save(folder / "photo.jpg")
    _png(folder / "=HYPERLINK(1).png", good)
    _png(Path(os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9.png")), good)
    make_dicom(folder / "ok.dcm")
    make_dicom(folder / "nopixels.dcm", pixel_data=False)
    make_dicom(folder / "window0.dcm", window=(100.0, 0.0))
    for name, tag_value in (("frames", ("NumberOfFrames", "abc")), ("rows", ("Rows", [2, 3])),
                            ("bits", ("BitsStored", 40))):
        path = make_dicom(folder / f"{name}.dcm")
        import pydicom

        ds = pydicom.dcmread(path)
        try:
            setattr(ds, *tag_value)
            ds.save_as(path)
        except Exception:  # noqa: BLE001 - pydicom refusing to write it is fine: the file stays valid
            pass
    make_dicom(folder / "born-after.dcm", birth_date="20250101", study_date="20230420")
    return {p.name: p for p in sorted(folder.iterdir())}


def _cli(args: list[str], cwd: Path) -> dict[str, Any]:
    try:
        proc = subprocess.run([sys.executable, "-m", "boneage", *args], cwd=cwd, capture_output=True, text=True,
                              errors="replace", timeout=300)
    except subprocess.TimeoutExpired:
        return {"args": args, "rc": None, "traceback": False, "crash": False, "stderr": "timed out after 300 s"}
    return {"args": args, "rc": proc.returncode, "traceback": "Traceback (most recent call last)" in proc.stderr,
            "crash": proc.returncode < 0 or proc.returncode >= 128,
            "stderr": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else ""}


def cli_cases(work: Path) -> list[dict[str, Any]]:
    files = _files(work / "files")
    ck = make_checkpoint(work / "m.pt")
    (work / "text.pt").write_text("not a checkpoint")
    (work / "an-existing-file").write_text("x")
    phantoms = work / "phantoms"  # a tiny labelled set: an override that is valid trains for seconds, not hours
    phantoms.mkdir()
    rng = np.random.default_rng(0)
    rows = ["id,boneage,male"]
    for i in range(16):
        _png(phantoms / f"{i}.png", render_phantom(12.0 + 12 * i, i % 2 == 0, rng))
        rows.append(f"{i},{12 + 12 * i},{i % 2 == 0}")
    labels = work / "phantoms.csv"
    labels.write_text("\n".join(rows) + "\n")
    bad_labels = {"missing-column": "id,boneage\n1,2\n", "negative": "id,boneage,male\ngood,-5,True\n",
                  "text-age": "id,boneage,male\ngood,abc,True\n",
                  "duplicate": "id,boneage,male\ngood,1,True\ngood,2,True\n",
                  "no-file": "id,boneage,male\nnothere,100,False\n", "empty": ""}
    cases = []
    for override in OVERRIDES:
        cases.append(["train", "--config", "cpu-small", "--images", str(phantoms), "--labels", str(labels),
                      "--out", str(work / f"run{len(cases)}"), "model.pretrained=false", "preprocess.size=64",
                      "train.epochs=1", f"data.cache_dir={work / 'cache'}", *override.split()])
    for name, text in bad_labels.items():
        path = work / f"{name}.csv"
        path.write_text(text)
        cases.append(["evaluate", "--checkpoint", str(ck), "--images", str(work / "files"), "--labels", str(path),
                      "--out", str(work / f"eval-{name}")])
    predict = ["predict", "--checkpoint", str(ck), "--no-tta", "--no-heatmap"]
    for name in files:
        cases.append([*predict, str(files[name]), "--out", str(work / "out")])
    cases += [
        [*predict, str(work / "files"), "--out", str(work / "out-all")],
        [*predict, str(files["good.png"]), "--chronological-age", "14"],
        [*predict, str(files["good.png"]), "--chronological-age", "9y15m"],
        [*predict, str(files["good.png"]), "--sex", "X"],
        [*predict, str(files["good.png"]), "--out", str(work / "an-existing-file")],
        [*predict, str(files["good.png"]), "--interval-level", "2"],
        [*predict, str(work / "nothing-*.png")],
        ["predict", "--checkpoint", str(work / "missing.pt"), str(files["good.png"])],
        ["predict", "--checkpoint", str(work / "text.pt"), str(files["good.png"])],
        ["predict", "--checkpoint", str(work / "m.onnx"), str(files["good.png"]), "--runtime", "onnx"],
        ["serve", "--checkpoint", str(ck), "--port", "99999"],
        ["serve", "--checkpoint", str(ck), "--port", "-1"],
        ["serve", "--checkpoint", str(ck), "--port", "abc"],
        ["serve", "--checkpoint", str(ck), "--workers", "0"],
        ["serve", "--checkpoint", str(ck), "--max-upload-mb", "-3"],
        ["export", "--checkpoint", str(work / "text.pt")],
        ["export", "--checkpoint", str(ck), "--opset", "7"],
        ["synth", "--out", str(work / "synth"), "--n", "-3"],
        ["nosuchcommand"],
        ["train", "--config", "nosuchconfig"],
    ]
    results = []
    for args in cases:
        results.append(_cli(args, work))
    return results


def api_cases(ck: Path) -> list[dict[str, Any]]:
    from fastapi.testclient import TestClient

    from boneage.serve.app import ServiceOptions, create_app

    def png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    good = png(hand_pixels(300, 240, bits=8))
    noise = png(np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        dicoms = {name: make_dicom(Path(tmp) / f"{name}.dcm", **kw).read_bytes() for name, kw in {
            "ok": {}, "nopixels": {"pixel_data": False}, "window0": {"window": (100.0, 0.0)},
            "born-after": {"birth_date": "20250101", "study_date": "20230420"}}.items()}
    requests: list[tuple[str, dict[str, Any]]] = [
        ("no image", {"data": {"sex": "F"}}),
        ("empty file", {"files": {"image": ("a.png", b"", "image/png")}}),
        ("text as png", {"files": {"image": ("a.png", b"hello", "image/png")}}),
        ("random bytes", {"files": {"image": ("a.bin", os.urandom(500), "application/octet-stream")}}),
        ("truncated png", {"files": {"image": ("a.png", good[: len(good) // 2], "image/png")}}),
        ("bomb png", {"files": {"image": ("b.png", png(np.zeros((9999, 9999), np.uint8)), "image/png")}}),
        ("noise", {"files": {"image": ("n.png", noise, "image/png")}}),
        ("bare age", {"files": {"image": ("a.png", good, "image/png")}, "data": {"chronological_age": "14"}}),
        ("bad age", {"files": {"image": ("a.png", good, "image/png")}, "data": {"chronological_age": "9y15m"}}),
        ("months text", {"files": {"image": ("a.png", good, "image/png")}, "data": {"chronological_age_months": "x"}}),
        ("both ages", {"files": {"image": ("a.png", good, "image/png")},
                       "data": {"chronological_age": "9y", "chronological_age_months": "108"}}),
        ("bad sex", {"files": {"image": ("a.png", good, "image/png")}, "data": {"sex": "X"}}),
        ("bad right_hand", {"files": {"image": ("a.png", good, "image/png")}, "data": {"right_hand": "maybe"}}),
        ("odd file name", {"files": {"image": ("../../\u202e=cmd.png", good, "image/png")}}),
        ("too large", {"files": {"image": ("a.png", good + os.urandom(2 * 1024 * 1024), "image/png")}}),
        ("cross-site", {"files": {"image": ("a.png", good, "image/png")},
                        "headers": {"Origin": "http://evil.example"}}),
        ("rebinding host", {"files": {"image": ("a.png", good, "image/png")}, "headers": {"Host": "evil.example"}}),
        ("raw garbage multipart", {"content": os.urandom(300),
                                   "headers": {"Content-Type": "multipart/form-data; boundary=x"}}),
        ("json body", {"json": {"image": "x"}}),
        ("good", {"files": {"image": ("a.png", good, "image/png")}, "data": {"sex": "F", "chronological_age": "9y"}}),
    ] + [(f"dicom {name}", {"files": {"image": (f"{name}.dcm", data, "application/dicom")}})
         for name, data in dicoms.items()]
    app = create_app(ServiceOptions([ck], threads=1, warmup=False, max_upload_mb=2),
                     allowed_hosts=["testserver", "127.0.0.1"])
    results = []
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            for name, kwargs in requests:
                r = client.post("/api/v1/predict", **kwargs)
                results.append({"case": name, "status": r.status_code,
                                "detail": "" if r.status_code == 200 else str(r.json().get("detail", ""))[:200]})
            for path in ("/api/v1/report/nothere.html", "/api/v1/report/../../etc/passwd", "/docs", "/nope"):
                r = client.get(path)
                results.append({"case": f"GET {path}", "status": r.status_code, "detail": ""})
    finally:
        app.state.service.close()
    return results


def socket_cases(ck: Path) -> list[dict[str, Any]]:
    """A stalled upload (Content-Length larger than the body) and a chunked upload over the limit, live."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "boneage", "serve", "--checkpoint", str(ck), "--port", str(port),
                               "--max-upload-mb", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = []
    try:
        for _ in range(600):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        time.sleep(1)
        head = (f"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n")
        for name, request in (("stalled upload", head + "Content-Length: 100000\r\n\r\n--b\r\n"),
                              ("chunked over the limit", head + "Transfer-Encoding: chunked\r\n\r\n")):
            with socket.create_connection(("127.0.0.1", port), timeout=120) as conn:
                start = time.monotonic()
                conn.sendall(request.encode())
                if "chunked" in name:
                    chunk = os.urandom(256 * 1024)
                    try:
                        for _ in range(8):
                            conn.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    except OSError:
                        pass
                reply = conn.recv(4096).decode("latin-1")
                status = int(reply.split()[1]) if reply.startswith("HTTP/") else 0
                results.append({"case": name, "status": status, "seconds": round(time.monotonic() - start, 1),
                                "detail": reply.split("\r\n\r\n", 1)[-1][:200]})
    finally:
        server.terminate()
        server.wait(timeout=30)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="boneage-sweep-") as tmp:
        work = Path(tmp)
        (work / "files").mkdir()
        start = time.monotonic()
        cli = cli_cases(work)
        log(f"CLI: {len(cli)} cases in {time.monotonic() - start:.0f} s")
        api = api_cases(work / "m.pt")
        live = socket_cases(work / "m.pt")
    http = api + live
    result = {
        "name": "sweep", "mode": "full",
        "cli_cases": len(cli), "cli_tracebacks": sum(c["traceback"] for c in cli),
        "cli_native_crashes": sum(c["crash"] for c in cli),
        "cli_unexpected_exit_codes": sum(c["rc"] not in (0, 1, 2) for c in cli),
        "cli_timeouts": sum(c["rc"] is None for c in cli),
        "api_cases": len(http), "api_5xx": sum(c["status"] >= 500 for c in http),
        "api_no_answer": sum(c["status"] == 0 for c in http),
        "stalled_upload_seconds": next(c["seconds"] for c in live if c["case"] == "stalled upload"),
        "stalled_upload_status": next(c["status"] for c in live if c["case"] == "stalled upload"),
        "chunked_over_limit_status": next(c["status"] for c in live if c["case"] == "chunked over the limit"),
        "cli": cli, "api": http,
    }
    write_result(args.out, "sweep", result, hardware_info())
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}, indent=2))
    bad = [c for c in cli if c["traceback"] or c["crash"] or c["rc"] not in (0, 1, 2)]
    bad += [c for c in http if c["status"] >= 500 or c["status"] == 0]
    for c in bad:
        print("FAILED:", json.dumps(c)[:400])
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
