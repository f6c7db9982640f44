"""Config: shipped configs load, overrides apply and typos fail before any work."""

import pytest
import yaml

from boneage.config import Config, load_config, shipped_configs
from boneage.errors import ConfigError

SHIPPED = ["cpu-small", "bonenet-s", "lite0-gpu", "lite2-gpu", "lite0-gpu-299", "lite2-gpu-299", "paper-m46",
           "resnet50", "inceptionv3"]


def test_every_issue_config_is_shipped():
    assert set(SHIPPED) <= set(shipped_configs())


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_and_builds_its_model(name):
    from boneage.models import list_models

    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.model.name in list_models()
    assert Config.from_dict(cfg.to_dict()) == cfg  # what checkpoints store round-trips


def test_cpu_small_fine_tunes_the_packaged_imagenet_weights():
    cfg = load_config("cpu-small")
    assert (cfg.model.name, cfg.model.pretrained, cfg.model.sex_input) == ("efficientnet_lite0", True, True)
    assert cfg.train.backbone_lr_mult < 1 and cfg.train.ema_decay > 0 and cfg.train.max_minutes <= 30
    scratch = load_config("bonenet-s")
    assert (scratch.model.name, scratch.model.pretrained) == ("bonenet_s", False)
    gpu = load_config("lite0-gpu")
    assert gpu.model.name == "efficientnet_lite0" and 384 <= gpu.preprocess.size <= 512
    assert gpu.augment.level == "strong" and gpu.model.pretrained is True


def test_overrides_are_typed():
    assert load_config("cpu-small", ["train.lr=3e-3"]).train.lr == 0.003  # YAML 1.1 reads 3e-3 as a string
    cfg = load_config("cpu-small", ["train.epochs=3", "train.lr=0.01", "model.sex_input=false",
                                    "data.limit=100", "model.pretrained=/tmp/w.pth"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.sex_input, cfg.data.limit) == (3, 0.01, False, 100)
    assert cfg.model.pretrained == "/tmp/w.pth"


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown key(s) train.epoch"),
    ("train.epochs=three", "train.epochs: expected an integer"),
    ("model.sex_input=maybe", "model.sex_input: expected true/false"),
    ("epochs", "must look like section.key=value"),
    ("preprocess.size=1.5", "preprocess.size: expected an integer"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("cpu-small", [override])


def test_unknown_name_lists_shipped_configs():
    with pytest.raises(ConfigError, match="unknown config 'nope'.*cpu-small"):
        load_config("nope")


def test_yaml_file_and_save_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "m46"}, "train": {"epochs": 2}}))
    cfg = load_config(str(path))
    assert (cfg.name, cfg.model.name, cfg.train.epochs) == ("mine", "m46", 2)
    cfg.save(tmp_path / "saved.yaml")
    assert load_config(str(tmp_path / "saved.yaml")) == cfg


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(str(path))


def test_cli_flags_set_typed_values_without_a_yaml_round_trip(tmp_path):
    """--images with YAML-special characters stays the path it is (a `: ` or `#` would break a YAML override)."""
    from boneage.cli import _config, build_parser

    odd = tmp_path / "scan: 2017 #1"
    args = build_parser().parse_args(["train", "--config", "cpu-small", "--out", str(tmp_path / "run"),
                                      "--images", str(odd), "--labels", str(odd / "l.csv"), "--engine", "cpu",
                                      "--ddp-workers", "3", "--skip-bad", "train.epochs=2"])
    cfg = _config(args)
    assert cfg.data.images == str(odd.resolve()) and cfg.data.labels == str((odd / "l.csv").resolve())
    assert (cfg.train.engine, cfg.train.ddp_workers, cfg.data.skip_bad, cfg.train.epochs) == ("cpu", 3, True, 2)


def test_with_values_checks_like_yaml():
    from boneage.config import with_values
    from boneage.errors import ConfigError

    cfg = load_config("cpu-small")
    assert with_values(cfg, {"train.epochs": 3}).train.epochs == 3 and cfg.train.epochs != 3
    with pytest.raises(ConfigError, match="train.engine"):
        with_values(cfg, {"train.engine": "tpu"})
    with pytest.raises(ConfigError, match="unknown config field 'train.epoch'"):
        with_values(cfg, {"train.epoch": 3})
