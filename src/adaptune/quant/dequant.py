"""Quantized weights back to floats: one layer's weight (either layout bitsandbytes keeps on a CPU),
a float ``nn.Linear`` in its place, a whole model, and forgetting that a model was quantized."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, EnvironmentProblem
from .kinds import layer_kind

__all__ = ["dequantize_model", "dequantize_weight", "float_linear_from", "forget_quantization"]


def _unpack_cpu_codes(packed: torch.Tensor, n: int, k: int, block_n: int = 32) -> torch.Tensor:
    """4-bit codes (n, k) from bitsandbytes' CPU inference layout (n, k/2), read without changing it."""
    p = packed.reshape(-1, block_n)
    codes = torch.cat([p & 0xF, p >> 4], dim=-1)  # low nibbles: first 32 values, high: last 32
    codes = codes.reshape(n // block_n, k // 2, block_n, 2).transpose(1, 2)
    return codes.reshape(n, k).long()


def _dequantize_4bit(weight) -> torch.Tensor:
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        n, k = state.shape
        codes = _unpack_cpu_codes(weight.data.view(torch.uint8), n, k)
        absmax = state.absmax.float().T  # stored (k / blocksize, n) in bf16
        values = state.code.float().to(codes.device)[codes].reshape(n, k // state.blocksize, state.blocksize)
        out = (values * absmax[:, :, None]).reshape(n, k)
        return out.to(getattr(state, "original_dtype", torch.float32))
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(weight.data, state)


def dequantize_weight(base_layer: nn.Module) -> torch.Tensor:
    """The (out, in) float weight of a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``.

    4-bit: in the dtype the weight had before quantization (``quant_state.dtype``), whichever
    layout bitsandbytes holds it in. 8-bit: float32 (int8 rows times their scales).
    """
    kind = layer_kind(base_layer)
    weight = base_layer.weight
    if kind == "linear4bit":
        if getattr(weight, "quant_state", None) is None:  # not quantized yet: still the float weight
            return weight.data
        return _dequantize_4bit(weight).reshape(base_layer.out_features, base_layer.in_features)
    if kind == "linear8bitlt":
        if weight.dtype != torch.int8:
            return weight.data
        scb = getattr(getattr(base_layer, "state", None), "SCB", None)
        if scb is None:
            scb = getattr(weight, "SCB", None)
        if scb is None:
            raise EnvironmentProblem(f"{type(base_layer).__name__}: int8 weight without its scales (SCB)")
        import bitsandbytes.functional as bf

        return bf.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    raise ConfigError(f"dequantize_weight expects a bitsandbytes Linear4bit or Linear8bitLt, "
                      f"got {type(base_layer).__name__}")


def float_linear_from(base_layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A frozen ``nn.Linear`` with ``weight`` (out, in) and the base layer's bias, in ``weight``'s dtype."""
    out_f, in_f = weight.shape
    bias = getattr(base_layer, "bias", None)
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=weight.dtype).clone(),
                                   requires_grad=False)
    return linear


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every bitsandbytes layer by a float ``nn.Linear`` (and int8 embedding tables by float
    ones) and drop the quantization config.

    ``dtype`` defaults to each layer's pre-quantization dtype (the model's dtype). Afterwards the
    model saves and reloads as an ordinary transformers model. Changes ``model`` in place.
    """
    for name, module in list(model.named_modules()):
        if not name or layer_kind(module) is None:
            continue
        weight = dequantize_weight(module)
        if dtype is not None:
            weight = weight.to(dtype)
        model.set_submodule(name, float_linear_from(module, weight))
    from .int8_embedding import dequantize_embeddings

    if hasattr(model, "get_input_embeddings"):
        dequantize_embeddings(model)
    forget_quantization(model)
    return model


def forget_quantization(model: nn.Module) -> None:
    """Remove what transformers attaches to a quantized model, so it saves as a plain one.

    Only for a model whose weights are all float already (after ``dequantize_model``, or a GGUF
    file that transformers dequantized on load but still marks as "quantized with gguf", which
    ``save_pretrained`` then refuses).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in model.__dict__:
            delattr(model, attr)
    if "is_quantized" in model.__dict__ or hasattr(type(model), "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property on some versions
            pass
