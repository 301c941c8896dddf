"""LoRA's ``A(dropout(x))`` keeping a 1-byte mask instead of two copies of x.

The plain path, ``lora_A(nn.Dropout(p)(x))``, keeps for backward the dropout's float mask (as big as
x) and the dropped input (as big again, for A's gradient), per adapted layer; q_proj and v_proj see
the same x, so a LoRA on both keeps four x-sized tensors per decoder layer. Here forward keeps x
itself (which q and v share, so it is one tensor) and a bool mask per layer, and backward makes the
dropped input again (one select). Same values and gradients as the plain path for the same mask;
the mask comes from 16-bit slices of random 64-bit words (see ``dropout_mask``), so the random
stream differs from ``nn.Dropout``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dropout_active", "dropout_linear", "dropout_mask"]


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Bool keep-mask shaped like ``like``: each element kept with probability 1 - p (p rounded to a
    multiple of 1/65536). One random 64-bit word gives four 16-bit draws: far cheaper on a CPU
    than ``torch.rand(...) >= p``, one float draw per element (docs/benchmarks.md)."""
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device)
    words.random_(torch.iinfo(torch.int64).min, None)  # all 64 bits uniform
    draws = words.view(torch.int16)[:n]  # uniform over -32768..32767
    return (draws >= round(p * 65536) - 32768).view(like.shape)


class _DropoutLinear(torch.autograd.Function):
    """``F.linear(x * mask / (1 - p), weight)``, saving x and the bool mask rather than the product."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
        # the 1 / (1 - p) goes on the r-wide output, not the x-wide input: one temporary, not two
        scale = 1.0 / (1.0 - p)
        # where(), not x * mask: multiplying by a bool tensor first copies it to x's dtype
        out = F.linear(torch.where(mask, x, 0.0), weight).mul_(scale)
        ctx.save_for_backward(x, weight, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_weight = None
        low = grad_out.dtype  # under autocast the product ran, and its gradient comes, in a lower precision
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(low)).mul_(mask).mul_(ctx.scale).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = torch.where(mask, x, 0.0).reshape(-1, x.shape[-1]).to(low)
            grad_weight = (grad_out.reshape(-1, grad_out.shape[-1]).T @ dropped).mul_(ctx.scale).to(weight.dtype)
        return grad_x, grad_weight, None, None


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(F.dropout(x, p, training=True), weight)`` (no bias) with the lean saved state above.

    ``mask`` (bool, shaped like x) fixes which elements are kept; by default a fresh one is drawn.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout_linear needs 0 < p < 1, got {p}")
    if mask is None:
        mask = dropout_mask(x, p)
    return _DropoutLinear.apply(x, weight, mask, p)


def dropout_active(dropout: torch.nn.Module) -> bool:
    """Whether a dropout module changes its input now (an ``nn.Dropout`` in training, p > 0)."""
    return isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0
