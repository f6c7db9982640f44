"""The Ray engine of ``boneage predict --engine ray``: Ray Data batch inference over a Ray cluster.

The driver (``boneage.inference.batch``) reads the sources, skips what the table already holds and writes the table
and the reports; this module only scores. The inputs are cut into shards of ``SHARD_SIZE`` so memory stays bounded
and results stream back; each shard is a Ray Dataset of plain rows (the ``SourceItem`` fields) mapped by a pool of
``PredictorActor`` s (``map_batches`` with an actor pool): each actor loads the ensemble once (``load_predictor``)
and runs ``Pipeline.prepare`` and ``Pipeline.analyse`` on its batches, so decoding, preprocessing and the models all
run on the cluster. Rows come back in any order (the table is keyed by file); every input of a shard comes back
exactly once, as its record and, for an analysed image, its pictures as PNG bytes.

Actors (``actor_plan``): on CPUs, one per ``CPUS_PER_ACTOR`` CPUs of the cluster; with ``--device auto`` or ``cuda``
and GPUs in the cluster, one per GPU. The run's label says which, and on what.

Where Ray runs: ``--ray-address`` (``auto``: the cluster started on this machine with ``ray start --head``;
``ray://host:10001``: Ray Client) connects to a cluster; without it, a Ray already initialised in this process is
reused, else a local Ray is started for the run (the workers inherit this Python environment) and shut down after.
No ``runtime_env`` is shipped: on a remote cluster every node's image must have the same ``boneage`` version
installed (``pip install 'boneage[distributed]'``, which brings Ray), and the input files and checkpoints must be
readable at the same paths on every node (shared storage).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import socket
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from boneage.errors import BoneAgeError
from boneage.inference.analysis import Analysis
from boneage.inference.pipeline import AnalysisOptions, Pipeline, cpu_count
from boneage.inference.sources import SourceItem

if TYPE_CHECKING:
    from boneage.inference.batch import PredictOptions

SHARD_SIZE = 4096  # inputs per Ray Dataset: bounds the driver's memory; results stream back shard by shard
CPUS_PER_ACTOR = 1
INSTALL_HINT = "pip install 'boneage[distributed]'"
PROBE_TIMEOUT_S = 10.0  # a host:port that does not answer: ray.init itself would wait for minutes
# Ray Data loggers silenced while a run executes: the per-dataset "Starting execution" lines and the notice that
# progress bars are off (its warnings about resources still show).
_QUIET_LOGGERS = {"ray.data._internal.execution.streaming_executor": logging.WARNING,
                  "ray.data._internal.progress": logging.ERROR}
Row = tuple[SourceItem, dict[str, Any], Analysis | None]


def _import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a ``BoneAgeError`` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data comes with the [data] extra of ray
    except ImportError as exc:
        raise BoneAgeError(f"--engine ray needs Ray Data, which is not installed ({exc}): {INSTALL_HINT}") from exc
    return ray


@dataclasses.dataclass(frozen=True)
class ActorPlan:
    """How many predictor actors, and what each one reserves."""

    actors: int
    num_cpus: float
    num_gpus: float
    device: str  # what each actor loads the models on: Ray shows an actor only its own GPU, so "cuda", not "cuda:N"

    def describe(self, actors: int, where: str) -> str:
        each = f"1 GPU and {self.num_cpus:g} CPU" if self.num_gpus else f"{self.num_cpus:g} CPU"
        return (f"Ray Data, {actors} predictor actor{'s' if actors != 1 else ''} of {each}"
                f"{' each' if actors != 1 else ''} on {where}")


def actor_plan(options: PredictOptions, resources: dict[str, float] | None = None) -> ActorPlan:
    """The actors for ``options.device`` on a cluster with ``resources`` (default: ``ray.cluster_resources()``
    of the Ray this process is connected to): one per GPU with ``auto``/``cuda`` and GPUs, else one per
    ``CPUS_PER_ACTOR`` CPUs (at least one); ``BoneAgeError`` for ``cuda`` on a cluster without GPUs."""
    if resources is None:
        resources = dict(_import_ray().cluster_resources())
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    device = options.device.strip().lower()
    if device.startswith("cuda") and gpus == 0:
        raise BoneAgeError(f"--device {options.device}: the Ray cluster has no GPU; use --device cpu or auto")
    if device != "cpu" and gpus > 0:
        return ActorPlan(actors=gpus, num_cpus=CPUS_PER_ACTOR, num_gpus=1, device="cuda")
    return ActorPlan(actors=max(1, cpus // CPUS_PER_ACTOR), num_cpus=CPUS_PER_ACTOR, num_gpus=0, device="cpu")


def actor_count(options: PredictOptions) -> int:
    """How many predictor actors ``ray_batches`` starts for a full shard on the connected Ray cluster."""
    return actor_plan(options).actors


def item_row(index: int, item: SourceItem) -> dict[str, Any]:
    """The plain row of one input (Arrow-friendly: no None, which Ray Data would turn into NaN)."""
    return {"index": index, "key": item.key, "path": "" if item.path is None else str(item.path),
            "has_data": item.data is not None, "data": item.data or b"", "size": item.size,
            "mtime_ns": item.mtime_ns, "root": item.root}


def row_item(batch: dict[str, np.ndarray], k: int) -> SourceItem:
    """The ``SourceItem`` of row ``k`` of a batch of ``item_row`` rows."""
    path = str(batch["path"][k])
    return SourceItem(key=str(batch["key"][k]), path=Path(path) if path else None,
                      data=bytes(batch["data"][k]) if bool(batch["has_data"][k]) else None,
                      size=int(batch["size"][k]), mtime_ns=int(batch["mtime_ns"][k]), root=str(batch["root"][k]))


def decode_png(data: bytes) -> np.ndarray | None:
    """PNG bytes from ``png_bytes`` -> the uint8 array (gray [H, W] or RGB [H, W, 3]); None for b""."""
    if not data:
        return None
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


class PredictorActor:
    """A Ray Data actor: loads the ensemble once, then scores batches of ``item_row`` rows."""

    def __init__(self, checkpoints: Sequence[str], runtime: str, tta: bool, device: str, precision: str,
                 threads: int, analysis_options: AnalysisOptions) -> None:
        import cv2

        from boneage.inference.loader import load_predictor

        cv2.setNumThreads(1)  # the actors are the parallelism
        if runtime == "torch" and device == "cpu":
            import torch

            torch.set_num_threads(threads)
        self.pipeline: Pipeline | None = None
        self.model = self.fatal = ""
        try:
            predictor = load_predictor(list(checkpoints), runtime=runtime, tta=tta, device=device,
                                       precision=precision, threads=threads)
        except BoneAgeError as exc:  # sent back as data: Ray would restart the actor and bury the message
            self.fatal = str(exc)
            return
        self.pipeline = Pipeline(predictor, analysis_options)
        fields = self.pipeline.model_fields()
        self.model = json.dumps({"models": fields["models"], "device": predictor.device_label,
                                 "mae": fields["model_mae_months"]})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows -> index, key, ``record_json``, ``analysed``, ``radiograph_png``, ``heatmap_png``, ``model`` and
        ``fatal`` (why the models could not load, for the driver to raise; "" when they did)."""
        from boneage.report.images import png_bytes

        items = [row_item(batch, k) for k in range(len(batch["key"]))]
        columns: dict[str, list[Any]] = {"record_json": [], "analysed": [], "radiograph_png": [], "heatmap_png": []}
        scored = [] if self.pipeline is None else self.pipeline.analyse(
            [(item, self.pipeline.prepare(item)) for item in items])
        for _, record, analysis in scored:
            pictures = (None, None) if analysis is None else (analysis.radiograph, analysis.heatmap)
            for name, value in zip(columns, (json.dumps(record), analysis is not None,
                                             *(b"" if p is None else png_bytes(p) for p in pictures))):
                columns[name].append(value)
        if self.pipeline is None:
            columns = {"record_json": [""] * len(items), "analysed": [False] * len(items),
                       "radiograph_png": [b""] * len(items), "heatmap_png": [b""] * len(items)}
        return {"index": np.asarray(batch["index"]), "key": np.asarray([it.key for it in items], dtype=object),
                **{name: np.asarray(values, dtype=bool if name == "analysed" else object)
                   for name, values in columns.items()},
                "model": np.asarray([self.model] * len(items), dtype=object),
                "fatal": np.asarray([self.fatal] * len(items), dtype=object)}


def _probe(address: str) -> None:
    """Open and close a TCP connection to a ``host:port`` or ``ray://host:port`` address (``OSError`` if none
    answers within ``PROBE_TIMEOUT_S``); other addresses (``auto``) are left to Ray."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if sep and host and port.isdigit():
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()


def _connect(ray: Any, address: str | None) -> tuple[bool, str]:
    """Connect to (or start) Ray: (whether this call started it, where it runs in words)."""
    if ray.is_initialized():
        return False, f"the Ray cluster at {ray.get_runtime_context().gcs_address}"
    if address:
        try:
            _probe(address)
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError... all mean the same
            raise BoneAgeError(
                f"--ray-address {address}: cannot connect to the Ray cluster ({type(exc).__name__}: {exc}); check "
                "that it is up ('ray status' on its head node), that the address is right ('auto' for a cluster "
                "started here with 'ray start --head', ray://host:10001 for Ray Client) and that this machine has "
                "the cluster's Ray and Python versions") from exc
        return True, address
    cpus = cpu_count()
    ray.init(num_cpus=cpus, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
             logging_level=logging.WARNING)
    return True, f"a local Ray of {cpus} CPU{'s' if cpus != 1 else ''}"


def _shard_batches(ray: Any, o: PredictOptions, plan: ActorPlan, actors: int, analysis_options: AnalysisOptions,
                   shard: list[SourceItem]) -> Iterator[tuple[list[Row], str]]:
    """One shard through the actor pool: (rows, the actors' model description) per batch that comes back."""
    dataset = ray.data.from_items([item_row(i, item) for i, item in enumerate(shard)])
    kwargs = dict(checkpoints=[str(c) for c in o.checkpoints], runtime=o.runtime, tta=o.tta, device=plan.device,
                  precision=o.precision, threads=max(1, int(plan.num_cpus)), analysis_options=analysis_options)
    scored = dataset.map_batches(PredictorActor, fn_constructor_kwargs=kwargs, batch_size=o.batch_size,
                                 batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                                 num_cpus=plan.num_cpus, num_gpus=plan.num_gpus or None)
    seen: set[int] = set()
    for out in scored.iter_batches(batch_size=o.batch_size, batch_format="numpy"):
        if fatal := next((str(f) for f in out["fatal"] if f), ""):
            raise BoneAgeError(fatal)  # the models could not load (e.g. a checkpoint not found on a node)
        rows: list[Row] = []
        for k, index in enumerate(int(i) for i in out["index"]):
            if index in seen or index >= len(shard) or shard[index].key != str(out["key"][k]):
                continue  # a batch a restarted actor ran twice: the first copy counts
            seen.add(index)
            record = json.loads(str(out["record_json"][k]))
            analysis = (Analysis(record, decode_png(bytes(out["radiograph_png"][k])),
                                 decode_png(bytes(out["heatmap_png"][k]))) if bool(out["analysed"][k]) else None)
            rows.append((shard[index], record, analysis))
        if rows:
            yield rows, str(out["model"][0])
    if len(seen) != len(shard):
        missing = [item.key for i, item in enumerate(shard) if i not in seen]
        raise BoneAgeError(f"Ray returned {len(seen)} of {len(shard)} inputs (first missing: {missing[0]}); "
                           "rerun the same command to score the rest (the table keeps what is done)")


def _label(model: str, plan_text: str) -> str:
    """What runs the models, like the local engine's label."""
    fields = json.loads(model)
    return (f"{', '.join(fields['models'])} ({fields['device']}; {plan_text})"
            + (f"; measured validation MAE {fields['mae']:.1f} months" if fields["mae"] is not None else ""))


def ray_batches(o: PredictOptions, analysis_options: AnalysisOptions, items: Iterable[SourceItem]
                ) -> Iterator[Any]:
    """The Ray engine: yields a label of what runs the models, then batches of (input, record, analysis or None),
    in any order, every input exactly once. The label comes with the first batch back (the actors load the models);
    a ``BoneAgeError`` if Ray is missing or unreachable or the actors cannot load the models."""
    ray = _import_ray()
    started, where = _connect(ray, o.ray_address)
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    try:
        context.enable_progress_bars = False
        for name, level in _QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        plan = actor_plan(o)
        source, labelled = iter(items), False
        while shard := list(islice(source, SHARD_SIZE)):
            actors = min(plan.actors, -(-len(shard) // o.batch_size))  # no more actors than the shard has batches
            for rows, model in _shard_batches(ray, o, plan, actors, analysis_options, shard):
                if not labelled:
                    yield _label(model, plan.describe(actors, where))
                    labelled = True
                yield rows
        if not labelled:
            yield f"no models loaded ({plan.describe(0, where)}): no inputs"
    finally:
        context.enable_progress_bars = bars
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if started:
            ray.shutdown()
