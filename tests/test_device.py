"""Device and dtype selection (elmtune.device), with GPUs simulated by patching torch.cuda's queries."""

from __future__ import annotations

import logging

import pytest
import torch

import elmtune.device as device_mod
from elmtune.cli import main
from elmtune.device import DeviceError, best_dtype, pick_device, pick_dtype, resolve_precision


def fake_gpus(monkeypatch, capability=(9, 0), count=1, name="NVIDIA H200"):
    """Make torch.cuda report ``count`` GPUs of ``capability`` (nothing is ever run on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    # emulated bf16 would be "supported" on every GPU: the choice must not ask this
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def no_gpu(monkeypatch, mps=False, cpu_bf16=False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "mps_available", lambda: mps)
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: cpu_bf16)


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                  ((8, 6), torch.bfloat16), ((7, 5), torch.float16),
                                                  ((7, 0), torch.float16), ((6, 1), torch.float16)])
def test_gpu_dtype_follows_native_support_not_emulation(monkeypatch, capability, expected):
    fake_gpus(monkeypatch, capability)
    assert pick_device() == torch.device("cuda", 0)
    assert pick_dtype(pick_device()) == expected
    assert resolve_precision("auto") == {torch.bfloat16: "bf16", torch.float16: "fp16"}[expected]


@pytest.mark.parametrize("cpu_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_dtype_is_bf16_only_with_hardware_bf16(monkeypatch, cpu_bf16, expected):
    no_gpu(monkeypatch, cpu_bf16=cpu_bf16)
    assert pick_device() == torch.device("cpu")
    assert best_dtype("cpu") == expected
    assert resolve_precision("auto") == {torch.bfloat16: "bf16", torch.float32: "fp32"}[expected]


def test_mps_comes_after_cuda_and_before_the_cpu(monkeypatch):
    no_gpu(monkeypatch, mps=True)
    assert pick_device() == torch.device("mps")
    assert pick_dtype("mps") == torch.float16
    assert resolve_precision("auto") == "fp32"  # training on mps stays in fp32 (see elmtune.device)
    fake_gpus(monkeypatch)
    assert pick_device().type == "cuda"


def test_each_torchrun_process_gets_its_own_gpu(monkeypatch):
    fake_gpus(monkeypatch, count=4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device() == torch.device("cuda", 3)


def test_explicit_choices_are_checked(monkeypatch, caplog):
    no_gpu(monkeypatch)
    with pytest.raises(DeviceError, match="no CUDA GPU is available here.*--device cpu"):
        pick_device("cuda")
    with pytest.raises(DeviceError, match="mps is not available"):
        pick_device("mps")
    with pytest.raises(DeviceError, match="not a device"):
        pick_device("gpu0")
    with pytest.raises(DeviceError, match="--dtype 'int8'"):
        pick_dtype("cpu", "int8")
    assert pick_dtype("cpu", "fp32") == torch.float32 and pick_dtype("cpu", "bfloat16") == torch.bfloat16
    fake_gpus(monkeypatch, capability=(7, 5), count=2, name="Tesla T4")
    with pytest.raises(DeviceError, match="has 2 GPU"):
        pick_device("cuda:2")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with caplog.at_level(logging.WARNING, logger="elmtune"):
        assert pick_dtype("cuda", "bf16") == torch.bfloat16  # asked for: given, with a warning
    assert "emulated" in caplog.text and "Tesla T4" in caplog.text


@pytest.mark.parametrize("command", [
    ["generate", "-p", "hi"], ["chat"], ["eval", "--data", "x.json", "--adapter", "a"],
])
def test_inference_commands_hand_device_and_dtype_to_the_loader(monkeypatch, command, tmp_path):
    import elmtune.evaluate
    import elmtune.inference

    seen = {}

    def loader(*args, **kwargs):
        seen.update(kwargs, positional=args)
        raise ValueError("stop here")

    monkeypatch.setattr(elmtune.inference, "load_pipeline", loader)
    monkeypatch.setattr(elmtune.evaluate, "load_pipeline", loader)  # imported by name there
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--model", "m", "--device", "cpu", "--dtype", "fp16"]) == 2
    values = [*seen.pop("positional"), *seen.values()]
    assert "cpu" in values and "fp16" in values


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU that this machine has")
def test_asking_for_a_missing_gpu_is_one_line_before_loading(capsys):
    assert main(["generate", "-p", "hi", "--model", "openelm-3b", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA GPU is available here" in err


def test_serve_hands_device_and_dtype_to_the_server_state(monkeypatch):
    import elmtune.serve

    seen = {}

    def build_state(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(elmtune.serve, "build_state", build_state)
    assert main(["serve", "--model", "m", "--device", "cpu", "--dtype", "bf16"]) == 2
    assert seen["device"] == "cpu" and seen["dtype"] == "bf16"
