"""Where tensors live and in which precision: the one place adaptune decides it.

Loading a model (``hub``), training it (``training.arguments``) and quantizing it (``quant``) all
ask the same questions: which device is there, does it compute bf16 natively, which dtype should
weights and 4-bit products use. The answers live here so that they cannot drift apart.

"Natively" means the hardware has bf16 arithmetic: a CUDA GPU of compute capability 8.0 or later
(older GPUs emulate bf16, slowly), or a CPU with AVX512-BF16 or AMX. A CPU without them runs bf16
products in a slow fallback, far behind fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# Spellings users write for a dtype (CLI, YAML, Python) -> the torch dtype.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def accelerator_type() -> str | None:
    """'cuda', 'xpu', 'mps', ... for the accelerator torch sees, or None on a CPU-only machine."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None:
        return acc.current_accelerator().type if acc.is_available() else None
    return "cuda" if torch.cuda.is_available() else None


def pick_device() -> torch.device:
    """CUDA if available, else Apple MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cuda_bf16_native() -> bool:
    """Whether the CUDA GPU computes bf16 in hardware (emulated bf16 on pre-Ampere GPUs is slow)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the keyword
        return bool(torch.cuda.is_bf16_supported())


def cpu_bf16_native() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX)."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def bf16_native(device_type: str) -> bool:
    """Whether ``device_type`` ('cpu', 'cuda', 'xpu', ...) computes bf16 natively."""
    if device_type == "cuda":
        return cuda_bf16_native()
    if device_type == "cpu":
        return cpu_bf16_native()
    from transformers.utils import is_torch_bf16_gpu_available

    return is_torch_bf16_gpu_available()


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """``"bf16"``, ``"bfloat16"``, ``torch.bfloat16``, ... -> the torch dtype (ConfigError if unknown)."""
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ConfigError(f"dtype must be a floating-point type, not {value}")
        return value
    key = str(value).strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {value!r}: use one of auto, float32, bfloat16, float16")
    return DTYPE_NAMES[key]


def pick_dtype(device: torch.device | str | None = None, requested: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype to load weights in.

    An explicit ``requested`` dtype wins (also float16 on a CPU: the caller asked). Otherwise
    (``None`` or ``"auto"``): bfloat16 on a CUDA GPU that supports it natively, float16 on other
    CUDA GPUs, float32 everywhere else (CPU, MPS): on a CPU, frozen weights stay fp32 and bf16
    training uses autocast instead (:func:`training_precision`).
    """
    if requested is not None and not (isinstance(requested, str) and requested.lower() == "auto"):
        return parse_dtype(requested)
    dev = torch.device(device) if device is not None else pick_device()
    if dev.type == "cuda":
        return torch.bfloat16 if cuda_bf16_native() else torch.float16
    return torch.float32


def default_compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype a 4-bit layer's products run in: bf16 on a GPU with native bf16, fp16 on other
    GPUs, fp32 on a CPU (bitsandbytes' fp16 path is many times slower there, and its bf16 path is
    no faster in a whole training step; docs/benchmarks.md)."""
    dev = torch.device(device) if device is not None else pick_device()
    if dev.type == "cuda":
        return torch.bfloat16 if cuda_bf16_native() else torch.float16
    return torch.float32


def best_precision(use_cpu: bool = False) -> tuple[str, str]:
    """(``'bf16'``, ``'fp16'`` or ``'fp32'``: the best mixed precision training can use, device
    name). ``use_cpu``: the accelerator, if any, is not used. On a CPU, bf16 autocast runs
    wherever transformers allows it; whether it is *fast* is :func:`bf16_native`'s question."""
    device = None if use_cpu else accelerator_type()
    if device is None:
        return "fp32", "CPU"
    if bf16_native(device):
        return "bf16", device
    return "fp16", device


@dataclass(frozen=True)
class Precision:
    """The precision training runs in, and why it was chosen (said in the run's output)."""

    name: str  # "bf16", "fp16" or "fp32": the autocast dtype of the products, or none
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def fp16(self) -> bool:
        return self.name == "fp16"


def training_precision(requested: str = "auto", use_cpu: bool = False) -> Precision:
    """What ``auto`` means: 16-bit products (autocast; weights and adapters keep their dtype)
    wherever the hardware computes them natively, fp32 elsewhere. An explicit choice is kept."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    where = None if use_cpu else accelerator_type()
    label = where or "CPU"
    if requested != "auto":
        slow = requested == "bf16" and not bf16_native(where or "cpu")
        note = f"; {label} has no native bf16, so its products run slowly" if slow else ""
        return Precision(requested, f"asked for{note}")
    if bf16_native(where or "cpu"):
        native = "AVX512-BF16 or AMX" if where is None else "native bf16"
        return Precision("bf16", f"auto: this {label} has {native}; bf16 products, fp32 adapter weights")
    if where == "cuda":
        return Precision("fp16", "auto: this GPU has no native bf16; fp16 products, fp32 adapter weights")
    if where is None:
        return Precision("fp32", "auto: this CPU has no AVX512-BF16 or AMX, so bf16 products would run in a "
                                 "slow fallback")
    return Precision("fp32", f"auto: no 16-bit path chosen for {label}")


def launched_with(flag: str) -> bool:
    """Whether ``accelerate launch`` turned ``flag`` on (it passes its choices as environment variables)."""
    return os.environ.get(flag, "false").lower() in ("1", "true")


def world_size() -> int:
    """Processes in this run (torchrun / accelerate set WORLD_SIZE); 1 when run alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, or a process run alone: the one that prints, samples and writes the final files."""
    return int(os.environ.get("RANK", "0")) == 0

