"""The web service (boneage.serve.app) through FastAPI's TestClient: records, errors, limits, privacy, concurrency,
the OpenAPI schema (schemathesis) and the `boneage serve` command. Small untrained checkpoints, phantom images."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis.checks import positive_data_acceptance

from boneage.cli import build_parser
from boneage.data.synth import render_phantom
from boneage.errors import BoneAgeError
from boneage.inference.batch import load_predictor, predict_file
from boneage.report import FIELDS
from boneage.serve import app as serve_app
from boneage.serve.app import PredictResponse, ReportRecord, ReportStore, ServiceOptions, create_app, display_name
from dicom_fixtures import LEAK_STRINGS, PATIENT_NAME, make_dicom
from helpers_predict import make_checkpoint

PREDICT = "/api/v1/predict"
WEB_ONLY = ("report_id", "report_html_url", "report_json_url", "heatmap_png_base64")
STATIC = Path(serve_app.__file__).parent / "static"


def phantom_png(age_months: float = 110.0, male: bool = True, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render_phantom(age_months, male, np.random.default_rng(seed))).save(buf, format="PNG")
    return buf.getvalue()


def png_bytes_of(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained bonenet_s (width 0.5, 96 px) saved like a trained one (validation MAE 9.5 months)."""
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "serve.pt")


@pytest.fixture(scope="module")
def app(serve_checkpoint):
    app = create_app(ServiceOptions([serve_checkpoint], threads=2, max_upload_mb=2))
    yield app
    app.state.service.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def png() -> bytes:
    return phantom_png()


def post(client, data: bytes, name: str = "hand.png", **fields):
    return client.post(PREDICT, files={"image": (name, data, "application/octet-stream")},
                       data={k: v for k, v in fields.items() if v is not None})


def plain(record: dict) -> dict:
    """The record without the per-request fields (report id, links)."""
    return {k: v for k, v in record.items() if k not in WEB_ONLY and k != "heatmap"}


# --- the record ---------------------------------------------------------------------------------------


def test_predict_png_record(client, png):
    r = post(client, png, "phantom 9y.png", sex="M", chronological_age="9y3m")
    assert r.status_code == 200, r.text
    rec = r.json()
    assert list(rec)[: len(FIELDS)] == list(FIELDS) and list(rec)[len(FIELDS):] == list(WEB_ONLY)
    assert rec["error"] is None and rec["file"] == "phantom 9y.png"
    assert math.isfinite(rec["bone_age_months"]) and 0 <= rec["bone_age_months"] <= 300
    assert rec["chronological_age_months"] == 111.0 and rec["chronological_age_source"] == "cli"
    assert rec["sex"] == "M" and rec["sex_source"] == "cli"
    assert rec["difference_months"] == pytest.approx(rec["bone_age_months"] - 111.0, abs=0.11)
    assert isinstance(rec["z_score"], float) and rec["category"] in ("delayed", "normal", "advanced")
    assert rec["summary"] and rec["model_mae_months"] == 9.5 and rec["tta"] is True
    assert rec["models"] == ["serve.pt"] and rec["architectures"] == ["bonenet_s"]
    assert rec["image"] == {"format": "png", "width": 256, "height": 320, "bit_depth": 8}
    assert rec["identifiers"] is None and "Research use only" in rec["disclaimer"]
    heatmap = Image.open(io.BytesIO(base64.b64decode(rec["heatmap_png_base64"])))
    assert heatmap.format == "PNG" and heatmap.size == (384, 384) and heatmap.mode == "RGB"
    # the kept report: HTML page, JSON record, heatmap PNG
    assert rec["heatmap"] == f"/api/v1/report/{rec['report_id']}/heatmap.png"
    page = client.get(rec["report_html_url"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert rec["bone_age_text"] in page.text and "Research use only" in page.text and "<script" not in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "attachment" in client.get(rec["report_html_url"] + "?download=true").headers["content-disposition"]
    kept = client.get(rec["report_json_url"]).json()
    assert kept == {k: v for k, v in rec.items() if k not in WEB_ONLY}
    # the OpenAPI documentation describes exactly these replies
    PredictResponse.model_validate(rec)
    ReportRecord.model_validate(kept)
    assert list(PredictResponse.model_fields) == list(rec) and list(ReportRecord.model_fields) == list(kept)
    png_reply = client.get(rec["heatmap"])
    assert png_reply.headers["content-type"] == "image/png"
    assert png_reply.content == base64.b64decode(rec["heatmap_png_base64"])


def test_same_record_as_boneage_predict(client, png, serve_checkpoint, tmp_path, monkeypatch):
    """The API and `boneage predict` (predict_file) give the same record for the same file."""
    monkeypatch.chdir(tmp_path)
    Path("phantom.png").write_bytes(png)
    predictor = load_predictor([serve_checkpoint], tta=True)
    cli_record = predict_file(predictor, Path("phantom.png"), sex="F", chronological_age="10y")
    api_record = post(client, png, "phantom.png", sex="F", chronological_age="10y").json()
    # the upload has no modification time; everything else is the same record
    assert plain(api_record) == {k: v for k, v in cli_record.items() if k != "heatmap"} | {"file_mtime_ns": None}


def test_unknown_sex_and_no_age(client, png):
    rec = post(client, png, sex="", chronological_age=" ").json()  # blank form fields = not given
    assert rec["sex"] is None and rec["sex_source"] == "unknown" and rec["z_score"] is None
    assert rec["category"] is None and any("sex unknown" in w for w in rec["warnings"])


def test_right_hand_is_mirrored(client, png):
    rec = post(client, png, right_hand="true", sex="M").json()
    assert rec["mirrored"] is True and any("mirrored" in w for w in rec["warnings"])


def test_dicom_upload_uses_header_and_leaks_no_identifiers(client, tmp_path, caplog):
    path = make_dicom(tmp_path / "hand.dcm", sex="F", age="009Y", study_date=None)
    caplog.set_level("DEBUG")
    r = post(client, path.read_bytes(), "hand.dcm")
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["image"]["format"] == "dicom" and rec["sex"] == "F" and rec["sex_source"] == "dicom"
    assert rec["chronological_age_months"] == 108.0 and rec["chronological_age_source"] == "dicom"
    assert rec["z_score"] is not None and rec["identifiers"] is None
    page = client.get(rec["report_html_url"]).text
    kept = client.get(rec["report_json_url"]).text
    for text in (PATIENT_NAME, *LEAK_STRINGS):
        assert text not in r.text and text not in page and text not in kept and text not in caplog.text


def test_dicom_without_suffix_or_preamble_name(client, tmp_path):
    """PACS exports often have no extension: the 'DICM' magic is enough."""
    path = make_dicom(tmp_path / "IM0001")
    assert post(client, path.read_bytes(), "IM0001").json()["image"]["format"] == "dicom"


# --- bad input: status and message ---------------------------------------------------------------------


def _truncated_png(png: bytes) -> bytes:
    return png[: len(png) // 2]


BAD_INPUTS = {
    # name: (file name, bytes or builder, form fields, status, words the detail must contain)
    "unsupported type": ("notes.txt", lambda png: b"just some text, not an image", {}, 415,
                         ["unsupported file type", "not a PNG, JPEG or DICOM"]),
    "pdf": ("scan.pdf", lambda png: b"%PDF-1.7\n" + b"0" * 200, {}, 415, ["unsupported file type"]),
    "corrupt png": ("hand.png", _truncated_png, {}, 422, ["unreadable image", "corrupt or truncated PNG"]),
    "empty file": ("hand.png", lambda png: b"", {}, 422, ["empty"]),
    "blank image": ("blank.png", lambda png: png_bytes_of(np.full((300, 240), 128, np.uint8)), {}, 422,
                    ["unusable image", "blank"]),
    "thumbnail": ("tiny.png", lambda png: png_bytes_of(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)), {},
                  422, ["unusable image", "64x64"]),
    "bad age": ("hand.png", lambda png: png, {"chronological_age": "9y15m"}, 422,
                ["invalid age '9y15m'", "months must be below 12"]),
    "negative age": ("hand.png", lambda png: png, {"chronological_age": "-3"}, 422, ["invalid age", "negative"]),
    "bad sex": ("hand.png", lambda png: png, {"sex": "X"}, 422, ["invalid sex 'X'"]),
    "bad right_hand": ("hand.png", lambda png: png, {"right_hand": "perhaps"}, 422, ["right_hand"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_status_and_message(client, png, case):
    name, build, fields, status, words = BAD_INPUTS[case]
    r = post(client, build(png), name, **fields)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert isinstance(detail, str) and all(w in detail for w in words), detail
    assert "/tmp" not in detail and "boneage-serve-" not in detail  # the server's temp path never shows


def test_missing_image_field(client):
    r = client.post(PREDICT, data={"sex": "M"})
    assert r.status_code == 422 and r.json() == {"detail": "invalid request: image: Field required"}


def test_too_large_upload(serve_checkpoint, png):
    small = create_app(ServiceOptions([serve_checkpoint], max_upload_mb=0.02, threads=1, warmup=False))  # 20,971 bytes
    try:
        with TestClient(small) as c:
            assert post(c, png, sex="M").status_code == 413 or len(png) <= 0.02 * 2**20
            noise = png_bytes_of(np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8))
            assert 0.02 * 2**20 < len(noise) < 0.02 * 2**20 + 64 * 1024  # passes the body check, not the file check
            for data in (noise, noise * 20):  # file check; body check (Content-Length)
                r = post(c, data, sex="M")
                assert r.status_code == 413, r.text
                assert r.json()["detail"].startswith("the upload is larger than the limit of 0.02 MB")
            assert c.get("/api/v1/model").json()["max_upload_mb"] == 0.02
    finally:
        small.state.service.close()


def test_upload_limit_enforced_while_streaming(serve_checkpoint):
    """A chunked body without Content-Length is cut off once it passes the limit: nothing more is read."""
    small = create_app(ServiceOptions([serve_checkpoint], max_upload_mb=0.1, threads=1, warmup=False))
    chunk, pulled, sent = b"x" * 16384, 0, []
    limit = small.state.service.max_upload_bytes + serve_app.MULTIPART_OVERHEAD

    async def receive():
        nonlocal pulled
        pulled += 1
        if pulled > 10_000:  # 160 MB: never reached unless the limit is not enforced
            return {"type": "http.request", "body": b"", "more_body": False}
        head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' if pulled == 1 else b""
        return {"type": "http.request", "body": head + chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": PREDICT, "raw_path": PREDICT.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b"), (b"host", b"test")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    try:
        asyncio.run(small(scope, receive, send))
    finally:
        small.state.service.close()
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413 and "larger than the limit" in json.loads(body)["detail"]
    assert pulled * len(chunk) <= limit + 2 * len(chunk)


def test_busy_server_answers_503(app, client, png):
    service = app.state.service
    service._busy = service.max_queue
    try:
        r = post(client, png)
    finally:
        service._busy = 0
    assert r.status_code == 503 and "busy" in r.json()["detail"]


def test_unknown_report_is_404(client):
    for url in ("/api/v1/report/0123456789abcdef0123456789abcdef.html", "/api/v1/report/nope.json",
                "/api/v1/report/0123456789abcdef0123456789abcdef/heatmap.png"):
        r = client.get(url)
        assert r.status_code == 404 and "analyse the image again" in r.json()["detail"]


def test_report_store_is_bounded():
    store = ReportStore(2)
    for key in "abc":
        store.put(key, key)  # type: ignore[arg-type]
    assert len(store) == 2 and store.get("a") is None and store.get("c") == "c"
    store.get("b")
    store.put("d", "d")  # type: ignore[arg-type]
    assert store.get("c") is None and store.get("b") == "b"


def test_display_name_strips_client_paths():
    assert display_name("C:\\Users\\x\\hand.png") == "hand.png" and display_name("../../etc/passwd") == "passwd"
    assert display_name(None) == "upload" and display_name("a\x00b\nc.png") == "abc.png"


# --- health, model, page, docs ---------------------------------------------------------------------------


def test_health(client):
    h = client.get("/api/v1/health").json()
    assert h["status"] == "ok" and h["model_loaded"] is True and h["threads"] == 2
    import torch

    from boneage import __version__
    assert h["versions"]["boneage"] == __version__ and h["versions"]["torch"] == torch.__version__
    assert h["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))


def test_model_info(client):
    m = client.get("/api/v1/model").json()
    assert m["architectures"] == ["bonenet_s"] and m["members"] == 1 and m["input_size"] == [96]
    assert m["model_mae_months"] == 9.5 and m["tta"] is True and m["runtime"] == "torch" and m["heatmap"] is True
    assert m["max_upload_mb"] == 2 and "not a certified medical device" in m["notice"]


def test_ensemble_model_info(tmp_path):
    a, b = make_checkpoint(tmp_path / "a.pt"), make_checkpoint(tmp_path / "b.pt", seed=1, mae=10.5)
    ens = create_app(ServiceOptions([a, b], threads=1, tta=False, warmup=False))
    try:
        m = TestClient(ens).get("/api/v1/model").json()
    finally:
        ens.state.service.close()
    assert m["members"] == 2 and m["models"] == ["a.pt", "b.pt"] and m["model_mae_months"] == 10.0
    assert m["member_mae_months"] == [9.5, 10.5] and m["tta"] is False


def test_bad_checkpoint_fails_at_start(tmp_path):
    with pytest.raises(BoneAgeError):
        create_app(ServiceOptions([tmp_path / "missing.pt"]))


def unlabelled_inputs(html: str) -> list[str]:
    """Ids of form controls with neither an enclosing <label> nor a <label for=...>."""
    from html.parser import HTMLParser

    class Labels(HTMLParser):
        def __init__(self):
            super().__init__()
            self.depth, self.targets, self.controls = 0, set(), []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "label":
                self.depth += 1
                self.targets.add(a.get("for"))
            elif tag in ("input", "select", "textarea") and a.get("type") != "hidden":
                self.controls.append((a.get("id"), self.depth > 0))

        def handle_endtag(self, tag):
            if tag == "label":
                self.depth -= 1

    parser = Labels()
    parser.feed(html)
    return [cid for cid, inside in parser.controls if not inside and cid not in parser.targets]


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    html = page.text
    unlabelled = unlabelled_inputs(html)
    ids = set(re.findall(r'id="([^"]+)"', html))
    assert unlabelled == [] and {"image", "sex-f", "sex-m", "age-years", "age-months"} <= ids
    assert 'aria-live="polite"' in html and 'role="alert"' in html
    assert "Research use only" in html and "not a certified medical device" in html
    for name in ("app.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
    for path in STATIC.iterdir():  # works offline: no CDN, no external URL in what the page loads
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path
        assert "cdn" not in text.lower() and "@import" not in text, path


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert {"/api/v1/predict", "/api/v1/health", "/api/v1/model", "/api/v1/report/{report_id}.html"} <= set(paths)
    assert {"413", "415", "422"} <= set(paths["/api/v1/predict"]["post"]["responses"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and 'href="/openapi.json"' in docs.text and "/api/v1/predict" in docs.text
    assert "cdn" not in docs.text.lower() and "<script" not in docs.text  # offline: no Swagger UI from a CDN


# --- concurrency -------------------------------------------------------------------------------------------


def test_parallel_requests_identical_results(app, client):
    """8 requests from 8 threads: all succeed; identical inputs give identical records and heatmaps;
    at most --threads analyses run at once; the event loop answers /health meanwhile."""
    service = app.state.service
    a, b = phantom_png(110, True, seed=1), phantom_png(60, False, seed=2)
    reference = {key: post(client, data, sex=sex, chronological_age=age).json()
                 for key, data, sex, age in (("a", a, "M", "9y3m"), ("b", b, "F", None))}
    running, peak, lock = 0, 0, threading.Lock()
    original = service.analyse

    def counted(*args):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.05)
            return original(*args)
        finally:
            with lock:
                running -= 1

    service.analyse = counted
    try:
        jobs = [("a", a, "M", "9y3m"), ("b", b, "F", None)] * 4
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, client, data, sex=sex, chronological_age=age) for _, data, sex, age in jobs]
            seen_busy = 0
            while not all(f.done() for f in futures):
                seen_busy = max(seen_busy, client.get("/api/v1/health").json()["busy"])
            replies = [f.result() for f in futures]
    finally:
        del service.analyse
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    for (key, *_), reply in zip(jobs, replies):
        rec = reply.json()
        assert plain(rec) == plain(reference[key])
        assert rec["heatmap_png_base64"] == reference[key]["heatmap_png_base64"]
    assert len({r.json()["report_id"] for r in replies}) == 8
    assert reference["a"]["bone_age_months"] != reference["b"]["bone_age_months"]
    assert 1 <= peak <= service.threads and seen_busy >= 1


# --- OpenAPI fuzzing: no 5xx, responses match the documented schema ------------------------------------------


def test_api_fuzz(app):
    """Every operation of the OpenAPI schema, 12 generated requests each: no 5xx and responses match the schema.

    Every check but 'schema-valid data is accepted': random bytes are a valid `binary` but not a radiograph.
    Schemathesis is driven through its Hypothesis strategies (``operation.as_strategy()``), not its pytest plugin:
    the plugin's lazy fixture (``schemathesis.pytest.from_fixture``) breaks on pytest 9.2 ("'Function' object has
    no attribute '_nodeid'"); this form uses only schemathesis' documented non-pytest API and no pytest internals.
    """
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {PREDICT, "/api/v1/health", "/api/v1/model"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()  # a failure names the operation in its falsifying example


# --- the `boneage serve` command ---------------------------------------------------------------------------------


def test_serve_defaults_to_loopback():
    args = build_parser().parse_args(["serve", "--checkpoint", "m.pt"])
    assert args.host == "127.0.0.1" and args.threads == 2 and args.max_upload_mb == 50


def test_serve_exposes_every_service_option(monkeypatch):
    """Each ``ServiceOptions`` field has a flag, and ``boneage serve`` hands the parsed values to the runner."""
    import dataclasses

    from boneage import cli
    from boneage.serve import server
    from boneage.serve.service import ServiceOptions

    seen = {}
    monkeypatch.setattr(server, "run_server", lambda options: seen.setdefault("options", options) and 0)
    argv = ["serve", "--checkpoint", "a.pt", "--checkpoint", "b.pt", "--host", "0.0.0.0", "--port", "0",
            "--max-upload-mb", "7.5", "--threads", "3", "--no-tta", "--no-heatmap", "--max-queue", "9",
            "--report-cache", "4", "--no-warmup", "--interval-level", "80%", "--device", "cpu", "--precision", "bf16",
            "--no-ood-check"]
    assert cli.main(argv) == 0
    options = seen["options"]
    assert (options.host, options.port) == ("0.0.0.0", 0)
    assert dataclasses.asdict(options.service) == dict(
        checkpoints=["a.pt", "b.pt"], max_upload_mb=7.5, threads=3, tta=False, heatmap=False, max_queue=9,
        report_cache=4, warmup=False, interval_level=0.8, device="cpu", precision="bf16",
        ood_check=False)
    defaults = dataclasses.asdict(cli._options(ServiceOptions, build_parser().parse_args(
        ["serve", "--checkpoint", "m.pt"]), checkpoints=["m.pt"]))
    assert defaults == dataclasses.asdict(ServiceOptions(["m.pt"]))  # flag defaults = the library's defaults


def test_serve_workers_points_to_threads(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--checkpoint", "m.pt", "--workers", "2"])
    assert exit_info.value.code == 2 and "use --threads N" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("threads", 0, "--threads must be at least 1"), ("max_queue", 0, "--max-queue must be at least 1"),
    ("max_upload_mb", 0, "--max-upload-mb must be positive"), ("checkpoints", [], "no checkpoint given"),
    ("interval_level", 0.2, "--interval-level must be from 0.5"),
])
def test_service_options_are_checked_when_built(field, value, message):
    from boneage.serve.service import ServiceOptions

    with pytest.raises(BoneAgeError, match=message):
        ServiceOptions(**{"checkpoints": ["m.pt"], field: value})


def test_boneage_serve_command(serve_checkpoint, png):
    """`boneage serve --port 0` starts, prints its URL, answers, and stops cleanly on SIGINT."""
    proc = subprocess.Popen([sys.executable, "-m", "boneage.cli", "serve", "--checkpoint", str(serve_checkpoint),
                             "--port", "0", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)/", first)
        assert match, first + proc.stdout.read() if proc.poll() is not None else first
        url = match.group(1)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert httpx.get(f"{url}/api/v1/health", timeout=5).json()["model_loaded"] is True
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        r = httpx.post(f"{url}{PREDICT}", files={"image": ("p.png", png)}, data={"sex": "M"}, timeout=60)
        assert r.status_code == 200 and math.isfinite(r.json()["bone_age_months"])
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.stdout.read()  # not communicate(): it would drop what readline() buffered
        proc.wait(30)
    assert proc.returncode == 0, out
    assert "research use only" in (first + out).lower() and "stopped" in out
    assert "p.png" not in out  # file names are not logged


def test_serve_port_in_use(serve_checkpoint, capsys):
    from boneage.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--checkpoint", str(serve_checkpoint), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_load_benchmark_runs(serve_checkpoint, tmp_path):
    """`python -m benchmarks.serve_load` (make bench-serve) end to end with a few requests."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve_load", "--checkpoint", str(serve_checkpoint),
                           "--requests", "6", "--concurrency", "3", "--images", "2", "--out", str(tmp_path)],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "serve.json").read_text())
    assert result["requests"] == 6 and result["concurrency"] == 3 and result["errors"] == 0
    assert result["checkpoint"] == "serve.pt (given)" and result["hardware"]["cpu_model"] and result["date"]
    assert 0 < result["p50_ms"] <= result["p95_ms"] and result["requests_per_s"] > 0
    assert "| p95 latency |" in proc.stdout and "| errors (non-200 or wrong bone age) | 0 |" in proc.stdout
