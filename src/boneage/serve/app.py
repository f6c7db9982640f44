"""The web service: REST API under ``/api/v1``, a browser page at ``/`` and OpenAPI docs at ``/docs``.

``create_app(checkpoints)`` loads the model(s) once and returns a FastAPI app; ``run_server(args)``
(the ``boneage serve`` command) runs it with uvicorn on 127.0.0.1 unless told otherwise.

One analysis path: an upload is streamed to a temporary file (the size limit is enforced while
the body arrives), decoded by ``boneage.io.read_image`` and analysed by
``boneage.inference.batch.predict_array`` -- the function behind ``boneage predict`` -- so the API
returns the same JSON record (``boneage/report/SCHEMA.md``), plus the report's id and links and the
Grad-CAM heatmap as a base64 PNG.

Concurrency: analyses run in a thread pool of ``workers`` threads, so the event loop stays free,
and at most ``max_queue`` uploads wait for it (more get 503). Predictions share the loaded models,
which are never modified per request (eval mode, ``torch.inference_mode``). Grad-CAM is different:
it hooks a layer and back-propagates, so it runs on its own copy of the models, one request at a
time under a lock; the hooks can then never see another request's forward pass.

Reports: the last ``report_cache`` analyses are kept in a bounded LRU (record, radiograph and
heatmap) for ``GET /api/v1/report/{id}.html`` / ``.json`` / ``/heatmap.png``; older ids give 404.
DICOM patient identifiers are never read into a record here, and no file name is logged.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import copy
import dataclasses
import io
import ipaddress
import logging
import os
import platform
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Literal, Sequence, TypeVar

import numpy as np
from PIL import Image
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from boneage import __version__
from boneage.errors import BoneAgeError, ImageReadError, UnusableImageError
from boneage.inference.batch import load_predictor, parse_request, predict_array
from boneage.io import IMAGE_SUFFIXES, _sniff, read_image
from boneage.report import render_html
from boneage.report.schema import RUO_NOTICE

API = "/api/v1"
MB = 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # bytes a request body may carry beyond the file: boundaries and form fields
_MALE = {"M": 1.0, "F": 0.0}
_REPORT_ID = re.compile(r"^[0-9a-f]{32}$")
_PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"

log = logging.getLogger("boneage.serve")
T = TypeVar("T")


# --- response models (OpenAPI documentation; the handlers return plain JSON) -----------------------


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong and what to do")


class ImageInfo(BaseModel):
    format: str
    width: int
    height: int
    bit_depth: int


class ReportRecord(BaseModel):
    """The ``boneage predict`` JSON record (schema 1.0, see SCHEMA.md)."""

    schema_version: str
    file: str = Field(description="the upload's file name")
    error: str | None
    bone_age_months: float | None
    bone_age_text: str | None
    chronological_age_months: float | None
    chronological_age_text: str | None
    chronological_age_source: str | None = Field(description="'cli' (given in the request) or 'dicom'")
    sex: Literal["M", "F"] | None
    sex_source: str
    difference_months: float | None
    sd_months: float | None
    z_score: float | None
    category: str | None
    category_reason: str | None
    summary: str | None
    model_mae_months: float | None
    models: list[str]
    architectures: list[str]
    runtime: str
    tta: bool
    mirrored: bool | None
    image: ImageInfo | None
    heatmap: str | None = Field(description="URL of the Grad-CAM overlay PNG while the report is kept")
    warnings: list[str]
    references: list[str]
    disclaimer: str
    boneage_version: str
    identifiers: dict[str, str] | None = Field(description="always null: the web service drops DICOM identifiers")


class PredictResponse(ReportRecord):
    """The record, then the web-only fields."""

    report_id: str = Field(description="id of the kept report (the last N analyses are kept)")
    report_html_url: str
    report_json_url: str
    heatmap_png_base64: str | None = Field(description="the Grad-CAM overlay as a base64 PNG")


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool
    versions: dict[str, str]
    workers: int
    busy: int = Field(description="analyses running or waiting now")


class ModelResponse(BaseModel):
    architectures: list[str]
    models: list[str]
    members: int
    input_size: list[int] = Field(description="square input side in pixels, per member")
    sex_input: list[bool]
    model_mae_months: float | None = Field(description="mean validation MAE of the members (from the checkpoints)")
    member_mae_months: list[float | None]
    tta: bool
    runtime: str
    heatmap: bool
    max_upload_mb: float
    notice: str


def _errors(*codes: int, inline: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for JSON error replies; ``inline`` for routes whose own replies are not JSON
    (FastAPI would file a ``model`` under the route's media type)."""
    if inline:
        schema = ErrorResponse.model_json_schema()
        return {code: {"description": "Error", "content": {"application/json": {"schema": schema}}} for code in codes}
    return {code: {"model": ErrorResponse} for code in codes}


# --- the service ------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error for the client: HTTP status and a clear message."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclasses.dataclass
class StoredReport:
    record: dict[str, Any]
    radiograph: np.ndarray
    heatmap: np.ndarray | None
    heatmap_png: bytes | None


class ReportStore:
    """The last ``capacity`` reports, least recently used evicted first: memory stays bounded."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._items: OrderedDict[str, StoredReport] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, report: StoredReport) -> None:
        with self._lock:
            self._items[key] = report
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, key: str) -> StoredReport | None:
        with self._lock:
            report = self._items.get(key)
            if report is not None:
                self._items.move_to_end(key)
            return report

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def _cam_copy(predictor: Any) -> Any:
    """The predictor with its own copies of the models that Grad-CAM uses (hooks never touch the shared ones)."""
    clone = copy.copy(predictor)
    first = predictor.preprocess_configs[0]
    clone.members = [dataclasses.replace(m, model=copy.deepcopy(m.model))
                     for m in predictor.members if m.config.preprocess == first]
    return clone


def fast_png(image: np.ndarray) -> bytes:
    """PNG bytes for the API response: zlib level 1 and no ``optimize`` pass, several times faster than the
    reports' PNGs (``boneage.report.png_bytes``) for ~20 % more bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def display_name(filename: str | None) -> str:
    """The upload's base name, printable and at most 200 characters (no client paths)."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[-200:] or "upload"


def _blank_to_none(value: str | None) -> str | None:
    return None if value is None or not value.strip() else value


class Service:
    """The loaded models, the inference pool and the report store: everything the routes share."""

    def __init__(self, checkpoints: Sequence[str | Path], *, max_upload_mb: float = 50.0, workers: int = 2,
                 tta: bool = True, heatmap: bool = True, max_queue: int = 32, report_cache: int = 32,
                 warmup: bool = True) -> None:
        if not checkpoints:
            raise BoneAgeError("no checkpoint given; pass --checkpoint PATH (repeat it for an ensemble)")
        if not max_upload_mb > 0:
            raise BoneAgeError(f"--max-upload-mb must be positive, not {max_upload_mb}")
        if int(workers) < 1:
            raise BoneAgeError(f"--workers must be at least 1, not {workers}")
        self.predictor = load_predictor(checkpoints, runtime="torch", tta=tta)
        self.cam_predictor = _cam_copy(self.predictor) if heatmap else None
        self._cam_lock = threading.Lock()
        self.max_upload_mb = float(max_upload_mb)
        self.max_upload_bytes = int(max_upload_mb * MB)
        self.workers = int(workers)
        self.max_queue = max(int(max_queue), self.workers)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="boneage-infer")
        self.reports = ReportStore(report_cache)
        self._busy = 0
        self._busy_lock = threading.Lock()
        if warmup:
            self.warmup()

    def warmup(self) -> None:
        """One prediction and one heatmap on a synthetic image: lazy imports and first-call costs happen at
        start-up, not in the first user's request."""
        image = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
        self.predictor.predict([image], [None])
        self.heatmap(image, None)

    # admission: a bounded number of analyses running or waiting
    @property
    def busy(self) -> int:
        return self._busy

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        with self._busy_lock:
            if self._busy >= self.max_queue:
                raise ApiError(503, f"the server is busy ({self._busy} analyses running or waiting); "
                                    "retry in a few seconds")
            self._busy += 1
        try:
            yield
        finally:
            with self._busy_lock:
                self._busy -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the inference pool, awaited without blocking the event loop."""
        return await asyncio.wrap_future(self.pool.submit(fn, *args))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def model_info(self) -> dict[str, Any]:
        p = self.predictor
        return {
            "architectures": [m.config.model.name for m in p.members],
            "models": [Path(m.path).name for m in p.members],
            "members": len(p.members),
            "input_size": [int(m.config.preprocess.size) for m in p.members],
            "sex_input": [bool(m.config.model.sex_input) for m in p.members],
            "model_mae_months": None if p.mae_months is None else round(p.mae_months, 2),
            "member_mae_months": [None if m.mae_months is None else round(m.mae_months, 2) for m in p.members],
            "tta": bool(p.tta),
            "runtime": p.runtime,
            "heatmap": self.cam_predictor is not None,
            "max_upload_mb": self.max_upload_mb,
            "notice": RUO_NOTICE,
        }

    def heatmap(self, image: np.ndarray, sex: str | None) -> np.ndarray | None:
        """Grad-CAM overlay (as ``predict_array`` draws it), one request at a time on the CAM copy."""
        if self.cam_predictor is None:
            return None
        from boneage.inference.gradcam import heatmap_overlay

        with self._cam_lock:
            return heatmap_overlay(self.cam_predictor, image, None if sex is None else _MALE[sex])

    def analyse(self, upload: IO[bytes], name: str, sex: str | None, chronological_age: str | None,
                right_hand: bool) -> dict[str, Any]:
        """Blocking (runs in the pool): upload -> record + report links + heatmap; ``ApiError`` for bad input."""
        with tempfile.TemporaryDirectory(prefix="boneage-serve-") as tmp:
            suffix = Path(name).suffix.lower()
            path = Path(tmp) / ("upload" + (suffix if suffix in IMAGE_SUFFIXES else ""))
            upload.seek(0)
            with path.open("wb") as fh:
                shutil.copyfileobj(upload, fh, MB)
            size = path.stat().st_size
            if size == 0:
                raise ApiError(422, f"{name}: the file is empty (0 bytes); choose a radiograph image")
            if size > self.max_upload_bytes:
                raise ApiError(413, self.too_large_message())
            with path.open("rb") as fh:
                head = fh.read(132)
            try:
                _sniff(Path(name), head)  # the format check read_image makes, under the upload's name
            except ImageReadError as exc:
                raise ApiError(415, f"unsupported file type: {exc}") from exc
            try:
                image, meta = read_image(path, right_hand=True if right_hand else None, keep_identifiers=False)
                meta.path = name
                analysis = predict_array(self.predictor, image, meta, sex=sex, chronological_age=chronological_age,
                                         heatmap=False)
            except UnusableImageError as exc:
                raise ApiError(422, f"unusable image: {str(exc).replace(str(path), name)}") from exc
            except ImageReadError as exc:
                raise ApiError(422, f"unreadable image: {str(exc).replace(str(path), name)}") from exc
            except BoneAgeError as exc:
                raise ApiError(422, str(exc).replace(str(path), name)) from exc
        overlay = self.heatmap(image, analysis.record["sex"])
        heatmap_png = None if overlay is None else fast_png(overlay)
        report_id = uuid.uuid4().hex
        record = analysis.record
        record["heatmap"] = None if overlay is None else f"{API}/report/{report_id}/heatmap.png"
        self.reports.put(report_id, StoredReport(copy.deepcopy(record), analysis.radiograph, overlay, heatmap_png))
        log.info("predict %s: %s %dx%d, bone age %.1f months", report_id, meta.format, meta.width, meta.height,
                 record["bone_age_months"])
        return {
            **record,
            "report_id": report_id,
            "report_html_url": f"{API}/report/{report_id}.html",
            "report_json_url": f"{API}/report/{report_id}.json",
            "heatmap_png_base64": None if heatmap_png is None else base64.b64encode(heatmap_png).decode("ascii"),
        }

    def too_large_message(self) -> str:
        return (f"the upload is larger than the limit of {self.max_upload_mb:g} MB; send a smaller file "
                "(or start the server with a larger --max-upload-mb)")

    def report(self, report_id: str) -> StoredReport:
        stored = self.reports.get(report_id) if _REPORT_ID.match(report_id) else None
        if stored is None:
            raise ApiError(404, f"report {report_id!r} not found: the server keeps only the last "
                                f"{self.reports.capacity} reports; analyse the image again")
        return stored


# --- upload size limit, enforced while the body streams in -----------------------------------------


class UploadLimitMiddleware:
    """413 for request bodies over the limit on the upload route: at once if Content-Length says so,
    else as soon as the streamed bytes pass it (nothing beyond the limit is read)."""

    def __init__(self, app: ASGIApp, *, service: Service, paths: tuple[str, ...]) -> None:
        self.app, self.service, self.paths = app, service, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        limit = self.service.max_upload_bytes + MULTIPART_OVERHEAD
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            response = JSONResponse({"detail": self.service.too_large_message()}, status_code=413,
                                    headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, self.service.too_large_message(), headers={"Connection": "close"})
            return message

        await self.app(scope, limited_receive, send)


class SecurityHeadersMiddleware:
    """nosniff and no-referrer everywhere; a strict CSP for the page (no inline script, no CDN)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if b"content-security-policy" not in names and (path == "/" or path.startswith("/static/")):
                    headers.append((b"content-security-policy", _PAGE_CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- the app ----------------------------------------------------------------------------------------


def _static_dir() -> Path:
    return Path(str(resources.files("boneage.serve").joinpath("static")))


def _versions() -> dict[str, str]:
    import fastapi
    import torch

    return {"boneage": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "fastapi": fastapi.__version__, "numpy": np.__version__}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]
        parts.append(f"{'.'.join(loc) or 'request'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def create_app(checkpoints: Sequence[str | Path], *, max_upload_mb: float = 50.0, workers: int = 2,
               tta: bool = True, heatmap: bool = True, max_queue: int = 32, report_cache: int = 32,
               warmup: bool = True) -> FastAPI:
    """The FastAPI app with the model(s) loaded; ``CheckpointError`` if a checkpoint cannot be used.

    ``workers`` inference threads; uploads over ``max_upload_mb`` get 413; at most ``max_queue`` analyses
    run or wait (503 beyond); the last ``report_cache`` reports are kept; ``warmup`` runs one dummy
    prediction at start-up so that the first request is not slow.
    """
    service = Service(checkpoints, max_upload_mb=max_upload_mb, workers=workers, tta=tta, heatmap=heatmap,
                      max_queue=max_queue, report_cache=report_cache, warmup=warmup)
    app = FastAPI(
        title="boneage",
        version=__version__,
        description=("Pediatric bone age from a left-hand radiograph (PNG, JPEG or DICOM). "
                     f"**{RUO_NOTICE}.** The estimate must not be used for diagnosis or treatment."),
    )
    app.state.service = service
    predict_path = f"{API}/predict"
    app.add_middleware(UploadLimitMiddleware, service=service, paths=(predict_path,))
    app.add_middleware(SecurityHeadersMiddleware)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"},
                            status_code=500)

    @app.post(predict_path, tags=["api"], response_model=None,
              responses={200: {"model": PredictResponse}, **_errors(400, 413, 415, 422, 503)},
              summary="Estimate the bone age of one radiograph")
    async def predict(
        image: UploadFile = File(..., description="left-hand radiograph: PNG, JPEG or DICOM"),
        sex: str | None = Form(None, description="F or M (also female/male/girl/boy); default: DICOM PatientSex, "
                                                 "else unknown (both sexes averaged, no z-score)"),
        chronological_age: str | None = Form(None, description="e.g. '9y3m', '9y', '111' (months); default: "
                                                               "from the DICOM header"),
        right_hand: bool = Form(False, description="the image shows a right hand: mirror it"),
    ) -> JSONResponse:
        """The same JSON record as ``boneage predict`` (SCHEMA.md), with the clinical interpretation,
        the Grad-CAM heatmap as a base64 PNG and links to the kept HTML/JSON report."""
        sex, chronological_age = _blank_to_none(sex), _blank_to_none(chronological_age)
        try:
            parse_request(sex, chronological_age)  # bad sex/age: 422 before any work on the image
        except BoneAgeError as exc:
            raise ApiError(422, str(exc)) from exc
        if image.size is not None and image.size > service.max_upload_bytes:
            raise ApiError(413, service.too_large_message())
        name = display_name(image.filename)
        started = time.perf_counter()
        with service.admit():
            result = await service.run(service.analyse, image.file, name, sex, chronological_age, right_hand)
        log.debug("predict took %.0f ms", (time.perf_counter() - started) * 1000)
        return JSONResponse(result)

    @app.get(f"{API}/health", tags=["api"], response_model=HealthResponse, summary="Liveness and versions")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model_loaded": bool(service.predictor.members), "versions": _versions(),
                "workers": service.workers, "busy": service.busy}

    @app.get(f"{API}/model", tags=["api"], response_model=ModelResponse, summary="The loaded model(s)")
    async def model() -> dict[str, Any]:
        return service.model_info()

    @app.get(API + "/report/{report_id}.html", tags=["reports"], response_class=HTMLResponse,
             responses=_errors(404, 422, inline=True), summary="The HTML report of a recent analysis")
    async def report_html(report_id: str, download: bool = False) -> HTMLResponse:
        stored = service.report(report_id)
        html = await service.run(render_html, stored.record, stored.radiograph, stored.heatmap)
        stem = Path(stored.record["file"]).stem or "report"
        disposition = "attachment" if download else "inline"
        return HTMLResponse(html, headers={"Content-Security-Policy": _REPORT_CSP,
                                           "Content-Disposition": f'{disposition}; filename="{_ascii(stem)}'
                                                                  f'_boneage.html"'})

    @app.get(API + "/report/{report_id}.json", tags=["reports"], response_model=None,
             responses={200: {"model": ReportRecord}, **_errors(404, 422)},
             summary="The JSON record of a recent analysis")
    async def report_json(report_id: str) -> JSONResponse:
        return JSONResponse(service.report(report_id).record)

    @app.get(API + "/report/{report_id}/heatmap.png", tags=["reports"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}, **_errors(404, 422, inline=True)},
             summary="The Grad-CAM overlay of a recent analysis")
    async def report_heatmap(report_id: str) -> Response:
        stored = service.report(report_id)
        if stored.heatmap_png is None:
            raise ApiError(404, f"report {report_id!r} has no heatmap")
        return Response(stored.heatmap_png, media_type="image/png")

    static = _static_dir()

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=static), name="static")
    return app


def _ascii(text: str) -> str:
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in text)[:100] or "report"


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


def _torch_threads(workers: int) -> int:
    """Intra-op threads per inference worker: the usable cores shared out (OMP_NUM_THREADS wins if set)."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // max(1, int(workers))))
    return torch.get_num_threads()


def run_server(args: argparse.Namespace) -> int:
    """``boneage serve``: load the model(s), then serve until Ctrl+C."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    threads = _torch_threads(args.workers)
    sock = _bind(args.host, args.port)  # fail fast (port in use) before loading models
    try:
        app = create_app(args.checkpoint, max_upload_mb=args.max_upload_mb, workers=args.workers)
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
          + f", TTA {'on' if info['tta'] else 'off'}; {service.workers} inference worker(s) x {threads} torch "
          f"thread(s); "
          f"uploads up to {service.max_upload_mb:g} MB\n"
          f"  {RUO_NOTICE}. Ctrl+C stops the server.", flush=True)
    if not _is_loopback(args.host):
        print(f"boneage serve: warning: listening on {args.host}, not only this machine: anyone who can reach "
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
