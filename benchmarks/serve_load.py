"""Load test of the web service: ``boneage serve`` on loopback, N predict requests from C concurrent clients.

    python -m benchmarks.serve_load                          # = make bench-serve
    python -m benchmarks.serve_load --checkpoint runs/x/best.pt --requests 200 --concurrency 8

The server is the real command (``python -m boneage.cli serve --port 0``) in a subprocess, so the
clients (one ``httpx.Client`` per thread, each its own connection) do not share its interpreter.
Without ``--checkpoint`` a random-weights model of the ``cpu-small`` architecture (its model and
input size) is saved to a temporary folder: latency does not depend on the weights, the bone ages do
(the output says which was used). A few phantom radiographs (PNG, with sex and chronological age)
are each sent once as a reference; then every answer must be 200 with the reference's bone age,
or it counts as an error. The run is bounded in count (``--requests``) and time (``--time-limit``).

Writes ``<out>/serve.json`` (default ``benchmarks/results``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import DEFAULT_OUT_DIR, hardware_info, log, write_result
from boneage.config import load_config

PREDICT = "/api/v1/predict"
TARGET = {"mean": 127.3, "std": 41.2}  # any values would do for a latency test


def random_checkpoint(folder: Path) -> Path:
    """A cpu-small model (its architecture and input size) with seeded random weights, saved as a checkpoint."""
    import torch

    from boneage.checkpoint import save_checkpoint
    from boneage.config import load_config
    from boneage.models import create_model

    cfg = load_config("cpu-small")
    m = cfg.model
    torch.manual_seed(0)
    model = create_model(**{**asdict(m), "pretrained": False})
    return save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "target": TARGET,
                            "metrics": {}, "epoch": 0}, folder / "random-cpu-small.pt")


def phantom_requests(n: int) -> list[dict[str, Any]]:
    """``n`` phantom PNGs (320 x 256) with their form fields: ages spread over 2-17 years, both sexes."""
    from PIL import Image

    from boneage.clinical import format_age
    from boneage.data.synth import render_phantom

    out = []
    for i, age in enumerate(np.linspace(24, 204, n)):
        male = i % 2 == 0
        buf = io.BytesIO()
        Image.fromarray(render_phantom(float(age), male, np.random.default_rng(i))).save(buf, format="PNG")
        out.append({"name": f"phantom-{i}.png", "png": buf.getvalue(),
                    "fields": {"sex": "M" if male else "F", "chronological_age": format_age(age).replace(" ", "")}})
    return out


class Server:
    """``boneage serve`` in a subprocess; its output is drained by a thread (kept for errors)."""

    def __init__(self, checkpoints: list[str], threads: int, max_upload_mb: float = 50.0) -> None:
        cmd = [sys.executable, "-m", "boneage.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--threads", str(threads), "--max-upload-mb", str(max_upload_mb)]
        for c in checkpoints:
            cmd += ["--checkpoint", c]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_url(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if match:
                return match.group(1)
        raise RuntimeError("boneage serve did not start:\n" + "".join(self.output))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def wait_healthy(url: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(f"{url}/api/v1/health", timeout=5).json()
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def load(url: str, items: list[dict[str, Any]], reference: list[float], *, requests: int, concurrency: int,
         time_limit_s: float) -> dict[str, Any]:
    """``requests`` predicts from ``concurrency`` threads (round-robin over ``items``) until done or out of time."""
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + time_limit_s

    def client() -> None:
        nonlocal issued
        with httpx.Client(base_url=url, timeout=max(30.0, time_limit_s)) as http:
            while True:
                with lock:
                    if issued >= requests or time.monotonic() > deadline:
                        return
                    k = issued
                    issued += 1
                item = items[k % len(items)]
                start = time.perf_counter()
                try:
                    r = http.post(PREDICT, files={"image": (item["name"], item["png"], "image/png")},
                                  data=item["fields"])
                    elapsed = time.perf_counter() - start
                    ok = r.status_code == 200 and r.json()["bone_age_months"] == reference[k % len(items)]
                    problem = None if ok else f"request {k}: HTTP {r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    elapsed, problem = time.perf_counter() - start, f"request {k}: {type(exc).__name__}: {exc}"
                with lock:
                    latencies.append(elapsed)
                    if problem:
                        errors.append(problem)

    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "requested": requests,
        "stopped_by_time_limit": len(latencies) < requests,
        "errors": len(errors),
        "error_examples": errors[:5],
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
        "mean_ms": round(float(ms.mean()), 1) if len(ms) else None,
        "max_ms": round(float(ms.max()), 1) if len(ms) else None,
        "requests_per_s": round(len(latencies) / wall, 2) if wall > 0 else None,
        "load_wall_s": round(wall, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    rows = [
        ("checkpoint", result["checkpoint"]),
        ("hardware", f"{hw['cpu_model']}, {hw['cpu_usable_cores']} usable cores, load {hw['load_average_1_5_15']}"),
        ("server", f"{result.get('server_threads', result.get('server_workers'))} inference threads, "
                   f"TTA {'on' if result['tta'] else 'off'}, "
                   f"Grad-CAM heatmap {'on' if result['heatmap'] else 'off'}"),
        ("requests (concurrency)", f"{result['requests']} of {result['requested']} ({result['concurrency']} clients)"),
        ("p50 latency", f"{result['p50_ms']} ms"),
        ("p95 latency", f"{result['p95_ms']} ms"),
        ("throughput", f"{result['requests_per_s']} requests/s"),
        ("errors (non-200 or wrong bone age)", str(result["errors"])),
    ]
    return "| serve load | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", action="append", help="checkpoint .pt (repeat for an ensemble); "
                        "default: a random-weights cpu-small model")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="the server's inference threads (serve --threads)")
    parser.add_argument("--images", type=int, default=4, help="distinct phantom images")
    parser.add_argument("--time-limit", type=float, default=480.0, help="seconds for the load phase")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="folder for serve.json")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="boneage-serve-load-") as tmp:
        if args.checkpoint:
            checkpoints = [str(Path(c).resolve()) for c in args.checkpoint]
            described = ", ".join(Path(c).name for c in checkpoints) + " (given)"
        else:
            checkpoints = [str(random_checkpoint(Path(tmp)))]
            cfg = load_config("cpu-small")
            described = (f"random weights, cpu-small architecture ({cfg.model.name}, {cfg.preprocess.size} px): "
                         "latency is representative, the bone ages are not")
        log(f"checkpoint: {described}")
        items = phantom_requests(args.images)
        server = Server(checkpoints, args.threads)
        try:
            url = server.wait_url(timeout_s=300)
            wait_healthy(url, timeout_s=60)
            model = httpx.get(f"{url}/api/v1/model", timeout=10).json()
            log(f"server up at {url}; reference answers for {len(items)} images")
            reference = []
            with httpx.Client(base_url=url, timeout=120) as http:
                for item in items:
                    r = http.post(PREDICT, files={"image": (item["name"], item["png"], "image/png")},
                                  data=item["fields"])
                    r.raise_for_status()
                    reference.append(r.json()["bone_age_months"])
            log(f"{args.requests} requests from {args.concurrency} clients (limit {args.time_limit:.0f} s)")
            hardware = hardware_info()
            stats = load(url, items, reference, requests=args.requests, concurrency=args.concurrency,
                         time_limit_s=args.time_limit)
        finally:
            server.stop()
    result = {
        "checkpoint": described,
        "concurrency": args.concurrency,
        **stats,
        "server_threads": args.threads,
        "tta": model["tta"],
        "heatmap": model["heatmap"],
        "architectures": model["architectures"],
        "input_size": model["input_size"],
        "image_hw": [320, 256],
        "reference_bone_age_months": reference,
        "duration_s": round(time.perf_counter() - started, 1),
        "notes": "boneage serve in a subprocess on 127.0.0.1; one httpx.Client (own connection) per client thread; "
                 "latency = request sent to JSON received (upload, decode, TTA prediction, Grad-CAM, PNG).",
    }
    path = write_result(args.out, "serve", result, hardware)
    result["hardware"] = hardware
    print(markdown(result))
    log(f"wrote {path}")
    if stats["errors"]:
        log("errors: " + "; ".join(stats["error_examples"]))
    return 1 if stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
