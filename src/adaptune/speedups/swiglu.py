"""The gated MLP's ``silu(gate) * up`` (Llama, Mistral, Qwen, SmolLM...). Autograd keeps
gate (for silu), silu(gate) and up (for the product): three intermediate-wide tensors per token and
layer, more than half of what a q/v LoRA step keeps on such a model. This keeps gate and up and
makes silu(gate) again in backward (elementwise, no matmul). ``fuse_gated_mlps`` switches a
model's MLP modules to it where a numerical probe shows the module computes exactly that. There,
gate and up are the MLP's own fresh tensors, which nothing else holds, so backward writes the two
gradients into their memory (``reuse_inputs``) instead of two new intermediate-wide buffers: on a
CPU, writing a fresh buffer that is not in cache is far slower than writing in place, and those
two ops were the slowest elementwise work of a step (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .patching import restore_forwards, switch_forwards

__all__ = ["fuse_gated_mlps", "swiglu", "unfuse_gated_mlps"]

FLAG = "_adaptune_swiglu"  # marks the modules this switches (speedups.patching)


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


def _is_gated_silu_mlp(module: nn.Module) -> bool:
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and _is_silu(getattr(module, "act_fn", None)) and _probe_matches(module))


def fuse_gated_mlps(model: nn.Module) -> int:
    """Run every gated-SiLU MLP of ``model`` through :func:`swiglu`; returns how many were switched.

    A module qualifies when it has ``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``
    and a probe gives bit-identical output; anything else keeps its own forward.
    """
    return switch_forwards(model, FLAG, _fused_mlp_forward, _is_gated_silu_mlp)


def unfuse_gated_mlps(model: nn.Module) -> int:
    """Undo :func:`fuse_gated_mlps` (the modules' own forward again); returns how many were restored."""
    return restore_forwards(model, FLAG)
