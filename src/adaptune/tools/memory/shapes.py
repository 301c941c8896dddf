"""What the estimate reads off a model: its layers' sizes, where its stack of blocks is, and which
linear layer of a block reads which saved input."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...tuners.targets import in_out_features, module_kind

# activation functions written in Python in transformers: i-sized tensors autograd keeps
_ACT_SAVED = {"gelu_new": 4, "gelu_fast": 5, "gelu_python": 3, "gelu_accurate": 4,
              "quick_gelu": 2, "relu2": 2, "gelu_python_tanh": 4}
_ATTN_OUT_NAMES = {"o_proj", "out_proj", "c_proj", "dense", "wo", "o", "out", "proj", "o_dense"}


def linear_like(module: nn.Module) -> bool:
    """A float ``nn.Linear`` or GPT-2 ``Conv1D``: what LoRA wraps and QLoRA quantizes."""
    return module_kind(module) in ("linear", "conv1d")


def is_4bit(p: torch.Tensor) -> bool:
    return getattr(p, "quant_state", None) is not None or type(p).__name__ == "Params4bit"


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def meta_model_from_config(config: Any, trust_remote_code: bool = False) -> nn.Module:
    from ...hub import meta_model

    return meta_model(config, trust_remote_code=trust_remote_code)


def as_meta_model(config_or_model: Any, trust_remote_code: bool = False) -> nn.Module:
    if isinstance(config_or_model, (str, os.PathLike)):
        from ...hub import load_config

        config_or_model = load_config(config_or_model, trust_remote_code=trust_remote_code)
    if isinstance(config_or_model, nn.Module):
        model = config_or_model
        wrapped = hasattr(model, "get_base_model") or any(
            "lora_" in n or is_4bit(p) for n, p in model.named_parameters())
        if not wrapped and hasattr(model, "config"):
            return model
        config = getattr(model, "config", None)
        if config is None:
            raise ConfigError("memory estimate: the model has no .config to rebuild it from")
        return meta_model_from_config(config, trust_remote_code=trust_remote_code)
    if hasattr(config_or_model, "to_dict") and hasattr(config_or_model, "model_type"):
        return meta_model_from_config(config_or_model, trust_remote_code=trust_remote_code)
    raise ConfigError(f"memory estimate needs a transformers config, model, or model name, "
                      f"not {type(config_or_model).__name__}")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best = ("", nn.ModuleList(), -1)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > best[2]:
                best = (name, mod, n)
    if best[2] <= 0:
        raise ConfigError("memory estimate: could not find the model's stack of layers")
    return best[0], best[1]


@dataclass
class Shape:
    h: int
    q: int
    kv: int
    i: int
    heads: int
    head_dim: int
    layers: int
    vocab: int
    gated: bool
    act_saved: int
    eager: bool
    resid_dropout: float
    embd_dropout: float
    attn_dropout: float
    has_rotary: bool


def model_shape(model: nn.Module, block: nn.Module, out_emb: nn.Module | None, layers: int) -> Shape:
    cfg = model.config
    h = int(_cfg(cfg, "hidden_size", "n_embd", "d_model", "dim"))
    heads = int(_cfg(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads"))
    kv_heads = int(_cfg(cfg, "num_key_value_heads", "n_kv_heads", "num_kv_heads", default=heads))
    head_dim = int(_cfg(cfg, "head_dim", default=h // heads))
    mlp_in = [m for n, m in block.named_modules() if linear_like(m) and not is_attn(n)
              and in_out_features(m)[0] == h]
    mlp_out = [m for n, m in block.named_modules() if linear_like(m) and not is_attn(n)
               and in_out_features(m)[0] != h]
    if mlp_out:
        i = max(in_out_features(m)[0] for m in mlp_out)
    else:
        i = int(_cfg(cfg, "intermediate_size", "n_inner", "ffn_dim", "d_ff", default=4 * h))
    gated = bool(mlp_in) and sum(in_out_features(m)[1] for m in mlp_in) >= 2 * i
    act = str(_cfg(cfg, "hidden_act", "activation_function", "hidden_activation",
                   default="silu")).lower()
    vocab = in_out_features(out_emb)[1] if out_emb is not None and linear_like(out_emb) else 0
    if out_emb is not None and not vocab:
        vocab = int(getattr(out_emb, "out_features", 0) or _cfg(cfg, "vocab_size", default=0))
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    return Shape(
        h=h, q=heads * head_dim, kv=kv_heads * head_dim, i=i, heads=heads, head_dim=head_dim,
        layers=layers, vocab=vocab, gated=gated, act_saved=_ACT_SAVED.get(act, 1),
        eager=impl == "eager",
        resid_dropout=float(_cfg(cfg, "resid_pdrop", "hidden_dropout_prob", "hidden_dropout",
                                 "residual_dropout", default=0.0) or 0.0),
        embd_dropout=float(_cfg(cfg, "embd_pdrop", "embedding_dropout", default=0.0) or 0.0),
        attn_dropout=float(_cfg(cfg, "attn_pdrop", "attention_dropout",
                                "attention_probs_dropout_prob", default=0.0) or 0.0),
        has_rotary=any(n.endswith("rotary_emb") for n, _ in model.named_modules()),
    )


def is_attn(name: str) -> bool:
    return any("attn" in part.lower() or "attention" in part.lower() for part in name.split("."))


def group_of(name: str, module: nn.Module, h: int) -> str:
    """Which saved input a linear layer of a block reads: attn_in, attn_out, mlp_in or mlp_out."""
    parts = name.split(".")
    if is_attn(name):
        if parts[-1] in _ATTN_OUT_NAMES or "output" in parts:
            return "attn_out"
        return "attn_in"
    return "mlp_in" if in_out_features(module)[0] == h else "mlp_out"
