"""EMA of the weights: the update rule, its warm-up, buffers, and the callback on a fake runner."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from boneage.training.ema import EmaCallback, ModelEma
from boneage.training.record import RunRecord
from boneage.training.runner import param_groups


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))


def test_update_follows_the_warmed_up_rule() -> None:
    model = _net()
    ema = ModelEma(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = min(0.9, 2 / 11)  # warm-up: (1 + t) / (10 + t) at t = 1
    for key, value in ema.module.state_dict().items():
        if value.dtype.is_floating_point:
            expected = d * start[key] + (1 - d) * model.state_dict()[key]
            torch.testing.assert_close(value, expected)
    for _ in range(200):
        ema.update(model)
    assert ema.updates == 201
    # long after warm-up the average has converged on the (fixed) weights
    torch.testing.assert_close(ema.module[0].weight, model[0].weight, rtol=1e-5, atol=1e-5)


def test_buffers_are_averaged_and_counters_copied() -> None:
    model = _net().train()
    ema = ModelEma(model, decay=0.5)
    model(torch.randn(16, 3) * 5 + 3)  # moves the BN running statistics
    ema.update(model)
    bn_ema, bn = ema.module[1], model[1]
    assert not torch.equal(bn_ema.running_mean, torch.zeros(4))
    assert not torch.equal(bn_ema.running_mean, bn.running_mean)  # averaged, not copied
    assert int(bn_ema.num_batches_tracked) == int(bn.num_batches_tracked) == 1


def test_the_copy_is_frozen_and_in_eval_mode() -> None:
    ema = ModelEma(_net().train(), decay=0.99)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_decay_must_be_in_the_open_unit_interval(decay: float) -> None:
    with pytest.raises(ValueError, match="decay"):
        ModelEma(_net(), decay)


def test_state_round_trip() -> None:
    ema = ModelEma(_net(), 0.99)
    other = ModelEma(_net(), 0.99)
    with torch.no_grad():
        other.module[0].weight.fill_(3.0)
    ema.load_state_dict(other.state_dict(), updates=7)
    assert ema.updates == 7 and torch.equal(ema.module[0].weight, torch.full((4, 3), 3.0))


def test_callback_on_a_fake_runner_updates_only_in_training() -> None:
    model = _net()
    engine = types.SimpleNamespace(unwrap_model=lambda m: m)
    runner = types.SimpleNamespace(model=model, engine=engine, is_train_loader=True)
    record = RunRecord()
    callback = EmaCallback(record, 0.9)
    callback.on_experiment_start(runner)
    assert isinstance(record.ema, ModelEma) and record.ema.updates == 0  # on the run record, not the runner
    assert not hasattr(runner, "ema")
    callback.on_batch_end(runner)
    runner.is_train_loader = False
    callback.on_batch_end(runner)  # a validation batch: no update
    assert record.ema.updates == 1


def test_param_groups_give_the_encoder_its_own_lr() -> None:
    model = nn.Module()
    model.encoder, model.head = nn.Linear(2, 2), nn.Linear(2, 1)
    groups = param_groups(model, 1e-3, 0.5)
    assert [g["lr"] for g in groups] == [5e-4, 1e-3]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.encoder.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.head.parameters()}
    single = param_groups(model, 1e-3, 1.0)
    assert len(single) == 1 and len(single[0]["params"]) == 4


def test_cpu_small_recipe_trains_saves_ema_and_resumes_exactly(tmp_path, monkeypatch) -> None:
    """The shipped recipe end to end on phantoms: EMA weights in best.pt, both sets in last.pt, exact resume."""
    from boneage.checkpoint import load_checkpoint
    from boneage.config import load_config
    from boneage.data.synth import make_synth_dataset
    from boneage.training.epoch_end import EpochEndCallback
    from boneage.training.runner import train

    data = make_synth_dataset(tmp_path / "phantoms", 40, seed=2)

    def cfg():
        return load_config("cpu-small", [
            f"data.images={data / 'images'}", f"data.labels={data / 'labels.csv'}",
            f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.25", "preprocess.size=64",
            "train.batch_size=8", "train.epochs=2", "train.max_minutes=null"])

    assert cfg().train.ema_decay > 0 and cfg().model.pretrained is True
    full = tmp_path / "full"
    train(cfg(), full, workers=1)
    last, best = load_checkpoint(full / "last.pt"), load_checkpoint(full / "best.pt")
    assert set(last) >= {"train_model", "ema_updates"} and last["ema_updates"] == 2 * 3  # 30 images / 8, 2 epochs
    assert "train_model" not in best  # inference gets one set of weights: the validated EMA
    key = "encoder.blocks.3.0.conv_pw.weight"  # a trained tensor (cpu-small freezes the stem and stages 0-1)
    assert not torch.equal(last["model"][key], last["train_model"][key])

    save = EpochEndCallback.on_epoch_end  # everything an epoch writes: best.pt, last.pt, metrics.json

    def save_then_die(self, runner):
        save(self, runner)
        raise KeyboardInterrupt("killed")

    cut = tmp_path / "cut"
    monkeypatch.setattr(EpochEndCallback, "on_epoch_end", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(), cut, workers=1)
    monkeypatch.undo()
    train(cfg(), cut, resume=True, workers=1)
    resumed = load_checkpoint(cut / "last.pt")
    assert resumed["ema_updates"] == last["ema_updates"]
    for name in ("model", "train_model"):
        for k in last[name]:
            torch.testing.assert_close(resumed[name][k], last[name][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override", ["train.ema_decay=1.0", "train.ema_decay=-0.1", "train.backbone_lr_mult=0",
                                      "train.warmup_pct=0", "train.warmup_pct=1.5"])
def test_out_of_range_recipe_settings_fail_before_any_work(override: str, tmp_path) -> None:
    from boneage.config import load_config
    from boneage.errors import ConfigError
    from boneage.training.runner import train

    with pytest.raises(ConfigError, match=override.split("=")[0]):  # refused when the config is built
        train(load_config("cpu-small", [f"data.images={tmp_path}", f"data.labels={tmp_path / 'none.csv'}", override]),
              tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()
