"""adaptune.device: the one place that picks device, dtype and precision."""

from __future__ import annotations

import pytest
import torch

from adaptune import device
from adaptune.errors import ConfigError


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.pick_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert device.pick_device() == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device.pick_device() == torch.device("cpu")


def test_pick_dtype(monkeypatch):
    assert device.pick_dtype("cpu") == torch.float32
    assert device.pick_dtype("cpu", "float16") == torch.float16  # asked for: honoured
    assert device.pick_dtype("mps") == torch.float32
    monkeypatch.setattr(device, "cuda_bf16_native", lambda: True)
    assert device.pick_dtype("cuda") == torch.bfloat16
    assert device.pick_dtype(torch.device("cuda", 0), "auto") == torch.bfloat16
    monkeypatch.setattr(device, "cuda_bf16_native", lambda: False)
    assert device.pick_dtype("cuda") == torch.float16
    assert device.pick_dtype("cuda", "float32") == torch.float32


def test_parse_dtype_spellings_and_errors():
    assert device.parse_dtype("bf16") is device.parse_dtype("torch.bfloat16") is torch.bfloat16
    assert device.parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="unknown dtype"):
        device.parse_dtype("int3")
    with pytest.raises(ConfigError, match="floating-point"):
        device.parse_dtype(torch.int8)


def test_4bit_compute_dtype_follows_native_bf16_like_the_weights(monkeypatch):
    """Loading weights and 4-bit products agree: emulated bf16 (pre-Ampere GPUs) means fp16."""
    assert device.default_compute_dtype("cpu") == torch.float32
    for native, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(device, "cuda_bf16_native", lambda native=native: native)
        assert device.default_compute_dtype("cuda") == expected == device.pick_dtype("cuda")


def test_cpu_bf16_is_native_only_with_avx512_bf16_or_amx(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not device.bf16_native("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert device.bf16_native("cpu")


def test_best_precision(monkeypatch):
    monkeypatch.setattr(device, "accelerator_type", lambda: None)
    assert device.best_precision() == ("fp32", "CPU")
    monkeypatch.setattr(device, "accelerator_type", lambda: "cuda")
    monkeypatch.setattr(device, "cuda_bf16_native", lambda: False)
    assert device.best_precision() == ("fp16", "cuda")
    assert device.best_precision(use_cpu=True) == ("fp32", "CPU")
    monkeypatch.setattr(device, "cuda_bf16_native", lambda: True)
    assert device.best_precision() == ("bf16", "cuda")


@pytest.mark.parametrize("accelerator, native, expect", [
    (None, True, "bf16"),     # a CPU with AVX512-BF16 or AMX
    (None, False, "fp32"),    # a CPU without: bf16 would run in a slow fallback
    ("cuda", True, "bf16"),
    ("cuda", False, "fp16"),  # a pre-Ampere GPU
])
def test_auto_precision_is_16_bit_where_the_hardware_computes_it(monkeypatch, accelerator, native, expect):
    monkeypatch.setattr(device, "accelerator_type", lambda: accelerator)
    monkeypatch.setattr(device, "bf16_native", lambda where: native)
    chosen = device.training_precision("auto")
    assert chosen.name == expect and chosen.reason.startswith("auto: ")
    assert ("AVX512-BF16 or AMX" in chosen.reason) == (accelerator is None)
    kept = device.training_precision("fp32")
    assert kept.name == "fp32" and kept.reason == "asked for"
    assert ("slowly" in device.training_precision("bf16").reason) == (not native)
    with pytest.raises(ConfigError, match="precision must be one of"):
        device.training_precision("int8")
