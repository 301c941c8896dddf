"""Which modules are quantized layers, told by class name so that bitsandbytes is never imported
just to ask."""

from __future__ import annotations

from torch import nn

QUANT_KINDS = ("linear4bit", "linear8bitlt")  # what layer_kind returns for bitsandbytes layers
QUANTIZE_CHOICES = ("nf4", "fp4", "int8")  # what a user may ask a base to be stored in

__all__ = ["QUANTIZE_CHOICES", "QUANT_KINDS", "has_quantized_layers", "layer_kind"]


def layer_kind(module: nn.Module) -> str | None:
    """"linear4bit" / "linear8bitlt" for bitsandbytes layers (by class name: no import), else None."""
    name = type(module).__name__
    if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
        return "linear4bit"
    if name == "Linear8bitLt":
        return "linear8bitlt"
    return None


def has_quantized_layers(model: nn.Module) -> bool:
    """bitsandbytes layers (bare or under LoRA) or adaptune's int8 embedding tables."""
    return any(layer_kind(m) is not None or getattr(m, "kind", None) in QUANT_KINDS
               or type(m).__name__ in ("Int8Embedding", "Int8Head") for m in model.modules())
