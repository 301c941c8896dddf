"""Regional compilation: ``torch.compile`` on each decoder layer (one compiled graph serves them all),
keeping the chunked loss, which compiling the whole model would turn off."""

from __future__ import annotations

from torch import nn

from .loss import causal_lm_parts

__all__ = ["compile_layers", "uncompile_layers"]


def compile_layers(model: nn.Module) -> list[nn.Module]:
    """Compile each decoder layer of ``model``; returns the layers compiled (empty when no decoder
    layer list is found)."""
    parts = causal_lm_parts(model)
    layers = getattr(parts[1], "layers", None) if parts is not None else None
    if not isinstance(layers, nn.ModuleList):
        return []
    done = [layer for layer in layers if getattr(layer, "_compiled_call_impl", None) is None]
    for layer in done:
        layer.compile()
    return done


def uncompile_layers(layers: list[nn.Module]) -> None:
    """Undo :func:`compile_layers`: the layers run eagerly again (``nn.Module.compile`` keeps the
    compiled call in ``_compiled_call_impl``)."""
    for layer in layers:
        layer._compiled_call_impl = None
