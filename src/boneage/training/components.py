"""What ``BoneAgeRunner`` builds from a ``Config``, from tables keyed by the very ``Literal`` names the config
declares (``OptimizerName``, ``SchedulerName``, ``LossName``, ``EngineName``): a name the config accepts always has
an entry (tests/test_training.py checks it), so there is no "unknown name" branch to reach.

Engines: ``cpu``; ``gpu`` (AMP: bf16 where the GPU supports it, else fp16); ``auto`` (GPU if there is one, else CPU);
``ddp``: Catalyst's ``DistributedDataParallelEngine``, gloo on CPU, ``train.ddp_backend`` on GPU, in one of two ways:

- launched by ``torchrun`` (or any launcher that sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``, env://
  rendezvous at ``MASTER_ADDR:MASTER_PORT``): every process already exists, on any number of nodes;
  ``LaunchedDDPEngine`` joins the process group with the launcher's world size and ranks and spawns nothing;
- otherwise ``SpawningDDPEngine`` starts ``train.ddp_workers`` processes on this machine (Catalyst's way), and
  hands rank 0's summary back to the process that called ``train()``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.multiprocessing as mp
from catalyst import dl

from boneage.config import Config, EngineName, LossName, OptimizerName, SchedulerName, TrainConfig
from boneage.errors import ConfigError
from boneage.training.budget import Budget
from boneage.training.schedule import BudgetOneCycleLR

LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")

OPTIMIZERS: dict[OptimizerName, Callable[[list[dict[str, Any]], float, TrainConfig], torch.optim.Optimizer]] = {
    "adam": lambda params, lr, t: torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay),
    "adamw": lambda params, lr, t: torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay),
    "sgd": lambda params, lr, t: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                                                 weight_decay=t.weight_decay),
}

LOSSES: dict[LossName, Callable[[], torch.nn.Module]] = {
    "l1": torch.nn.L1Loss, "smooth_l1": torch.nn.SmoothL1Loss, "mse": torch.nn.MSELoss,
}


def _onecycle(optimizer: torch.optim.Optimizer, t: TrainConfig, steps_per_epoch: int, budget: Budget | None) -> Any:
    cycle: dict[str, Any] = dict(max_lr=[g["lr"] for g in optimizer.param_groups], epochs=t.epochs,
                                 steps_per_epoch=steps_per_epoch, pct_start=t.warmup_pct)
    if t.anneal_by == "time" and budget is not None:
        return BudgetOneCycleLR(optimizer, budget=budget, **cycle)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, **cycle)


# (optimizer, train config, steps per epoch, time budget or None) -> scheduler; the callback steps it per batch
# for onecycle, per epoch otherwise (plateau: on the validation metric)
SCHEDULERS: dict[SchedulerName, Callable[[torch.optim.Optimizer, TrainConfig, int, Budget | None], Any]] = {
    "onecycle": _onecycle,
    "cosine": lambda opt, t, steps, budget: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs),
    "plateau": lambda opt, t, steps, budget: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2),
    "none": lambda opt, t, steps, budget: None,
}

# train.amp on a GPU: bf16 where the GPU supports it (Ampere and later: no loss scaling, fp32's range), else fp16;
# keyed by torch.cuda.is_bf16_supported()
AMP_PRECISION: dict[bool, str] = {True: "bf16", False: "fp16"}


def mixed_precision(amp: bool, cuda: bool) -> str:
    """accelerate's ``mixed_precision`` for ``train.amp``: "no" on the CPU or without AMP."""
    if not (amp and cuda):
        return "no"
    return AMP_PRECISION[bool(torch.cuda.is_bf16_supported())]


def require_usable_gpu(cuda: bool) -> None:
    """``train.engine=gpu``: a visible GPU that runs a kernel, else a clear ``ConfigError`` (never the CPU)."""
    if not cuda:
        raise ConfigError("train.engine=gpu but PyTorch sees no usable CUDA GPU (none in this machine or job, "
                          "CUDA_VISIBLE_DEVICES empty, a CPU-only torch build, or a driver too old for torch "
                          f"{torch.__version__} built for CUDA {torch.version.cuda}); use --engine cpu (or "
                          "train.engine=auto) to train on the CPU on purpose")
    try:
        (torch.ones(8, device="cuda") * 2).sum().item()
    except Exception as exc:  # a CUDA init error, no kernel image for this GPU, a driver too old ...
        first = (str(exc).strip().splitlines() or [repr(exc)])[0]
        raise ConfigError(f"train.engine=gpu but the GPU cannot be used ({type(exc).__name__}: {first}); torch "
                          f"{torch.__version__} is built for CUDA {torch.version.cuda}: use an image whose torch "
                          "matches the driver, or --engine cpu to train on the CPU on purpose") from exc


def launched() -> dict[str, int] | None:
    """The launcher's ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` when a launcher (torchrun) started this process."""
    if not all(key in os.environ for key in LAUNCHER_ENV):
        return None
    try:
        return {key.lower(): int(os.environ[key]) for key in LAUNCHER_ENV}
    except ValueError as exc:
        raise ConfigError(f"the launcher's environment is not numeric ({exc}): "
                          + ", ".join(f"{k}={os.environ[k]!r}" for k in LAUNCHER_ENV)) from None


def check_launch(cfg: Config) -> None:
    """Under a launcher with more than one process, the config must ask for DDP (else every process would train
    the whole model alone, into the same run folder)."""
    env = launched()
    if env is not None and env["world_size"] > 1 and cfg.train.engine != "ddp":
        raise ConfigError(f"launched by torchrun with WORLD_SIZE={env['world_size']} but train.engine="
                          f"{cfg.train.engine}: pass --engine ddp (train.engine=ddp) to train data-parallel")


class LaunchedDDPEngine(dl.DistributedDataParallelEngine):
    """DDP under an external launcher: join the process group of ``WORLD_SIZE`` processes as ``RANK``."""

    def __init__(self, env: dict[str, int], **kwargs: Any) -> None:
        super().__init__(world_size=env["world_size"], workers_dist_rank=env["rank"] - env["local_rank"],
                         num_node_workers=int(os.environ.get("LOCAL_WORLD_SIZE", 1)), **kwargs)
        self._local_rank = env["local_rank"]

    def spawn(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return fn(self._local_rank, self._world_size)  # this process is one of the launcher's: run here


class SpawningDDPEngine(dl.DistributedDataParallelEngine):
    """Catalyst's DDP engine (it spawns the processes), with a queue that brings rank 0's summary back."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.outbox = mp.get_context("spawn").SimpleQueue()  # pickled into the workers when they are spawned
        self.handed_back: list[Any] = []

    def hand_back(self, value: Any) -> None:
        """From a worker: give ``value`` to the process that spawned it."""
        self.outbox.put(value)

    def _collect(self) -> None:
        while not self.outbox.empty():
            self.handed_back.append(self.outbox.get())

    def spawn(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        # Catalyst joins the workers at once; read the queue while waiting instead, so a worker never blocks on a
        # full pipe (a summary larger than the pipe's buffer) while this process waits for it to exit
        context = mp.spawn(fn, args=(self._world_size,), nprocs=self._num_local_workers, join=False)
        while not context.join(timeout=0.2):
            self._collect()
        self._collect()


def _ddp(cfg: Config, cuda: bool) -> dl.Engine:
    t = cfg.train
    common: dict[str, Any] = {"process_group_kwargs": {"backend": t.ddp_backend if cuda else "gloo"},
                              "cpu": not cuda, "mixed_precision": mixed_precision(t.amp, cuda)}
    env = launched()
    if env is not None:
        return LaunchedDDPEngine(env, **common)
    return SpawningDDPEngine(num_node_workers=t.ddp_workers, port=int(os.environ.get("MASTER_PORT", 29517)),
                             **common)


def _gpu(cfg: Config, cuda: bool) -> dl.Engine:
    require_usable_gpu(cuda)
    return dl.GPUEngine(mixed_precision=mixed_precision(cfg.train.amp, cuda))


ENGINES: dict[EngineName, Callable[[Config, bool], dl.Engine]] = {
    "auto": lambda cfg, cuda: dl.GPUEngine(mixed_precision=mixed_precision(cfg.train.amp, cuda)) if cuda
    else dl.CPUEngine(),
    "cpu": lambda cfg, cuda: dl.CPUEngine(),
    "gpu": _gpu,
    "ddp": _ddp,
}


def build_engine(cfg: Config) -> dl.Engine:
    """The Catalyst engine for ``train.engine`` (``auto``: GPU if available, else CPU)."""
    check_launch(cfg)
    return ENGINES[cfg.train.engine](cfg, torch.cuda.is_available())
