"""The browser page, end to end: the real uvicorn server on 127.0.0.1, Debian's Chromium driven by Playwright.

Skips only when Chromium is absent and CI is not set; under CI a missing Chromium fails the test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from boneage.data.synth import render_phantom
from boneage.serve.app import ServiceOptions, create_app
from boneage.serve.server import serve_in_thread
from helpers_predict import make_checkpoint

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
WEB_ONLY = ("report_id", "report_html_url", "report_json_url", "heatmap_png_base64")
CHROMIUM_FALLBACKS = ("/usr/bin/chromium",)  # Debian's package


def chromium_path() -> str:
    path = os.environ.get("BONEAGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        path = next((p for p in CHROMIUM_FALLBACKS if Path(p).exists()), None)
    if path is None:
        message = "Chromium not found: apt-get install -y chromium (or set BONEAGE_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(message + " -- required under CI")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("browser") / "page.pt")
    app = create_app(ServiceOptions([checkpoint], threads=2))
    try:
        with serve_in_thread(app) as url:
            yield url
    finally:
        app.state.service.close()


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_page_upload_shows_the_api_result(server, browser, tmp_path):
    assert server.startswith("http://127.0.0.1:")
    image = tmp_path / "phantom.png"
    Image.fromarray(render_phantom(111, True, np.random.default_rng(0))).save(image)
    api = httpx.post(f"{server}/api/v1/predict", files={"image": ("phantom.png", image.read_bytes())},
                     data={"sex": "M", "chronological_age": "9y3m"}, timeout=120).json()

    page = browser.new_page(accept_downloads=True)
    requests: list[str] = []
    problems: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    try:
        page.goto(server + "/")
        expect(page.locator(".ruo")).to_contain_text("Research use only")
        expect(page.locator("#model-info")).to_contain_text("validation MAE 9.5 months")

        page.get_by_label("Drop a radiograph here").set_input_files(str(image))  # the labelled file input
        expect(page.locator("#file-name")).to_contain_text("phantom.png")
        page.get_by_label("Male", exact=True).check()
        page.get_by_label("Years").fill("9")
        page.get_by_label("Months").fill("3")
        page.get_by_role("button", name="Estimate bone age").click()
        expect(page.locator("#result-body")).to_be_visible(timeout=60_000)

        shown = float(page.locator("#bone-age-months").inner_text())
        assert math.isclose(shown, api["bone_age_months"], abs_tol=0.051)
        expect(page.locator("#bone-age-text")).to_have_text(api["bone_age_text"])
        certainty = (api["category_certainty"] or "").split(":")[0]
        badge = api["category"] + (f" ({certainty})" if certainty in ("borderline", "indeterminate") else "")
        expect(page.locator("#category")).to_have_text(badge)
        lo, hi = api["bone_age_interval_months"]
        expect(page.locator("#interval")).to_contain_text(f"{lo:.0f}\u2013{hi:.0f} months, 90% prediction interval")
        expect(page.locator("#z-score")).to_contain_text(f"{api['z_score']:+.2f}".replace("-", "\u2212"))
        expect(page.locator("#chronological-age")).to_contain_text("9 y 3 m")
        lo, hi = api["normal_range_months"]
        expect(page.locator("#normal-range")).to_contain_text(f"{lo:.0f}\u2013{hi:.0f} months (chronological age")
        expect(page.locator("#normal-range")).to_contain_text(api["category_certainty"])
        expect(page.locator("#ood")).to_contain_text(f"passed: feature distance {api['ood_score']:.2f}")
        expect(page.locator("#mae")).to_contain_text("mean absolute error 9.5 months on held-out validation images")
        expect(page.locator("#status")).to_contain_text("Done")
        assert page.locator("#result").get_attribute("aria-live") == "polite"
        assert page.eval_on_selector("#heatmap", "img => img.complete && img.naturalWidth") == 384
        assert page.eval_on_selector("#upload-preview", "img => img.complete && img.naturalWidth") == 256

        with page.expect_download() as download:
            page.get_by_role("link", name="Download JSON report").click()
        record = json.loads(Path(download.value.path()).read_text(encoding="utf-8"))
        assert download.value.suggested_filename == "phantom_boneage.json"
        assert record["bone_age_months"] == api["bone_age_months"] and not set(WEB_ONLY) & set(record)
        with page.expect_download() as download:
            page.get_by_role("link", name="Download HTML report").click()
        report = Path(download.value.path()).read_text(encoding="utf-8")
        assert "Bone age report" in report and api["bone_age_text"] in report

        page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=True)
        assert (tmp_path / "serve_page.png").stat().st_size > 10_000

        # an error is shown in the alert region, and the previous result stays
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
        page.get_by_label("Drop a radiograph here").set_input_files(str(bad))
        page.get_by_role("button", name="Estimate bone age").click()
        expect(page.get_by_role("alert")).to_contain_text("unsupported file type", timeout=30_000)
        expect(page.get_by_role("alert")).to_contain_text("415")
        expect(page.locator("#bone-age-text")).to_have_text(api["bone_age_text"])
    finally:
        page.close()
    assert all(u.startswith((server, "data:", "blob:")) for u in requests), requests  # nothing off this server
    assert [p for p in problems if "415" not in p] == []  # only the expected failed upload is logged


def test_missing_chromium_skips_only_outside_ci(monkeypatch):
    monkeypatch.delenv("BONEAGE_CHROMIUM", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM_FALLBACKS", ())
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required under CI"):
        chromium_path()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        chromium_path()
