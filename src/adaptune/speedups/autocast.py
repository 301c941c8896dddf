"""Frozen linear layers under fp16/bf16 autocast, without a 16-bit weight copy kept for backward.

Under autocast, ``F.linear(x, W)`` with an fp32 ``W`` casts W to 16 bits on every call, and autograd
keeps that cast until backward, for the input gradient ``grad @ W16``. With frozen fp32 weights
(LoRA, prompt methods: the usual way to fine-tune in mixed precision) a training step therefore
holds a 16-bit copy of every linear weight of the model: 212 MB for SmolLM2-135M, 14 GB for an
8B model. :func:`frozen_linear` keeps the fp32 parameter instead (no copy: it lives anyway) and
casts it again in backward: one more cast per layer, no weight copy held::

    forward:   y  = x16 @ cast(W).T        (cast freed at once)
    backward:  dx = dy @ cast(W)           (cast again, freed at once)

The products run on the same 16-bit values as autocast's own ``F.linear``. Only frozen plain
``nn.Linear`` modules are switched (:func:`lean_autocast_linears`); with autocast off, or no
gradient to pass on, they run ``F.linear`` as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .patching import restore_forwards, switch_forwards

__all__ = ["frozen_linear", "lean_autocast_linears", "restore_autocast_linears"]

FLAG = "_adaptune_lean_autocast"


class _FrozenLinear(torch.autograd.Function):
    """``F.linear(x, W.to(dtype), b.to(dtype))`` for a frozen W, saving W itself, not its cast."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.x_dtype, ctx.dtype = x.dtype, dtype
        return F.linear(x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_out.to(ctx.dtype), weight.to(ctx.dtype)).to(ctx.x_dtype)
        return grad_x, None, None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; under autocast, for a frozen weight of another dtype than
    autocast's and an ``x`` that needs a gradient, without keeping the weight's cast for backward."""
    device = x.device.type
    if (torch.is_autocast_enabled(device) and torch.is_grad_enabled() and x.requires_grad
            and not weight.requires_grad and (bias is None or not bias.requires_grad)):
        dtype = torch.get_autocast_dtype(device)
        if weight.dtype != dtype and weight.is_floating_point():
            return _FrozenLinear.apply(x, weight, bias, dtype)
    return F.linear(x, weight, bias)


def _lean_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return frozen_linear(x, self.weight, self.bias)


def lean_autocast_linears(model: nn.Module) -> int:
    """Run every plain ``nn.Linear`` of ``model`` through :func:`frozen_linear`; returns how many.

    Subclasses (quantized layers, LoRA wrappers) keep their own forward; a LoRA layer's base
    ``nn.Linear`` is switched like any other. Trainable weights take the plain path at call time.
    """
    return switch_forwards(model, FLAG, _lean_forward, lambda m: type(m) is nn.Linear)


def restore_autocast_linears(model: nn.Module) -> int:
    """Undo :func:`lean_autocast_linears`; returns how many modules were restored."""
    return restore_forwards(model, FLAG)
