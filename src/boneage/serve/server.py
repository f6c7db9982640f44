"""Running the app: socket binding (127.0.0.1 unless told otherwise), uvicorn in a thread, ``boneage serve``."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import socket
import threading
import time
from typing import Iterator

from fastapi import FastAPI

from boneage.errors import BoneAgeError
from boneage.report.schema import RUO_NOTICE
from boneage.serve.app import create_app
from boneage.serve.middleware import LOOPBACK_NAMES
from boneage.serve.schemas import API
from boneage.serve.service import Service, ServiceOptions

log = logging.getLogger("boneage.serve")


# --- running it -------------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BoneAgeError(f"cannot resolve --host {host!r}: {exc}") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise BoneAgeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
                           "or stop the program using it") from exc
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                    timeout_s: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread (tests, benchmarks); yields the base URL."""
    import uvicorn

    sock = _bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="boneage-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the uvicorn server did not start")
        time.sleep(0.02)
    try:
        yield _url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()


def _torch_threads(threads: int) -> int:
    """Intra-op threads per inference thread: the usable cores shared out (OMP_NUM_THREADS wins if set)."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(1, int(threads))))
    return torch.get_num_threads()


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """``boneage serve``, typed: the service's options and where to listen."""

    service: ServiceOptions
    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8000  # 0: a free port, printed


def run_server(options: ServerOptions) -> int:
    """``boneage serve``: load the model(s), then serve until Ctrl+C."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    host = options.host
    threads = _torch_threads(options.service.threads)
    sock = _bind(host, options.port)  # fail fast (port in use) before loading models
    try:
        allowed = (*LOOPBACK_NAMES, host) if _is_loopback(host) else None  # DNS-rebinding defence
        app = create_app(options.service, allowed_hosts=allowed)
    except BaseException:
        sock.close()
        raise
    service: Service = app.state.service
    url = _url(sock)
    info = service.model_info()
    mae = info["model_mae_months"]
    print(f"boneage serve: {url}/  (API {url}{API}, docs {url}/docs)\n"
          f"  model: {', '.join(info['architectures'])} x{info['members']}"
          + (f", validation MAE {mae:.1f} months" if mae is not None else "")
          + f", TTA {'on' if info['tta'] else 'off'}; {service.threads} inference thread(s) x {threads} torch "
          f"thread(s); "
          f"uploads up to {service.max_upload_mb:g} MB\n"
          f"  {RUO_NOTICE}. Ctrl+C stops the server.", flush=True)
    if not _is_loopback(host):
        print(f"boneage serve: warning: listening on {host}, not only this machine: anyone who can reach "
              "it can upload images, and there is no authentication or TLS; put it behind a proxy that has both",
              flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C after a graceful shutdown: the normal way to stop
        pass
    finally:
        service.close()
        sock.close()
    print("boneage serve: stopped", flush=True)
    return 0
