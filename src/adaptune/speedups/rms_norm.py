"""Llama's RMSNorm, ``w * x * rsqrt(mean(x^2) + eps)``, in one buffer. The plain ops
allocate three token x hidden tensors per norm (x^2, the normalised x, its product with w) and keep
two of them for backward, interleaved with the tensors that live until backward. On a CPU, whose
allocator cannot move blocks, those short-lived holes are what makes a step's resident memory
grow well past what autograd keeps. Here forward writes x^2, then the output, into one buffer and
keeps x and the per-token rsqrt; backward uses one buffer too. ``fuse_rms_norms`` switches the
modules whose output a probe shows to be bit-identical.

"""

from __future__ import annotations

import types

import torch
from torch import nn

from .patching import restore_forwards, switch_forwards

__all__ = ["fuse_rms_norms", "rms_norm", "unfuse_rms_norms"]

FLAG = "_adaptune_rms_norm"  # marks the modules this switches (speedups.patching)


class _RMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2, -1) + eps))`` in fp32, saving x and the per-row rsqrt."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out = x.pow(2)
        rstd = torch.rsqrt(out.mean(-1, keepdim=True) + eps)
        torch.mul(x, rstd, out=out)
        out.mul_(weight)  # the same products, in the same order, as weight * (x * rstd)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            normed = x * rstd
            grad_weight = (grad_out * normed).reshape(-1, x.shape[-1]).sum(0)
            del normed
        if ctx.needs_input_grad[0]:
            # d/dx of w * x * r, r = (mean(x^2) + eps)^-1/2:  r * gw - x * r^3 * mean(gw * x), gw = g * w
            gw = grad_out * weight
            dot = torch.matmul(gw.unsqueeze(-2), x.unsqueeze(-1)).squeeze(-1)  # (..., 1): no full temp
            coef = rstd.pow(3).mul_(dot).div_(x.shape[-1])
            grad_x = gw.mul_(rstd).addcmul_(x, coef, value=-1.0)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm for fp32 ``x`` and ``weight``; under autograd it allocates one output buffer
    and keeps x and one scalar a row for backward."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x, weight, eps)
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _fused_rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != torch.float32 or self.weight.dtype != torch.float32:
        return type(self).forward(self, hidden_states)  # other dtypes: the module's own casts
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _norm_probe_matches(norm: nn.Module) -> bool:
    """Whether ``norm(x)`` equals :func:`rms_norm` bit for bit on a random fp32 input."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.dtype != torch.float32:
        return False
    if not isinstance(getattr(norm, "variance_epsilon", None), float):
        return False
    try:
        with torch.no_grad():
            gen = torch.Generator(device=weight.device).manual_seed(0)  # leaves the global RNG alone
            x = torch.randn(2, 3, weight.shape[0], generator=gen, device=weight.device)
            want = norm(x)
            got = _RMSNorm.forward(types.SimpleNamespace(save_for_backward=lambda *t: None), x, weight,
                                   norm.variance_epsilon)
    except Exception:  # noqa: BLE001 - any module we cannot run this way is left alone
        return False
    return isinstance(want, torch.Tensor) and want.shape == got.shape and torch.equal(want, got)


def fuse_rms_norms(model: nn.Module) -> int:
    """Run every Llama-style RMSNorm of ``model`` through :func:`rms_norm` (fp32 inputs only);
    returns how many were switched. A module qualifies when it has a 1-d ``weight`` and a float
    ``variance_epsilon`` and a probe gives bit-identical output (Gemma's ``1 + weight`` does not)."""
    return switch_forwards(model, FLAG, _fused_rms_norm_forward,
                            lambda m: "Norm" in type(m).__name__ and _norm_probe_matches(m))


def unfuse_rms_norms(model: nn.Module) -> int:
    """Undo :func:`fuse_rms_norms`; returns how many modules were restored."""
    return restore_forwards(model, FLAG)
