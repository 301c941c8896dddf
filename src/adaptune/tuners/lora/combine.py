"""New adapters from weighted combinations of existing ones (peft's ``add_weighted_adapter``).

``cat`` stacks the adapters (rank = sum of ranks): its delta is exactly sum(w_i * delta_i).
``svd`` takes that same exact delta and keeps its best rank-``svd_rank`` approximation.
``linear`` (equal ranks) adds sqrt(w_i * s_i)-weighted A's and B's, as peft does; it is not the
sum of deltas (cross terms), and kept for compatibility.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ...errors import ConfigError
from ..targets import as_list, slice_width
from .layer import AdapterSpec, LoraLayer

if TYPE_CHECKING:
    from .model import LoraModel

__all__ = ["add_weighted_adapter"]


def add_weighted_adapter(tuner: LoraModel, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None) -> None:
    """A new adapter from a weighted combination of existing ones (peft's semantics).

    ``cat`` stacks the adapters (rank = sum of ranks): its delta is exactly sum(w_i * delta_i).
    ``svd`` takes that same exact delta and keeps its best rank-``svd_rank`` approximation.
    ``linear`` (equal ranks) adds sqrt(w_i * s_i)-weighted A's and B's, as peft does; it is
    not the sum of deltas (cross terms), and kept for compatibility.
    """
    if adapter_name in tuner.peft_config:
        raise ConfigError(f"an adapter named {adapter_name!r} already exists")
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError("adapters and weights must be non-empty lists of the same length")
    configs = [tuner.peft_config[a] for a in adapters]
    if any(c.use_dora for c in configs):
        raise ConfigError("add_weighted_adapter does not combine DoRA adapters")
    ranks = [c.r for c in configs]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ConfigError("combination_type='linear' needs adapters of equal rank; use 'cat' or 'svd'")
        new_r = ranks[0]
    elif combination_type == "cat":
        new_r = sum(ranks)
    elif combination_type == "svd":
        new_r = svd_rank or max(ranks)
    else:
        raise ConfigError(f"combination_type must be 'linear', 'cat' or 'svd', got {combination_type!r}")
    targets = sorted({t for c in configs for t in as_list(c.target_modules)})
    new_config = replace(configs[0], r=new_r, lora_alpha=new_r, use_rslora=False, rank_pattern={},
                         alpha_pattern={}, target_modules=targets or None)
    tuner.peft_config[adapter_name] = new_config
    for _, layer in tuner.lora_layers():
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.specs]
        if not present:
            continue
        slices = layer.specs[present[0][0]].slices
        if slices or layer.is_embedding:
            if combination_type != "cat" or any(layer.specs[a].slices != slices for a, _ in present):
                raise ConfigError("sliced and embedding adapters combine only with combination_type='cat'")
        layer.add(adapter_name, AdapterSpec(r=new_r, alpha=new_r, slices=slices))
        _combine_into(layer, present, adapter_name, combination_type)
    for _, wrapper in tuner.save_wrappers():
        source = next((a for a in adapters if a in wrapper.modules_to_save), None)
        if source is not None:
            wrapper.modules_to_save[adapter_name] = copy.deepcopy(wrapper.modules_to_save[source])
    tuner.refresh_trainable()


def _combine_into(layer: LoraLayer, present: list[tuple[str, float]], new: str, how: str) -> None:
    with torch.no_grad():
        if layer.is_embedding:  # cat only: stack ranks, weights folded into A
            a = torch.cat([layer.lora_embedding_A[n] * w * layer.scaling(n) for n, w in present], 0)
            b = torch.cat([layer.lora_embedding_B[n] for n, _ in present], 1)
            a, b = _pad_rank(a, b, layer.specs[new].r)
            layer.lora_embedding_A[new].copy_(a)
            layer.lora_embedding_B[new].copy_(b)
            return
        spec = layer.specs[new]
        if how == "linear":
            a = sum(math.sqrt(abs(w) * layer.scaling(n)) * math.copysign(1, w) * layer.lora_A[n].weight
                    for n, w in present)
            b = sum(math.sqrt(abs(w) * layer.scaling(n)) * layer.lora_B[n].weight for n, w in present)
        elif how == "cat" and not spec.slices:
            a = torch.cat([layer.lora_A[n].weight * w * layer.scaling(n) for n, w in present], 0)
            b = torch.cat([layer.lora_B[n].weight for n, _ in present], 1)
            a, b = _pad_rank(a, b, spec.r)
        elif how == "cat":  # sliced: per slice block, stack the ranks
            a, b = _cat_sliced(layer, present, spec)
        else:  # svd of the exact weighted delta
            delta = sum(layer.delta_weight(n) * w for n, w in present)
            u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
            r = spec.r
            b = (u[:, :r] * s[:r]).to(delta.dtype)
            a = vh[:r].to(delta.dtype)
        layer.lora_A[new].weight.copy_(a)
        layer.lora_B[new].weight.copy_(b)


def _cat_sliced(layer: LoraLayer, present: list[tuple[str, float]], spec: AdapterSpec):
    rows = slice_width(spec.slices)
    a_blocks, b_blocks = [], []
    for i in range(len(spec.slices)):
        a_i, b_i = [], []
        for n, w in present:
            r_n = layer.specs[n].r
            a_i.append(layer.lora_A[n].weight[i * r_n:(i + 1) * r_n] * w * layer.scaling(n))
            b_i.append(layer.lora_B[n].weight[i * rows:(i + 1) * rows])
        a, b = _pad_rank(torch.cat(a_i, 0), torch.cat(b_i, 1), spec.r)
        a_blocks.append(a)
        b_blocks.append(b)
    return torch.cat(a_blocks, 0), torch.cat(b_blocks, 0)


def _pad_rank(a: torch.Tensor, b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k, in) and B (out, k) stacked from the adapters present in a layer, padded with zero ranks
    to the combined adapter's rank ``r`` (an adapter that does not touch this layer adds nothing)."""
    k = a.shape[0]
    if k > r:
        raise ConfigError(f"the adapters' ranks in this layer add up to {k}, more than the combined rank {r} "
                          f"(rank_pattern?); combine them with combination_type='svd'")
    if k == r:
        return a, b
    return torch.cat([a, a.new_zeros(r - k, a.shape[1])], 0), torch.cat([b, b.new_zeros(b.shape[0], r - k)], 1)
