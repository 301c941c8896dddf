"""LoRA's ``A(dropout(x))`` as one autograd function that keeps a 1-byte mask instead of two copies of x.

The plain path, ``lora_A(nn.Dropout(p)(x))``, keeps for backward the dropout's float mask (as big as
x) and the dropped input (as big again, for A's gradient), per adapted layer; q_proj and v_proj see
the same x, so a LoRA on both keeps four x-sized tensors per decoder layer. Here forward keeps x
itself (which q and v share, so it is one tensor) and a bool mask per layer, and backward makes the
dropped input again (one multiply). Same values and gradients as the plain path for the same mask;
the mask comes from ``torch.rand`` (about twice as fast as ``bernoulli_`` on a CPU), so the random
stream differs from ``nn.Dropout``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dropout_mask", "dropout_linear"]


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Bool keep-mask shaped like ``like``: each element kept with probability 1 - p."""
    return torch.rand(like.shape, device=like.device) >= p


class _DropoutLinear(torch.autograd.Function):
    """``F.linear(x * mask / (1 - p), weight)``, saving x and the bool mask rather than the product."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
        scale = 1.0 / (1.0 - p)
        out = F.linear(x * mask * scale, weight)
        ctx.save_for_backward(x, weight, mask)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, mask = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight) * mask * ctx.scale
        if ctx.needs_input_grad[1]:
            dropped = (x * mask * ctx.scale).reshape(-1, x.shape[-1])
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).T @ dropped
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
