"""Device selection in one function (``boneage.device``): every case without a GPU, and the flags that use it."""

from __future__ import annotations

import pytest

from boneage.cli import main
from boneage.device import check_device_name, onnx_providers, resolve_device
from boneage.errors import BoneAgeError


@pytest.mark.parametrize("name, gpus, expected", [
    ("auto", 0, "cpu"), ("auto", 2, "cuda:0"), ("cpu", 4, "cpu"), ("CPU", 0, "cpu"),
    ("cuda", 1, "cuda:0"), ("cuda:1", 2, "cuda:1"), (" cuda:0 ", 1, "cuda:0"),
])
def test_resolve_device(name, gpus, expected):
    assert resolve_device(name, cuda_count=gpus) == expected


@pytest.mark.parametrize("name, gpus, message", [
    ("cuda", 0, "sees no CUDA GPU"), ("cuda:2", 2, "only 2 CUDA GPU"), ("gpu", 1, "unknown device 'gpu'"),
    ("cuda:x", 1, "unknown device"), ("", 0, "unknown device"),
])
def test_impossible_devices_are_clear_errors(name, gpus, message):
    with pytest.raises(BoneAgeError, match=message):
        resolve_device(name, cuda_count=gpus)


def test_this_machine_resolves_auto_to_what_torch_sees():
    import torch

    expected = "cuda:0" if torch.cuda.is_available() and torch.cuda.device_count() else "cpu"
    assert resolve_device("auto") == expected


@pytest.mark.parametrize("name, available, expected", [
    ("auto", ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"],
     [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]),
    ("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"],
     [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]),
    ("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
])
def test_onnx_providers(name, available, expected):
    assert onnx_providers(name, available) == expected


def test_onnx_cuda_without_the_gpu_package_is_a_clear_error():
    with pytest.raises(BoneAgeError, match="install onnxruntime-gpu"):
        onnx_providers("cuda", ["CPUExecutionProvider"])
    assert check_device_name("Cuda:3") == "cuda:3"


@pytest.mark.parametrize("command", [["predict", "a.png", "--checkpoint", "x.pt"],
                                     ["evaluate", "--checkpoint", "x.pt", "--images", "i", "--labels", "l",
                                      "--out", "o"],
                                     ["serve", "--checkpoint", "x.pt"]])
def test_the_device_flag_is_checked_by_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--device", "tpu"])
    assert exit_info.value.code == 2
    assert "argument --device: 'tpu' is not a device; use auto, cpu, cuda or cuda:N" in capsys.readouterr().err
