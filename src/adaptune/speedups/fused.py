"""Autograd functions that keep less for backward than the plain ops, for the same numbers.

``dropout_linear``: LoRA's ``A(dropout(x))`` keeping a 1-byte mask instead of two copies of x.

The plain path, ``lora_A(nn.Dropout(p)(x))``, keeps for backward the dropout's float mask (as big as
x) and the dropped input (as big again, for A's gradient), per adapted layer; q_proj and v_proj see
the same x, so a LoRA on both keeps four x-sized tensors per decoder layer. Here forward keeps x
itself (which q and v share, so it is one tensor) and a bool mask per layer, and backward makes the
dropped input again (one select). Same values and gradients as the plain path for the same mask;
the mask comes from 16-bit slices of random 64-bit words (see ``dropout_mask``), so the random
stream differs from ``nn.Dropout``'s.

``swiglu``: the gated MLP's ``silu(gate) * up`` (Llama, Mistral, Qwen, SmolLM...). Autograd keeps
gate (for silu), silu(gate) and up (for the product): three intermediate-wide tensors per token and
layer, more than half of what a q/v LoRA step keeps on such a model. This keeps gate and up and
makes silu(gate) again in backward (elementwise, no matmul). ``fuse_gated_mlps`` switches a
model's MLP modules to it where a numerical probe shows the module computes exactly that. There,
gate and up are the MLP's own fresh tensors, which nothing else holds, so backward writes the two
gradients into their memory (``reuse_inputs``) instead of two new intermediate-wide buffers. On a
CPU, writing a fresh buffer that is not in cache made those two ops the slowest elementwise work
of a SmolLM2 step (torch.profiler, 512 tokens: 1.2-4.3 ms each, against 0.06-0.07 ms in place);
the step as a whole ran 1-2 % faster (alternating A/B steps in one process).

``rms_norm``: Llama's RMSNorm, ``w * x * rsqrt(mean(x^2) + eps)``, in one buffer. The plain ops
allocate three token x hidden tensors per norm (x^2, the normalised x, its product with w) and keep
two of them for backward, interleaved with the tensors that live until backward. On a CPU, whose
allocator cannot move blocks, those short-lived holes are what makes a step's resident memory
grow well past what autograd keeps. Here forward writes x^2, then the output, into one buffer and
keeps x and the per-token rsqrt; backward uses one buffer too. ``fuse_rms_norms`` switches the
modules whose output a probe shows to be bit-identical.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["dropout_mask", "dropout_linear", "swiglu", "fuse_gated_mlps", "unfuse_gated_mlps", "rms_norm",
           "fuse_rms_norms", "unfuse_rms_norms"]


def dropout_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """Bool keep-mask shaped like ``like``: each element kept with probability 1 - p (p rounded to a
    multiple of 1/65536). One random 64-bit word gives four 16-bit draws: a third of the time of
    ``torch.rand(...) >= p`` on a CPU, where drawing the masks was 3% of a LoRA step."""
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
        # where(), not x * mask: multiplying by a bool tensor first copies it to x's dtype (6x slower)
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


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, saving gate and up only; with ``reuse`` set, backward overwrites them."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, reuse: bool) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.reuse, ctx.spent = reuse, False
        return F.silu(gate).mul_(up)  # in place: one intermediate-wide tensor, not two

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.spent:
            raise RuntimeError("adaptune.fused.swiglu's backward wrote its gradients into gate's and up's memory, so "
                               "it cannot run twice (retain_graph=True); switch fused_mlp_activation off for that")
        gate, up = ctx.saved_tensors
        # backward itself recorded (create_graph=True): autograd needs gate and up intact
        recorded = torch.is_grad_enabled()
        in_place = ctx.reuse and not recorded
        ctx.spent = in_place
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0] and recorded:  # differentiable, as torch's own silu does
            sig = torch.sigmoid(gate)
            grad_gate = grad_out * up * sig * (1 + gate * (1 - sig))
        elif ctx.needs_input_grad[0]:  # before gate is overwritten: it reads gate
            # aten's own fused kernel: grad * sig * (1 + g * (1 - sig)) in one pass, not five
            grad_gate = up.mul_(grad_out) if in_place else grad_out * up
            torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate, inplace=in_place).mul_(grad_out)
        return grad_gate, grad_up, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, reuse_inputs: bool = False) -> torch.Tensor:
    """``F.silu(gate) * up``; under autograd it keeps two tensors for backward instead of three.

    ``reuse_inputs``: gate and up are the caller's to give away (no other tensor, view or hook
    holds them), so backward may write the gradients into their memory; the graph can then be
    run backward only once.
    """
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        # not while torch.compile traces: its own passes plan the buffers
        reuse = (reuse_inputs and not torch.compiler.is_compiling() and gate._base is None and up._base is None
                 and gate.data_ptr() != up.data_ptr())
        return _SwiGLU.apply(gate, up, reuse)
    return F.silu(gate) * up


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # gate and up are this call's own, unless a hook on their modules may have kept them
    private = not (nn.modules.module._global_forward_hooks or self.gate_proj._forward_hooks
                   or self.up_proj._forward_hooks)
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), reuse_inputs=private))


def _is_silu(module: object) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ in ("SiLUActivation", "SiLU")


def _probe_matches(mlp: nn.Module) -> bool:
    """Whether ``mlp(x)`` is ``down_proj(silu(gate_proj(x)) * up_proj(x))`` on a random input."""
    weight = next((p for p in mlp.parameters() if p.is_floating_point()), None)
    hidden = getattr(getattr(mlp, "gate_proj", None), "in_features", None)
    if weight is None or not hidden:
        return False
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    was_training = mlp.training
    mlp.eval()  # no dropout in the probe
    try:
        with torch.no_grad():
            gen = torch.Generator(device=weight.device).manual_seed(0)  # leaves the global RNG alone
            x = torch.randn(1, 3, hidden, generator=gen, device=weight.device).to(dtype)
            want, got = mlp(x), _fused_mlp_forward(mlp, x)
    except Exception:  # noqa: BLE001 - any module we cannot run this way is left alone
        return False
    finally:
        mlp.train(was_training)
    return isinstance(want, torch.Tensor) and want.shape == got.shape and torch.equal(want, got)


def _switch_forwards(model: nn.Module, flag: str, forward: Callable[..., Any],
                     qualifies: Callable[[nn.Module], bool]) -> int:
    """Give every module that ``qualifies`` the instance ``forward``, marked with ``flag``; returns
    how many modules run it (those switched before included)."""
    count = 0
    for module in model.modules():
        if getattr(module, flag, False):
            count += 1
        elif qualifies(module):
            module.forward = types.MethodType(forward, module)
            setattr(module, flag, True)
            count += 1
    return count


def _restore_forwards(model: nn.Module, flag: str) -> int:
    """Undo :func:`_switch_forwards` for ``flag``: the modules' class forward again."""
    count = 0
    for module in model.modules():
        if getattr(module, flag, False):
            vars(module).pop("forward", None)
            delattr(module, flag)
            count += 1
    return count


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and _is_silu(getattr(module, "act_fn", None)) and _probe_matches(module))


def fuse_gated_mlps(model: nn.Module) -> int:
    """Run every gated-SiLU MLP of ``model`` through :func:`swiglu`; returns how many were switched.

    A module qualifies when it has ``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``
    and a probe gives bit-identical output; anything else keeps its own forward.
    """
    return _switch_forwards(model, "_adaptune_swiglu", _fused_mlp_forward, _is_gated_silu_mlp)


def unfuse_gated_mlps(model: nn.Module) -> int:
    """Undo :func:`fuse_gated_mlps` (the modules' own forward again); returns how many were restored."""
    return _restore_forwards(model, "_adaptune_swiglu")


# ---- RMSNorm ---------------------------------------------------------------------------------------


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
    return _switch_forwards(model, "_adaptune_rms_norm", _fused_rms_norm_forward,
                            lambda m: "Norm" in type(m).__name__ and _norm_probe_matches(m))


def unfuse_rms_norms(model: nn.Module) -> int:
    """Undo :func:`fuse_rms_norms`; returns how many modules were restored."""
    return _restore_forwards(model, "_adaptune_rms_norm")
