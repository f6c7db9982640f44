"""The plumbing of ``run``: one results file saved after every stage, stages that record their error and let the
run go on, ``boneage`` commands called in this process with their output in a log, and the time budget."""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from boneage.atomic import write_text


class Stop(BaseException):
    """SIGTERM (``timeout`` ending the run): unwinds through ``except Exception`` blocks to save the results."""


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """Inside: SIGTERM raises ``Stop``; the previous handler is back afterwards."""
    def handler(signum: int, frame: Any) -> None:
        raise Stop(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Tee(io.TextIOBase):
    """Writes to a console stream and a log file; never a terminal (no progress bars in logs)."""

    def __init__(self, console: TextIO, log: TextIO) -> None:
        super().__init__()
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.console.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.console.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.console.fileno()


ABSENT_ENV = "GPU_RECIPE_ABSENT_MODULES"  # comma-separated modules made unimportable (the rehearsal's device)
CHILD = ("import os, sys\n"
         f"for name in filter(None, os.environ.get({ABSENT_ENV!r}, '').split(',')):\n"
         "    sys.modules[name] = None\n"
         "from boneage.cli import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


def call_boneage(argv: Sequence[str], log: Path, *, isolate: bool = False) -> int:
    """``boneage ARGV`` (``boneage.cli.main``: the command's own code path), its stdout and stderr copied into
    ``log``; returns its exit status (2 for a ``BoneAgeError`` or a bad flag). In this process, or with
    ``isolate`` in a child process (training: a crash, a CUDA error or the engine's global state stays there, and
    its GPU memory is freed when it ends)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ boneage {shlex.join(argv)}\n")
        fh.flush()
        if isolate:
            return _child(argv, fh)
        from boneage.cli import main

        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(out, fh), Tee(err, fh)
        try:
            return int(main(list(argv)) or 0)
        except SystemExit as exc:  # argparse
            return exc.code if isinstance(exc.code, int) else 2
        finally:
            sys.stdout, sys.stderr = out, err


def _child(argv: Sequence[str], log: TextIO) -> int:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="backslashreplace", env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        return proc.wait()
    finally:
        if proc.poll() is None:  # Stop (SIGTERM) while it ran
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def log_tail(log: Path, lines: int = 6) -> str:
    try:
        return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def require_ok(rc: int, what: str, log: Path) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} exited with status {rc}; the end of {log.name}:\n{log_tail(log)}")


class Budget:
    """Minutes left of the run's budget, counted from its start."""

    def __init__(self, minutes: float) -> None:
        self.minutes, self.start = minutes, time.monotonic()

    def elapsed_min(self) -> float:
        return (time.monotonic() - self.start) / 60

    def left_min(self) -> float:
        return self.minutes - self.elapsed_min()


class Results:
    """The one results file: ``data`` written to ``path`` (atomically) after every stage."""

    def __init__(self, path: Path, data: dict[str, Any], budget: Budget) -> None:
        self.path, self.data, self.budget = path, data, budget
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps(self.data, indent=2, default=str) + "\n")

    def short(self, record: dict[str, Any], need_min: float) -> bool:
        """True (and ``record`` marked skipped) when fewer than ``need_min`` minutes of the budget are left."""
        if self.budget.left_min() >= need_min:
            return False
        left = self.budget.left_min()
        record.update(status="skipped", reason=f"{left:.1f} min of the budget left, {need_min:g} needed")
        self.save()
        return True

    @contextmanager
    def stage(self, record: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
        """Run the ``with`` body as stage ``name`` recording into ``record``: status ok, or failed with the error
        (the run goes on), and wall seconds; the file is saved before and after."""
        record["status"] = "running"
        self.save()
        start = time.monotonic()
        print(f"[gpu_recipe {time.strftime('%H:%M:%S')}] {name}: start ({self.budget.left_min():.1f} min left)",
              flush=True)
        try:
            yield record
            if record["status"] == "running":
                record["status"] = "ok"
        except Stop:
            record["status"] = "interrupted"
            raise
        except Exception as exc:  # noqa: BLE001 - record it, go on with the next stage
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc().splitlines()[-12:]
        finally:
            record["wall_s"] = round(time.monotonic() - start, 2)
            self.save()
            print(f"[gpu_recipe {time.strftime('%H:%M:%S')}] {name}: {record['status']} in {record['wall_s']:.1f} s"
                  + (f" ({record.get('error')})" if record["status"] == "failed" else ""), flush=True)


def environment(device: str) -> dict[str, Any]:
    """The machine and the versions that matter, as the results record them."""
    import os
    import platform

    import torch

    info: dict[str, Any] = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    else:
        info["gpu"] = None
    for module in ("catalyst", "accelerate", "albumentations", "timm", "numpy", "pandas", "cv2", "pytorch_grad_cam"):
        try:
            info[module] = str(getattr(__import__(module), "__version__", "unknown"))
        except Exception as exc:  # noqa: BLE001 - a missing package is what this records
            info[module] = f"missing ({type(exc).__name__})"
    return info
