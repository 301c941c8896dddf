"""LoftQ: start LoRA from the part of the weight that quantization lost.

QLoRA starts from a quantized base Q(W) and an adapter that is zero, so training begins with the
whole quantization error W - Q(W) in the model. LoftQ (Li et al. 2023, arXiv:2310.08659) instead
chooses the stored weight Q and the adapter's first value together, alternating::

    L = 0
    repeat loftq_iter times:
        Q = quantize(W - L)              # what the 4-bit (or 8-bit) layer will hold
        L = best rank-r fit of W - Q     # truncated SVD: what the adapter starts from

    stored weight: Q          adapter at step 0: scaling * B @ A = L

so that Q + L is closer to W than Q(W) alone. With one iteration Q is the plain quantization of
W (the layer a ``quantization_config`` load gives) and only the adapter changes; more iterations
also move Q, and the stored base is then LoftQ's own.

Differences from peft's ``loftq_init``, which returns a float weight equal to the dequantized Q
(the user saves it and reloads it in 4-bit) and runs on CUDA only:

* the layer becomes a real bitsandbytes layer holding Q, quantized exactly as the model will
  hold it (blocks of 64, double quantization), so the memory saving is there at once, on CPU too;
* the adapter is divided by LoRA's ``scaling`` (alpha / r) so that the *applied* update equals
  L; peft sets B @ A = L, which applies scaling * L when alpha != r.

The SVD is a full one (``torch.linalg.svd``): a quantization error is close to white noise, with
a flat spectrum, and a randomized ``torch.svd_lowrank``, much faster, misses much of the best
low-rank fit on such a matrix (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import ConfigError

LOFTQ_BITS = {4: "nf4", 8: "int8"}


@dataclass
class LoftQResult:
    """One layer's LoftQ start: the bitsandbytes layer to use as base, and A (r, in), B (out, r)."""

    base_layer: nn.Module
    lora_A: torch.Tensor
    lora_B: torch.Tensor


def _top_r(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m, r), S (r), V (n, r) of the best rank-r approximation of ``matrix``."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].T


@torch.no_grad()
def loftq_layer(linear: nn.Linear, rank: int, scaling: float, num_bits: int = 4, num_iter: int = 1,
                double_quant: bool = True) -> LoftQResult:
    """LoftQ for one float ``nn.Linear``: its quantized replacement and the adapter's start."""
    from ...quant.bnb import quantized_linear_from
    from ...quant.dequant import dequantize_weight

    if num_bits not in LOFTQ_BITS:
        raise ConfigError(f"loftq_bits must be 4 (nf4) or 8 (int8), got {num_bits}")
    if num_iter < 1:
        raise ConfigError(f"loftq_iter must be at least 1, got {num_iter}")
    if type(linear) is not nn.Linear:
        raise ConfigError(f"LoftQ works on full-precision nn.Linear layers, not on a {type(linear).__name__}")
    if rank > min(linear.in_features, linear.out_features):
        raise ConfigError(f"LoftQ rank {rank} exceeds the layer's smaller side "
                          f"({linear.out_features} x {linear.in_features})")
    weight = linear.weight.detach().float()
    low_rank = torch.zeros_like(weight)
    for _ in range(num_iter):
        layer = quantized_linear_from(linear, LOFTQ_BITS[num_bits], weight=weight - low_rank,
                                      double_quant=double_quant)
        u, s, v = _top_r(weight - dequantize_weight(layer).float(), rank)
        root = s.sqrt()
        lora_B, lora_A = u * root, root[:, None] * v.T
        low_rank = lora_B @ lora_A
    unscale = 1.0 / math.sqrt(scaling)
    dtype = linear.weight.dtype
    return LoftQResult(layer, (lora_A * unscale).to(dtype), (lora_B * unscale).to(dtype))

