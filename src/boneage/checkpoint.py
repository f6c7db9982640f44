"""Checkpoints: written atomically (temp file + rename), read with ``weights_only=True``.

Shared by training (save, resume) and inference (load). A checkpoint is a plain dict:

- ``model``: the model's state_dict
- ``config``: ``Config.to_dict()`` (preprocessing, model arguments...), so it alone rebuilds the model
- ``target``: ``{"mean": float, "std": float}``; model output * std + mean = months
- ``metrics``: best validation metrics so far (``mae_months``, ...), quoted in reports
- ``epoch``: epochs finished; ``optimizer``/``scheduler``: states for ``--resume`` (``last.pt``)
- ``version``: package version that wrote it
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from boneage import __version__
from boneage.atomic import atomic_write
from boneage.config import Config
from boneage.errors import BoneAgeError, CheckpointError

REQUIRED_KEYS = ("model", "config", "target")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a killed process never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**state, "version": __version__}
    with atomic_write(path, "wb", fsync=True) as fh:
        torch.save(state, fh)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``) and check it has what inference needs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; train one with 'boneage train' first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "pickle" in text.lower():
            reason = "it holds Python objects besides tensors and plain data, which are refused for safety"
        else:
            reason = text.splitlines()[0] if text else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason}); is it a boneage .pt file? "
                              "Checkpoints are only ever loaded with weights_only=True") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it was not written by boneage")
    bad = [k for k, v in (state["model"].items() if isinstance(state["model"], dict) else ())
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} has NaN or infinite weights ({len(bad)} tensor(s), e.g. {bad[0]}); "
                              "the training run that wrote it diverged: use an earlier checkpoint or retrain")
    return state


def config_from_checkpoint(state: dict[str, Any]) -> Config:
    """The run's config, as saved in the checkpoint."""
    return Config.from_dict(state["config"], source="checkpoint config")


def model_from_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """Rebuild the model of a checkpoint in eval mode; returns (model, config, checkpoint dict)."""
    from boneage.models import create_model

    state = load_checkpoint(path, map_location)
    cfg = config_from_checkpoint(state)
    m = cfg.model
    model = create_model(**{**asdict(m), "pretrained": False})
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, BoneAgeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not match model '{m.name}' ({exc})") from exc
    model.eval()
    return model, cfg, state
