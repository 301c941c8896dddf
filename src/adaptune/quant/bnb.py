"""bitsandbytes for adaptune: whether it runs here, the ``BitsAndBytesConfig`` for a choice, quantizing
a model already in memory, and what quantized weights weigh."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence

import torch
from torch import nn

from ..device import default_compute_dtype, parse_dtype, pick_device
from ..errors import ConfigError, EnvironmentProblem
from .kinds import QUANTIZE_CHOICES

__all__ = ["bnb_config", "quantize_linears", "quantized_linear_from", "require_bitsandbytes", "weight_bytes"]


def require_bitsandbytes(device: str | torch.device | None = None):
    """The ``bitsandbytes`` module, or an ``EnvironmentProblem`` saying why it cannot be used."""
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        raise EnvironmentProblem(
            "4-bit/8-bit base models (QLoRA) need the bitsandbytes package, which is not installed: "
            "pip install 'bitsandbytes>=0.45' (or train without --quantize)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a broken native library raises all sorts
        raise EnvironmentProblem(
            f"bitsandbytes is installed but cannot be loaded on this platform ({type(exc).__name__}: {exc}); "
            f"train without --quantize"
        ) from None
    dev = torch.device(device) if device is not None else pick_device()
    problem = _probe(dev.type)
    if problem:
        version = getattr(bnb, "__version__", "?")
        raise EnvironmentProblem(
            f"bitsandbytes {version} cannot run quantized layers on {dev.type} here ({problem}); "
            f"train without --quantize or install a bitsandbytes build for this platform"
        )
    return bnb


@functools.cache
def _probe(device_type: str) -> str | None:
    """Quantize and dequantize a small block on ``device_type``; the error text, or None if it works."""
    try:
        import bitsandbytes.functional as bf

        x = torch.linspace(-1, 1, 64 * 64, device=device_type).reshape(64, 64)
        q, state = bf.quantize_4bit(x, blocksize=64, quant_type="nf4")
        back = bf.dequantize_4bit(q, state)
        if back.shape != x.shape or not torch.isfinite(back).all() or (back - x).abs().max() > 0.2:
            return "4-bit round trip gave wrong values"
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot run"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return None


def bnb_config(quantize: str, compute_dtype: torch.dtype | str | None = None, double_quant: bool = True):
    """A ``transformers.BitsAndBytesConfig`` for ``quantize`` = "nf4" | "fp4" | "int8".

    ``compute_dtype`` (4-bit only) is the dtype each base matmul runs in; by default
    ``default_compute_dtype()``. ``double_quant`` also quantizes the per-block scales (4-bit only;
    about 0.37 bits per weight saved). Raises ``EnvironmentProblem`` when bitsandbytes is missing
    or cannot run here, before any model is loaded.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    dtype = parse_dtype(compute_dtype) if compute_dtype is not None else default_compute_dtype()
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=bool(double_quant))


def quantized_linear_from(linear: nn.Linear, quantize: str, weight: torch.Tensor | None = None,
                          compute_dtype: torch.dtype | str | None = None, double_quant: bool = True) -> nn.Module:
    """A frozen bitsandbytes layer holding ``weight`` (default: ``linear``'s own) and ``linear``'s bias.

    The layer is what ``from_pretrained(..., quantization_config=bnb_config(quantize))`` would load:
    ``Linear4bit`` (blocks of 64, ``double_quant`` scales) for nf4/fp4, ``Linear8bitLt`` (int8 rows,
    outlier threshold 6.0, transformers' default) for int8. The weight keeps ``linear``'s dtype
    and device. Used to quantize a model in memory (``quantize_linears``) and by LoftQ.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    source = (weight if weight is not None else linear.weight).detach()
    device, dtype = linear.weight.device, linear.weight.dtype
    if device.type == "meta":
        raise ConfigError("cannot quantize a layer whose weights are not loaded (meta device)")
    bnb = require_bitsandbytes(device)
    has_bias = linear.bias is not None
    if quantize == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        param = bnb.nn.Int8Params(source.to("cpu", dtype), requires_grad=False, has_fp16_weights=False)
    else:
        cdtype = parse_dtype(compute_dtype) if compute_dtype is not None else default_compute_dtype(device)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=cdtype,
                                  compress_statistics=double_quant, quant_type=quantize, device="meta")
        param = bnb.nn.Params4bit(source.to("cpu", dtype), requires_grad=False, blocksize=64,
                                  compress_statistics=double_quant, quant_type=quantize, module=layer)
    layer.weight = param.to(device)  # quantizes
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def quantize_linears(model: nn.Module, quantize: str = "nf4", int8_modules: Sequence[str] = (),
                     compute_dtype: torch.dtype | str | None = None, double_quant: bool = True) -> int:
    """Quantize ``model``'s float ``nn.Linear`` layers in memory; returns how many were replaced.

    The alternative to loading with ``quantization_config`` for a model already in memory, and the
    only way to mix precisions: layers whose name ends with one of ``int8_modules`` (as
    ``down_proj``, ``v_proj``) become int8, the others ``quantize``, as llama.cpp's "_M" mixes keep
    attention values and MLP down-projections at higher precision. The output head stays as it is
    (transformers leaves it unquantized too), and so do LoRA's own layers and the float copies
    ``modules_to_save`` trains. ``int8_modules`` match as ``rank_pattern`` keys do (a name or
    regex that the end of the module path matches).
    """
    from ..tuners.targets import pattern_key

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    count = 0

    def visit(module: nn.Module, prefix: str) -> None:
        nonlocal count
        for child_name, child in list(module.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if type(child).__name__ in ("LoraLayer", "ModulesToSaveWrapper"):
                continue
            if type(child) is nn.Linear and child is not head:
                kind = "int8" if pattern_key(int8_modules, name) else quantize
                setattr(module, child_name, quantized_linear_from(child, kind, compute_dtype=compute_dtype,
                                                                  double_quant=double_quant))
                count += 1
            else:
                visit(child, name)

    visit(model, "")
    return count


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's weights: parameters, buffers and bitsandbytes' quantization state.

    Tied tensors count once. A 4-bit weight counts its packed bytes plus its block scales (and
    their own scales under double quantization); an 8-bit weight its int8 bytes plus row scales.
    """
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = (t.data_ptr(), t.numel()) if t.numel() else (id(t), 0)
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p.data)
        state = getattr(p, "quant_state", None)
        while state is not None:
            add(getattr(state, "absmax", None))
            add(getattr(state, "code", None))
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
        add(getattr(p, "SCB", None))
    for b in model.buffers():
        add(b)
    return total
