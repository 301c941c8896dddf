"""Speed-ups for training: the same losses and gradients, less time or memory.

Each module holds one of them and says how it works; :func:`applied` is the one way the Trainer
switches a model to them, for the length of a block, and gives the model back as it came:

- ``loss``: the output head and cross-entropy only where labels are, a chunk of rows at a time
  (used by the Trainer's ``compute_loss``; it changes no module);
- ``swiglu`` / ``rms_norm``: gated-SiLU MLPs and Llama RMSNorms that keep less for backward;
- ``autocast``: frozen linears under fp16/bf16 autocast keep no 16-bit weight copy;
- ``attention``: packed rows attend one example at a time;
- ``compile``: ``torch.compile`` per decoder layer (opt-in);
- ``dropout``: LoRA's dropout + A with a 1-byte mask (used by the LoRA layer itself);
- ``allocator``: process-wide memory settings for CPU training (kernel-cache caps, opt-in malloc).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from torch import nn

__all__ = ["Speedups", "applied"]


@dataclass(frozen=True)
class Speedups:
    """Which speed-ups to apply (the Trainer fills this from its ``TrainingArguments``)."""

    fused_mlp_activation: bool = True
    fused_rms_norm: bool = True
    lean_autocast: bool = False  # only meaningful under fp16/bf16 autocast
    packed_attention: bool = True
    compile_layers: bool = False
    cpu_keep_freed_memory: bool = False
    on_cpu: bool = True


@contextmanager
def applied(model: nn.Module, choice: Speedups) -> Iterator[dict[str, int]]:
    """Within the block ``model`` runs the chosen speed-ups; after it, every module is as it was
    (modules switched before the block stay switched). Yields how many modules each one changed."""
    from .allocator import cap_onednn_caches, keep_freed_memory

    # process-wide, before the first 16-bit product of the run reads the cache sizes
    cap_onednn_caches()
    if choice.cpu_keep_freed_memory and choice.on_cpu:
        keep_freed_memory()
    counts: dict[str, int] = {}
    with ExitStack() as stack:
        for name, switch, flag in _forward_switches():
            if getattr(choice, name):
                counts[name] = stack.enter_context(_switched(model, switch, flag))
        if choice.compile_layers:
            counts["compile_layers"] = stack.enter_context(_compiled(model))
        if choice.packed_attention:
            from .attention import packed_attention

            counts["packed_attention"] = stack.enter_context(packed_attention(model))
        yield counts


def _forward_switches() -> list[tuple[str, Callable[[nn.Module], int], str]]:
    """(``Speedups`` field, switch function, flag) of the speed-ups that switch module forwards."""
    from . import autocast, rms_norm, swiglu

    return [
        ("fused_mlp_activation", swiglu.fuse_gated_mlps, swiglu.FLAG),
        ("fused_rms_norm", rms_norm.fuse_rms_norms, rms_norm.FLAG),
        ("lean_autocast", autocast.lean_autocast_linears, autocast.FLAG),
    ]


@contextmanager
def _switched(model: nn.Module, switch: Callable[[nn.Module], int], flag: str) -> Iterator[int]:
    """``switch(model)`` for the block, then the modules it switched restored (not earlier ones)."""
    from .patching import flagged, restore_forwards

    before = flagged(model, flag)
    count = switch(model)
    try:
        yield count - len(before)
    finally:
        restore_forwards(model, flag, keep=before)


@contextmanager
def _compiled(model: nn.Module) -> Iterator[int]:
    from ..errors import warn_user
    from .compile import compile_layers, uncompile_layers

    layers = compile_layers(model)
    if not layers:
        warn_user("compile_layers: no decoder layer list found in this model; running it uncompiled", stacklevel=5)
    try:
        yield len(layers)
    finally:
        uncompile_layers(layers)
