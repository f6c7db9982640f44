"""The web service: REST API under ``/api/v1``, a browser page at ``/`` and OpenAPI docs at ``/docs``.

``create_app(checkpoints)`` loads the model(s) once and returns a FastAPI app with the routes below;
``boneage.serve.server.run_server`` (the ``boneage serve`` command) runs it with uvicorn on 127.0.0.1 unless
told otherwise. The pieces, one concern per module: ``schemas`` (paths, limits, response models),
``service`` (the analysis and the report store), ``middleware`` (upload limit, security headers), ``server``.

One analysis path: an upload is streamed to a temporary file (the size limit is enforced while
the body arrives), then analysed as one more source of the analysis pipeline (``boneage.inference.pipeline``: the same
prepare -> infer -> explain -> finish that ``boneage predict`` runs), so the API
returns the same JSON record (``boneage/report/SCHEMA.md``), plus the report's id and links and the
Grad-CAM heatmap as a base64 PNG.

Concurrency: analyses run in a thread pool of ``threads`` threads, so the event loop stays free,
and at most ``max_queue`` uploads wait for it (more get 503). Predictions share the loaded models,
which are never modified per request (eval mode, ``torch.inference_mode``). Grad-CAM is different:
it hooks a layer and back-propagates, so it runs on its own copy of the models, one request at a
time under a lock; the hooks can then never see another request's forward pass.

Reports: the last ``report_cache`` analyses are kept in a bounded LRU (record, radiograph and
heatmap) for ``GET /api/v1/report/{id}.html`` / ``.json`` / ``/heatmap.png``; older ids give 404.
DICOM patient identifiers are never read into a record here, and no file name is logged.
"""

from __future__ import annotations

import html
import logging
import platform
import time
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from boneage import __version__
from boneage.errors import BoneAgeError
from boneage.inference.analysis import parse_request
from boneage.report import render_html
from boneage.report.schema import RUO_NOTICE
from boneage.serve.middleware import (
    UPLOAD_IDLE_TIMEOUT_S, HostOriginMiddleware, SecurityHeadersMiddleware, UploadLimitMiddleware)
from boneage.serve.schemas import (API, MULTIPART_OVERHEAD, _REPORT_CSP, ErrorResponse, HealthResponse,  # noqa: F401
                                   ImageInfo, ModelResponse, PredictResponse, ReportRecord, _errors)
from boneage.serve.service import (ApiError, ReportStore, Service, ServiceOptions, _blank_to_none,  # noqa: F401
                                   display_name)

log = logging.getLogger("boneage.serve")


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


def create_app(options: ServiceOptions, *, allowed_hosts: Sequence[str] | None = None,
               upload_idle_timeout_s: float = UPLOAD_IDLE_TIMEOUT_S) -> FastAPI:
    """The FastAPI app with the model(s) of ``options`` loaded; ``CheckpointError`` if a checkpoint cannot be used.

    ``options.threads`` inference threads; uploads over ``options.max_upload_mb`` get 413; at most
    ``options.max_queue`` analyses run or wait (503 beyond); the last ``options.report_cache`` reports are kept;
    ``options.warmup`` runs one dummy prediction at start-up so that the first request is not slow.
    ``allowed_hosts``: the names the ``Host`` header may carry (``boneage serve`` passes the loopback names for a
    loopback bind); cross-site POSTs are always refused (``HostOriginMiddleware``).
    """
    service = Service(options)
    app = FastAPI(
        docs_url=None, redoc_url=None,  # FastAPI's pages load Swagger UI / ReDoc from a CDN: not offline
        title="boneage",
        version=__version__,
        description=("Pediatric bone age from a left-hand radiograph (PNG, JPEG or DICOM). "
                     f"**{RUO_NOTICE}.** The estimate must not be used for diagnosis or treatment."),
    )
    app.state.service = service
    predict_path = f"{API}/predict"
    app.add_middleware(UploadLimitMiddleware, service=service, paths=(predict_path,),
                       idle_timeout_s=upload_idle_timeout_s)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(HostOriginMiddleware, allowed_hosts=None if allowed_hosts is None else tuple(allowed_hosts))

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
        chronological_age: str | None = Form(None, description="with its unit: e.g. '9y3m', '9.25y', '111m' (a "
                                                               "bare number is refused); default: the DICOM header"),
        chronological_age_months: float | None = Form(None, description="the same as a number of months, e.g. 111; "
                                                                        "give this or chronological_age, not both"),
        right_hand: bool = Form(False, description="the image shows a right hand: mirror it"),
    ) -> JSONResponse:
        """The same JSON record as ``boneage predict`` (SCHEMA.md), with the clinical interpretation,
        the Grad-CAM heatmap as a base64 PNG and links to the kept HTML/JSON report."""
        sex, chronological_age = _blank_to_none(sex), _blank_to_none(chronological_age)
        age: str | float | None = chronological_age
        if chronological_age_months is not None:
            if chronological_age is not None:
                raise ApiError(422, "give chronological_age (with its unit) or chronological_age_months, not both")
            age = chronological_age_months
        try:
            parse_request(sex, age)  # bad sex/age: 422 before any work on the image
        except BoneAgeError as exc:
            raise ApiError(422, str(exc)) from exc
        if image.size is not None and image.size > service.max_upload_bytes:
            raise ApiError(413, service.too_large_message())
        name = display_name(image.filename)
        started = time.perf_counter()
        with service.admit():
            result = await service.run(service.analyse, image.file, name, sex, age, right_hand)
        log.debug("predict took %.0f ms", (time.perf_counter() - started) * 1000)
        return JSONResponse(result)

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    async def docs() -> HTMLResponse:
        """Offline API documentation: the routes from the OpenAPI schema, and a link to the schema itself."""
        spec = app.openapi()
        rows = "".join(f"<tr><td><code>{html.escape(method.upper())}</code></td><td><code>{html.escape(path)}</code>"
                       f"</td><td>{html.escape(op.get('summary', ''))}</td></tr>"
                       for path, ops in spec["paths"].items() for method, op in ops.items())
        return HTMLResponse(
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>boneage API</title></head><body>"
            f"<h1>boneage API {html.escape(__version__)}</h1><p>The full OpenAPI 3 schema is "
            "<a href=\"/openapi.json\">/openapi.json</a>: open it in any OpenAPI viewer or client generator. "
            "(This server works offline, so it loads no Swagger UI from the internet.)</p>"
            f"<table><tr><th>method</th><th>path</th><th>what</th></tr>{rows}</table>"
            f"<p>{html.escape(RUO_NOTICE)}.</p></body></html>")

    @app.get(f"{API}/health", tags=["api"], response_model=HealthResponse, summary="Liveness and versions")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model_loaded": bool(service.predictor.members), "versions": _versions(),
                "threads": service.threads, "busy": service.busy}

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
