"""Regenerate the README's pictures from ``make demo``'s phantom model: ``make screenshots``.

- ``docs/sample_report.html``: the demo's HTML report of its featured held-out phantom (copied);
- ``img/sample_report.png``: that report in headless Chromium;
- ``img/serve_page.png``: the web page (``boneage serve`` on the demo checkpoint) after uploading the same phantom
  with its sex and chronological age.

Synthetic phantoms only: nothing here comes from a real radiograph. Needs Playwright and Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import expect, sync_playwright

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-dir", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--featured", default="100000", help="id of the held-out phantom (make demo's DEMO_FEATURED)")
    args = p.parse_args(argv)
    demo = args.demo_dir
    report = demo / "reports" / f"{args.featured}.html"
    if not report.is_file():
        raise SystemExit(f"{report} not found: run 'make demo' first")
    with (demo / "holdout" / "labels.csv").open() as fh:
        row = next(r for r in csv.DictReader(fh) if r["id"] == args.featured)
    months, sex = float(row["boneage"]), "M" if row["male"] in ("True", "true", "1") else "F"
    shutil.copyfile(report, ROOT / "docs" / "sample_report.html")

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "boneage", "serve", "--checkpoint", str(demo / "run" / "best.pt"),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(url + "/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(report.resolve().as_uri())
            page.screenshot(path=str(ROOT / "img" / "sample_report.png"), full_page=True)
            page.goto(url + "/")
            page.get_by_label("Drop a radiograph here").set_input_files(str(demo / "holdout" / "images" /
                                                                            f"{args.featured}.png"))
            page.get_by_label("Male" if sex == "M" else "Female", exact=True).check()
            page.get_by_label("Years").fill(str(int(months // 12)))
            page.get_by_label("Months").fill(str(int(round(months % 12))))
            page.get_by_role("button", name="Estimate bone age").click()
            expect(page.locator("#result-body")).to_be_visible(timeout=120_000)
            page.screenshot(path=str(ROOT / "img" / "serve_page.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("wrote docs/sample_report.html, img/sample_report.png, img/serve_page.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
