"""The web service refuses what a hostile page or a careless client sends: a foreign Host (DNS rebinding),
cross-site uploads, ages without units; and it returns the conformal interval."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from boneage.data.synth import render_phantom
from boneage.serve.app import ServiceOptions, create_app
from boneage.serve.middleware import LOOPBACK_NAMES
from helpers_predict import make_checkpoint

PREDICT = "/api/v1/predict"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    options = ServiceOptions([make_checkpoint(tmp_path_factory.mktemp("sec") / "m.pt")], threads=1, heatmap=False)
    app = create_app(options, allowed_hosts=LOOPBACK_NAMES)
    yield app
    app.state.service.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        yield c


@pytest.fixture(scope="module")
def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(render_phantom(110.0, True, np.random.default_rng(0))).save(buf, format="PNG")
    return buf.getvalue()


def _post(client, png, headers=None, **fields):
    return client.post(PREDICT, files={"image": ("hand.png", png, "image/png")}, data=fields, headers=headers or {})


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST"])
def test_loopback_names_are_served(client, host):
    assert client.get("/api/v1/health", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example:8000", "127.0.0.1.evil.example", "attacker.test"])
def test_a_foreign_host_header_is_refused(client, host):
    response = client.get("/api/v1/health", headers={"Host": host})
    assert response.status_code == 421 and "DNS-rebinding" in response.json()["detail"]


def test_cross_site_uploads_are_refused_and_same_site_ones_served(client, png):
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "http://127.0.0.1.evil.example:8000"}):
        response = _post(client, png, headers, sex="F", chronological_age="9y")
        assert response.status_code == 403 and "cross-site" in response.json()["detail"], headers
    assert _post(client, png, {"Origin": "http://127.0.0.1:8000"}, sex="F", chronological_age="9y").status_code == 200
    assert _post(client, png, sex="F", chronological_age="9y").status_code == 200  # curl: no Origin


def test_a_bare_number_age_is_refused_but_the_months_field_takes_one(client, png):
    response = _post(client, png, sex="F", chronological_age="14")
    assert response.status_code == 422 and "without a unit" in response.json()["detail"]
    record = _post(client, png, sex="F", chronological_age_months="171").json()
    assert record["chronological_age_months"] == 171.0 and record["chronological_age_text"] == "14 y 3 m"
    both = _post(client, png, sex="F", chronological_age="14y", chronological_age_months="171")
    assert both.status_code == 422 and "not both" in both.json()["detail"]


def test_the_api_record_has_the_interval_and_both_sexes_when_the_sex_is_unknown(client, png):
    record = _post(client, png).json()
    lo, hi = record["bone_age_interval_months"]
    by_sex = record["bone_age_by_sex_months"]
    assert lo <= min(by_sex.values()) <= max(by_sex.values()) <= hi
    assert record["bone_age_months"] == pytest.approx((by_sex["M"] + by_sex["F"]) / 2, abs=0.11)
    assert record["z_score"] is None and record["interval_level"] == 0.9
    assert any("if female" in w and "if male" in w for w in record["warnings"])


@pytest.fixture(scope="module")
def live_url(tmp_path_factory):
    from boneage.serve.server import serve_in_thread

    options = ServiceOptions([make_checkpoint(tmp_path_factory.mktemp("live") / "m.pt")], threads=1, heatmap=False,
                             max_upload_mb=1, warmup=False)
    app = create_app(options, upload_idle_timeout_s=1.5)
    try:
        with serve_in_thread(app) as url:
            yield url
    finally:
        app.state.service.close()


def _raw_request(url: str, head: bytes, body_parts: list[bytes], read_timeout: float = 10.0) -> tuple[bytes, float]:
    import socket
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=read_timeout) as sock:
        start = time.monotonic()
        sock.sendall(head)
        for part in body_parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        reply = b""
        try:
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        return reply, time.monotonic() - start


def test_a_stalled_upload_gets_408_after_the_idle_timeout(live_url):
    head = (b"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 100000\r\n\r\n")
    reply, seconds = _raw_request(live_url, head, [b"--x\r\n"])
    assert reply.startswith(b"HTTP/1.1 408") and b"stalled" in reply, reply[:200]
    assert 1.4 <= seconds < 8


def test_a_chunked_upload_over_the_limit_gets_413_not_a_reset(live_url):
    head = (b"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    block = b"a" * 65536
    chunks = [f"{len(block):x}\r\n".encode() + block + b"\r\n" for _ in range(40)]  # 2.5 MiB > 1 MB limit
    reply, _ = _raw_request(live_url, head, chunks + [b"0\r\n\r\n"])
    assert reply.startswith(b"HTTP/1.1 413") and b"larger than the limit" in reply, reply[:200]
