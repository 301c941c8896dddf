"""Bytes a decoder layer keeps for backward, per token: the table in ``tools/memory/__init__.py``."""

from __future__ import annotations

from torch import nn

from .shapes import Shape, group_of, linear_like

ADAPTER_BYTES = 4  # peft keeps LoRA weights in fp32 (autocast_adapter_dtype=True)


def norm_bytes(norm: nn.Module, size: int, c: int, trainable: bool) -> int:
    """Bytes per token a norm layer keeps for backward, for an input of ``size`` values."""
    if isinstance(norm, nn.LayerNorm):  # native kernel: input + mean + rstd
        return size * c + 8
    if isinstance(norm, getattr(nn, "RMSNorm", ())):  # native torch RMSNorm: input + rstd
        return size * c + 4
    # Python RMSNorm (Llama family): upcasts the input to fp32, keeps it and 1/rms; keeps the
    # normalised value (cast back) when its weight is trained
    return size * max(c, 4) + 4 + (size * c if trainable else 0)


def layer_saved(block: nn.Module, s: Shape, c: int, seq_len: int, full: bool,
                 lora: dict[str, list[tuple[int, int]]], lora_dropout: float, r: int, padded: bool,
                 cuda: bool) -> int:
    """Bytes per token one decoder layer keeps for backward (the table in the module doc)."""
    total = 0
    # dropout keeps its mask: 1-byte bool from CUDA's fused kernel, a float tensor elsewhere
    mask = (lambda dtype_bytes: 1) if cuda else (lambda dtype_bytes: dtype_bytes)
    norms = [m for n, m in block.named_modules()
             if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None]
    seen_small = 0
    for m in norms:
        size = m.weight.numel()
        if size == s.head_dim:  # q_norm / k_norm: inputs are q, then k
            size = s.q if seen_small == 0 else s.kv
            seen_small += 1
        total += norm_bytes(m, size, c, full)
    # which inputs of the linear layers are kept: plain ones (trainable base weight, or an fp32
    # LoRA adapter reading them as they are) and LoRA's own fp32 copies
    plain: set[str] = set()
    widths = {"attn_in": s.h, "attn_out": s.q, "mlp_in": s.h, "mlp_out": s.i}
    for name, mod in block.named_modules():
        if not linear_like(mod):
            continue
        group = group_of(name, mod, s.h)
        if full:
            plain.add(group)
        for fan_in, _ in lora.get(name, ()):
            total += r * ADAPTER_BYTES
            if lora_dropout > 0:
                total += fan_in  # the 1-byte keep-mask (adaptune.speedups.dropout)
            if c != ADAPTER_BYTES:
                total += fan_in * ADAPTER_BYTES  # the input cast to the adapter's fp32
            else:
                plain.add(group)
    kv = s.q if (padded and s.kv != s.q) else s.kv  # GQA with a mask repeats K/V in transformers
    total += (s.q + 2 * kv) * c  # q, k, v as attention gets them
    # SDPA with dropout has no fused CPU kernel: it falls back to the quadratic "math" one
    if s.eager or (not cuda and s.attn_dropout > 0):
        probs = s.heads * seq_len
        total += probs * 4 + (probs * c if c != 4 else 0)  # fp32 softmax (+ cast back)
        if s.attn_dropout > 0:
            total += probs * (mask(c) + c)  # dropout mask + dropped probabilities
        if "attn_out" in plain:
            total += s.q * c
    else:
        total += s.q * c + s.heads * 4  # output (also o_proj's input) + logsumexp
    for group in ("attn_in", "mlp_in", "mlp_out"):
        if group in plain:
            total += widths[group] * c
    total += s.i * c * (s.act_saved + (2 if s.gated else 0))  # act input (+ act out, up)
    if s.resid_dropout > 0:
        total += 2 * s.h * mask(c)  # after attention and after the MLP
    return total
