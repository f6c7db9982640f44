"""Peak memory of ``boneage serve`` under concurrent uploads of small files that decode to huge images.

Starts the server as a subprocess (``--threads`` inference threads: at most that many uploads are decoded
at once; the rest wait in the queue; ``--no-ood-check``, so that accepted images take the whole path), then,
kind by kind, sends ``--clients`` concurrent uploads and reads the server's peak resident set (``VmHWM`` of
``/proc/PID/status``) after each kind:

- ``bomb``: a 9999 x 9999 8-bit PNG (a few hundred KB): refused from its header (pixel budget);
- ``big16``: a 5999 x 5999 16-bit PNG of a blocky phantom hand (just under the 36 MP budget): decoded and
  analysed;
- ``small``: a 299 x 299 8-bit phantom hand, the size the model is trained on.

Writes ``results/serve_memory.json``::

    python -m benchmarks.serve_memory --checkpoint runs/cpu-small/best.pt [--threads 2] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
from PIL import Image

from benchmarks.common import DEFAULT_OUT_DIR, free_port, hardware_info, log, write_result
from boneage.data.synth import render_phantom


def _peak_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set of ``pid`` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def make_files(folder: Path) -> dict[str, Path]:
    """The three kinds of upload, written as PNGs into ``folder``."""
    bomb = folder / "bomb.png"
    Image.fromarray(np.zeros((9999, 9999), np.uint8)).save(bomb, optimize=True)
    rng = np.random.default_rng(0)
    hand = render_phantom(120, False, rng, size=(400, 400)) // 8 * 8  # few levels: a small file, 72 MB decoded
    big = cv2.resize(hand, (5999, 5999), interpolation=cv2.INTER_NEAREST).astype(np.uint16) * 16  # 12-bit
    big16 = folder / "big16.png"
    Image.fromarray(big).save(big16)
    small = folder / "small.png"
    Image.fromarray(render_phantom(120, False, rng, size=(299, 299))).save(small)
    return {"bomb": bomb, "big16": big16, "small": small}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_memory", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = p.parse_args(argv)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="boneage-serve-memory-") as tmp:
        files = make_files(Path(tmp))
        server = subprocess.Popen([sys.executable, "-m", "boneage", "serve", "--checkpoint", str(args.checkpoint),
                                   "--port", str(port), "--threads", str(args.threads), "--no-ood-check"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/api/v1"
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            idle_mb, _ = _peak_mb(server.pid)
            kinds = {}
            for kind, path in files.items():
                data = path.read_bytes()

                def upload(i: int, data: bytes = data, kind: str = kind) -> tuple[int, str]:
                    r = httpx.post(url + "/predict", files={"image": (f"{kind}{i}.png", data, "image/png")},
                                   data={"sex": "F", "chronological_age": "10y"}, timeout=600)
                    return r.status_code, "" if r.status_code == 200 else r.json().get("detail", "")

                start = time.monotonic()
                with ThreadPoolExecutor(args.clients) as pool:
                    answers = list(pool.map(upload, range(args.clients)))
                codes = [code for code, _ in answers]
                rss, peak = _peak_mb(server.pid)
                kinds[kind] = {"file_kb": round(len(data) / 1024, 1), "statuses": codes,
                               "first_error": next((d for _, d in answers if d), None),
                               "peak_rss_mb_after": round(peak, 0), "rss_mb_after": round(rss, 0),
                               "wall_s": round(time.monotonic() - start, 1)}
                log(f"{kind}: {len(data) / 1024:.0f} KB x {args.clients} -> {codes}; peak RSS {peak:.0f} MB")
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {"name": "serve_memory", "mode": "full",
              "checkpoint": args.checkpoint.name, "threads": args.threads, "clients": args.clients,
              "idle_rss_mb": round(idle_mb, 0), "kinds": kinds,
              "peak_rss_mb": max(k["peak_rss_mb_after"] for k in kinds.values())}
    write_result(args.out, "serve_memory", result, hardware_info())
    print(json.dumps({k: v for k, v in result.items() if k != "hardware"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
