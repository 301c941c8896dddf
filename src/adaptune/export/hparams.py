"""A transformers config as the ``<arch>.*`` hyper-parameter keys llama.cpp reads.

Only for bases that did not come from a GGUF file (a GGUF base keeps its own keys). The keys and
their sources follow llama.cpp's ``convert_hf_to_gguf.py`` for the architectures in ``names.ARCHS``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError
from .names import Arch, head_counts


def rope_settings(config: Any) -> tuple[float, dict]:
    """(rope theta, the scaling dict or {}) from a transformers 4 or 5 config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    kind = (params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default").lower()
    merged = {**scaling, **params, "rope_type": kind}
    return float(theta), ({} if kind == "default" else merged)


def head_dim(config: Any) -> int:
    n_head, _ = head_counts(config)
    return int(getattr(config, "head_dim", None) or config.hidden_size // n_head)


def add_hparams(writer, arch: Arch, config: Any) -> None:
    """Add the architecture's hyper-parameters to a ``gguf.GGUFWriter``."""
    if arch.gguf_arch == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_vocab_size(config.vocab_size)
        return
    n_head, n_kv = head_counts(config)
    dim = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    theta, scaling = rope_settings(config)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(dim)
    if dim != config.hidden_size // n_head:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if scaling.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling and scaling.get("rope_type") != "llama3":
        raise ConfigError(f"rope scaling {scaling.get('rope_type')!r} is not written by adaptune's GGUF export "
                          f"(default, linear and llama3 are); export from the model's own GGUF file instead")


def extra_tensors(arch: Arch, config: Any) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp needs that the checkpoint lacks: Llama 3.1's ``rope_freqs`` (per-frequency
    divisors for its long-context rope), computed as convert_hf_to_gguf.py computes them."""
    theta, scaling = rope_settings(config)
    if arch.gguf_arch != "llama" or scaling.get("rope_type") != "llama3":
        return {}
    dim = head_dim(config)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)}
