"""The analysis service behind the routes: uploads -> records through the analysis pipeline (an upload is one
more source), the report LRU, the Grad-CAM lock."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import logging
import re
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

from boneage.device import check_precision
from boneage.errors import BoneAgeError, ImageReadError
from boneage.inference.analysis import Pending, parse_request
from boneage.inference.batch import load_predictor
from boneage.inference.pipeline import AnalysisOptions, Pipeline, prepare_item
from boneage.inference.sources import upload_item
from boneage.io import IMAGE_SUFFIXES, _sniff
from boneage.report.images import png_bytes
from boneage.report.schema import RUO_NOTICE
from boneage.serve.schemas import API, MB, _REPORT_ID

log = logging.getLogger("boneage.serve")
T = TypeVar("T")

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
    """PNG bytes for the API response: zlib level 1, faster than the reports' level 6 for ~25 % more bytes."""
    return png_bytes(image, compress_level=1)


def display_name(filename: str | None) -> str:
    """The upload's base name, printable and at most 200 characters (no client paths)."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[-200:] or "upload"


def _blank_to_none(value: str | None) -> str | None:
    return None if value is None or not value.strip() else value


@dataclasses.dataclass(frozen=True)
class ServiceOptions:
    """Every option of the service, typed and checked when built; ``boneage serve`` maps its flags onto these
    (``--threads``, ``--max-upload-mb``, ``--max-queue``, ``--report-cache``, ``--no-tta``, ...)."""

    checkpoints: Sequence[str | Path]
    max_upload_mb: float = 50.0  # larger uploads get 413
    threads: int = 2  # inference threads (analyses running at once)
    tta: bool = True
    heatmap: bool = True
    max_queue: int = 32  # analyses running or waiting; beyond it 503
    report_cache: int = 32  # the last N reports kept for the HTML / JSON links
    warmup: bool = True  # one dummy analysis at start-up, so the first request is not slow
    interval_level: float = 0.9
    device: str = "auto"
    precision: str = "fp32"  # fp16 / bf16: autocast
    ood_check: bool = True

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if not self.checkpoints:
            raise BoneAgeError("no checkpoint given; pass --checkpoint PATH (repeat it for an ensemble)")
        if not self.max_upload_mb > 0:
            raise BoneAgeError(f"--max-upload-mb must be positive, not {self.max_upload_mb}")
        if int(self.threads) < 1:
            raise BoneAgeError(f"--threads must be at least 1, not {self.threads}")
        if int(self.max_queue) < 1 or int(self.report_cache) < 0:
            raise BoneAgeError(f"--max-queue must be at least 1 and --report-cache at least 0, not "
                               f"{self.max_queue} / {self.report_cache}")
        if not 0.5 <= self.interval_level <= 0.995:
            raise BoneAgeError(f"--interval-level must be from 0.5 to 0.995, not {self.interval_level}")


class Service:
    """The loaded models, the inference pool and the report store: everything the routes share."""

    def __init__(self, options: ServiceOptions) -> None:
        o = self.options = options
        self.interval_level = float(o.interval_level)
        self.ood_check = bool(o.ood_check)
        self.predictor = load_predictor(list(o.checkpoints), runtime="torch", tta=o.tta, device=o.device,
                                        precision=o.precision)
        # the heatmap is drawn by ``heatmap`` on the CAM copy, one at a time: the pipeline itself draws none
        self.pipeline = Pipeline(self.predictor, AnalysisOptions(interval_level=self.interval_level,
                                                                 ood_check=self.ood_check))
        self.cam_predictor = _cam_copy(self.predictor) if o.heatmap else None
        self._cam_lock = threading.Lock()
        self.max_upload_mb = float(o.max_upload_mb)
        self.max_upload_bytes = int(o.max_upload_mb * MB)
        self.threads = int(o.threads)
        self.max_queue = max(int(o.max_queue), self.threads)
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="boneage-infer")
        self.reports = ReportStore(o.report_cache)
        self._busy = 0
        self._busy_lock = threading.Lock()
        if o.warmup:
            self.warmup()

    def warmup(self) -> None:
        """One prediction and one heatmap on a synthetic image: lazy imports and first-call costs happen at
        start-up, not in the first user's request."""
        from boneage.inference.analysis import prepare

        image = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
        self.predictor.predict([image], [None])
        if self.cam_predictor is not None:
            self.heatmap(prepare(self.pipeline.configs, image, cam_view=True))

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

    def heatmap(self, pending: Pending) -> np.ndarray | None:
        """Grad-CAM overlay (as ``boneage predict`` draws it, from the prepared image), one request at a time on
        the CAM copy."""
        if self.cam_predictor is None or pending.cam_view is None:
            return None
        from boneage.inference.gradcam import heatmap_overlay

        with self._cam_lock:
            return heatmap_overlay(self.cam_predictor, pending.by_config[0][0], pending.cam_view, pending.male)

    def analyse(self, upload: IO[bytes], name: str, sex: str | None, chronological_age: str | float | None,
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
            sex_code, ca = parse_request(sex, chronological_age)
            options = dataclasses.replace(self.pipeline.options, sex=sex_code, chronological_age=ca,
                                          right_hand=True if right_hand else None,
                                          heatmap=self.cam_predictor is not None)
            item = dataclasses.replace(upload_item(name, b""), path=path, size=size)
            prepared = prepare_item(item, self.pipeline.configs, options)
            if not isinstance(prepared, Pending):
                raise ApiError(422, _api_message(prepared.record))
            [(_, record, analysis)] = list(self.pipeline.analyse([(item, prepared)]))
            if analysis is None:
                raise ApiError(422, _api_message(record))
        overlay = self.heatmap(prepared)
        heatmap_png = None if overlay is None else fast_png(overlay)
        report_id = uuid.uuid4().hex
        record["heatmap"] = None if overlay is None else f"{API}/report/{report_id}/heatmap.png"
        radiograph = analysis.radiograph
        assert radiograph is not None  # the service's pipeline keeps it (AnalysisOptions.display)
        self.reports.put(report_id, StoredReport(copy.deepcopy(record), radiograph, overlay, heatmap_png))
        image = record["image"]
        log.info("predict %s: %s %dx%d, bone age %.1f months", report_id, image["format"], image["width"],
                 image["height"], record["bone_age_months"])
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


def _api_message(record: dict[str, Any]) -> str:
    """The 422 message of an upload that was not analysed, as the API has always worded it."""
    prefix = {"unusable image": "unusable image: ", "out of distribution": "unusable image: ",
              "unreadable": "unreadable image: "}.get(record["reason"], "")
    return prefix + str(record["error"])
