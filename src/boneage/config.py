"""One typed config, from YAML + command-line overrides to the runner, saved in every checkpoint.

A config is a tree of dataclasses. ``load_config("cpu-small", ["train.epochs=3"])`` reads a
shipped config (``src/boneage/configs/<name>.yaml``) or a YAML path, applies dotted overrides
and validates every key, type, range (``Annotated[..., Range(...)]``) and closed set of names
(``Literal[...]``) when the config is built, so a typo or an impossible value fails before any
work starts, with the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from boneage.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """A numeric field's valid interval; ``None`` leaves that side open-ended."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # True: lo itself is not allowed
    hi_open: bool = False

    def text(self) -> str:
        lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
        hi = "" if self.hi is None else f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return " and ".join(t for t in (lo, hi) if t)

    def holds(self, value: float) -> bool:
        if value != value:  # NaN
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return self.hi is None or not (value > self.hi or (self.hi_open and value == self.hi))


Positive = Annotated[int, Range(1)]
NonNegative = Annotated[int, Range(0)]
Fraction = Annotated[float, Range(0.0, 1.0, hi_open=True)]  # [0, 1)

# The closed sets of names the training runner builds from tables keyed by these very Literals
# (``boneage.training.components``; tests/test_training.py checks every value has an entry).
OptimizerName = Literal["adam", "adamw", "sgd"]
SchedulerName = Literal["onecycle", "cosine", "plateau", "none"]
LossName = Literal["l1", "smooth_l1", "mse"]
EngineName = Literal["auto", "cpu", "gpu", "ddp"]


@dataclass
class DataConfig:
    """Where the radiographs are and how they are split."""

    images: str | None = None
    labels: str | None = None
    cache_dir: str | None = None  # default: $BONEAGE_CACHE_DIR or ~/.cache/boneage
    val_fraction: Fraction = 0.15
    n_folds: Annotated[int, Range(0, 100)] = 0  # > 0: k-fold split, ``fold`` picks the validation fold
    fold: NonNegative = 0  # < n_folds
    split_seed: Annotated[int, Range(0, 2**32 - 1)] = 2017
    skip_bad: bool = False
    limit: Positive | None = None  # use only the first N rows (after a seeded shuffle): quick runs
    num_workers: Annotated[int, Range(0, 256)] = 0
    # workers: DataLoader + albumentations per image on the CPU; device: the split's cached images copied to the
    # training device once, batches sampled and augmented there (``boneage.data.device_batches``)
    loader: Literal["workers", "device"] = "workers"


@dataclass
class PreprocessConfig:
    """The single preprocessing path (``boneage.preprocess``): crop, contrast, resize."""

    size: Annotated[int, Range(32, 4096)] = 256
    crop_hand: bool = False
    clahe: bool = False
    clahe_clip_limit: Annotated[float, Range(0.0, 1000.0, lo_open=True)] = 2.0
    clahe_tile: Annotated[int, Range(1, 64)] = 8  # tiles per side


@dataclass
class AugmentConfig:
    """Albumentations pipelines applied after the cached preprocessing (``boneage.transforms``)."""

    level: Literal["none", "paper", "light", "strong"] = "light"
    hflip: bool = False  # left hands only: a flip makes a right hand, off by default
    # data.loader=device only: the first epoch's training size in px, growing to preprocess.size by half the epochs
    # (progressive resizing, ``boneage.augment_batch.progressive_size``); None: preprocess.size throughout
    progressive_start: Annotated[int, Range(16, 4096)] | None = None


@dataclass
class ModelConfig:
    """Arguments of ``boneage.models.create_model``."""

    name: str = "m46"
    task: Literal["age", "sex"] = "age"
    sex_input: bool = True
    pretrained: bool | str = False  # True: ImageNet weights (network); str: a local weights file
    dropout: Fraction = 0.2
    width: Annotated[float, Range(0.0, 8.0, lo_open=True)] = 1.0  # channel multiplier for models that support it


@dataclass
class TrainConfig:
    """Optimisation and the Catalyst engine."""

    epochs: Annotated[int, Range(1, 100_000)] = 10
    batch_size: Annotated[int, Range(1, 65_536)] = 32
    lr: Annotated[float, Range(0.0, 10.0, lo_open=True)] = 1e-3
    # the encoder's LR = lr * this (< 1: fine-tune pretrained weights gently)
    backbone_lr_mult: Annotated[float, Range(0.0, 100.0, lo_open=True)] = 1.0
    # > 0: the encoder's stem and first N stages keep their pretrained weights (``boneage.models.freeze``)
    freeze_stages: Annotated[int, Range(0, 64)] = 0
    # the fraction of train.epochs after which the frozen stages train too (1.0: frozen for the whole run)
    unfreeze_at: Annotated[float, Range(0.0, 1.0)] = 1.0
    # one-cycle: fraction of the steps spent warming the LR up
    warmup_pct: Annotated[float, Range(0.0, 1.0, lo_open=True, hi_open=True)] = 0.2
    ema_decay: Fraction = 0.0  # > 0: validate and save an exponential moving average of the weights
    weight_decay: Annotated[float, Range(0.0, 10.0)] = 1e-4
    optimizer: OptimizerName = "adamw"
    scheduler: SchedulerName = "onecycle"
    loss: LossName = "l1"
    early_stopping_patience: NonNegative = 0  # 0: off
    # wall-clock budget: stop after the epoch that crosses it
    max_minutes: Annotated[float, Range(0.0, lo_open=True)] | None = None
    # one-cycle only. steps: anneal at the end of train.epochs; time: at the end of train.epochs or of
    # train.max_minutes (if set), whichever comes first (``boneage.training.schedule``): a slow machine still anneals
    anneal_by: Literal["steps", "time"] = "steps"
    engine: EngineName = "auto"
    ddp_workers: Annotated[int, Range(1, 1024)] = 2  # processes for engine=ddp
    ddp_backend: Literal["nccl", "gloo"] = "nccl"  # nccl on GPU, gloo on CPU
    # batch_size is per process, so DDP's effective batch is batch_size x processes; the LR for it:
    # none = lr as given, linear = lr x processes (Goyal et al. 2017), sqrt = lr x sqrt(processes)
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    amp: bool = True  # used on GPU only
    channels_last: bool = False
    seed: Annotated[int, Range(0, 2**32 - 1)] = 42
    num_threads: Annotated[int, Range(1, 1024)] | None = None
    wandb: bool = False
    log_every: Positive = 20


@dataclass
class Config:
    """Everything a run needs; ``asdict(config)`` is what checkpoints store."""

    name: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> "Config":
        built = _build(cls, raw, source, "")
        check_config(built, source)
        return built

    def validate(self, source: str = "config") -> "Config":
        """Check a config built in code (``Config(...)``) as strictly as one read from YAML."""
        return Config.from_dict(self.to_dict(), source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check_value(tp: Any, value: Any, where: str) -> Any:
    """Coerce/validate ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        value = _check_value(base, value, where)
        for rule in extras:
            if isinstance(rule, Range) and not rule.holds(value):
                raise ConfigError(f"{where}: {value!r} is out of range; it must be {rule.text()}")
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, allowed))}")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: Any, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{prefix or 'top level'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys here: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name], source, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_value(tp, raw[f.name], f"{source}: {prefix}{f.name}")
    return cls(**kwargs)


def check_config(cfg: Config, source: str = "config") -> None:
    """Every rule that involves more than one field, in one place; ``Config.from_dict`` runs it on every config
    (YAML, overrides, CLI flags, a checkpoint's, one built in code through ``Config.validate``)."""
    d, t = cfg.data, cfg.train
    if d.n_folds > 1 and not d.fold < d.n_folds:
        raise ConfigError(f"{source}: data.fold={d.fold} must be below data.n_folds={d.n_folds} "
                          f"(folds are numbered 0..{d.n_folds - 1})")
    if d.n_folds == 1:
        raise ConfigError(f"{source}: data.n_folds=1 makes no split; use 0 (a val_fraction split) or >= 2")
    if t.anneal_by == "time" and t.scheduler != "onecycle":
        raise ConfigError(f"{source}: train.anneal_by=time is for train.scheduler=onecycle (got {t.scheduler}): "
                          "set train.anneal_by=steps with this scheduler")
    if t.anneal_by == "time" and t.engine == "ddp":
        raise ConfigError(f"{source}: train.anneal_by=time with train.engine=ddp: each process would read its own "
                          "clock and the LRs of the replicas would drift apart; use train.anneal_by=steps under DDP")
    if t.engine == "ddp" and t.freeze_stages and t.unfreeze_at < 1.0:
        raise ConfigError(f"{source}: train.unfreeze_at < 1 with train.engine=ddp: DistributedDataParallel fixes the "
                          "trained parameters when it starts, so stages unfrozen later would not be synchronised; use "
                          "train.unfreeze_at=1.0 (frozen throughout) or train.freeze_stages=0 under DDP")
    start, size = cfg.augment.progressive_start, cfg.preprocess.size
    if start is not None and (d.loader != "device" or start >= size):
        raise ConfigError(f"{source}: augment.progressive_start={start} needs data.loader=device (got {d.loader}) and "
                          f"a size below preprocess.size={size}; unset it to train at preprocess.size throughout")


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package."""
    folder = resources.files("boneage") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text, source = path.read_text(), str(path)
    else:
        resource = resources.files("boneage") / "configs" / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ConfigError(
                f"unknown config '{name_or_path}': give a YAML path or one of {', '.join(shipped_configs())}"
            )
        text, source = resource.read_text(), f"config '{name_or_path}'"
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    raw.setdefault("name", path.stem if source == str(path) else name_or_path)
    return raw, source


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.epochs=5")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
    return raw


def with_values(cfg: Config, values: dict[str, Any], source: str = "command line") -> Config:
    """``cfg`` with typed ``{"section.key": value}`` set (the CLI's flags), checked as strictly as YAML: the
    values are never written out and re-parsed as text (a path with ``: `` or ``#`` in it stays a path)."""
    raw = cfg.to_dict()
    for key, value in values.items():
        section, name = key.split(".")
        if section not in raw or not isinstance(raw[section], dict) or name not in raw[section]:
            raise ConfigError(f"{source}: unknown config field {key!r}")
        raw[section][name] = value
    return Config.from_dict(raw, source)


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """Read a shipped config by name or a YAML file, apply overrides, validate."""
    raw, source = _read_yaml(name_or_path)
    raw = apply_overrides(raw, list(overrides or []))
    return Config.from_dict(raw, source)
