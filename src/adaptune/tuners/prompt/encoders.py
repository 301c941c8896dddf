"""The prompt-learning encoders and the config fields they read off the model.

All three put trained vectors *in front of* the input of a frozen model:

- prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` trained embeddings are prepended to
  the input embeddings;
- P-tuning (Liu et al. 2021): the same, but the virtual token embeddings are the output of a
  small MLP or bi-LSTM over trained input vectors (a reparameterisation that trains better);
- prefix tuning (Li & Liang 2021): trained keys and values are put in front of every attention
  layer's own, passed to the model as a pre-filled KV cache.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
from torch import nn

from ...config import (
    PeftType,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningConfig,
    PromptTuningConfig,
    TaskType,
)
from ...errors import ConfigError

SUPPORTED_TASKS = (None, TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.SEQ_2_SEQ_LM, TaskType.FEATURE_EXTRACTION)

__all__ = ["PrefixEncoder", "PromptEmbedding", "PromptEncoder", "build_encoder", "output_shape", "prefix_key_values",
           "prepare_config",
           "total_virtual_tokens"]


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config.to_dict()


def _first(config, data: dict[str, Any], names: tuple[str, ...], what: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is None:
            value = data.get(name)
        if value is not None:
            return int(value)
    raise ConfigError(f"cannot tell {what} from the model config; set it in the prompt-learning config")


def prepare_config(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    """A copy of ``config`` with the model-derived fields filled in as peft fills them."""
    if not isinstance(config, PromptLearningConfig):
        raise ConfigError(f"expected a prompt-learning config, got {type(config).__name__}")
    if config.task_type not in SUPPORTED_TASKS:
        raise ConfigError(f"prompt learning supports task_type CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM and "
                          f"FEATURE_EXTRACTION in adaptune, not {config.task_type.value}")
    config = _fill(dataclasses.replace(config), model)
    _check_fits(config, model)
    return config


def _fill(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    model_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    data = _config_dict(model)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    if config.num_layers is None:
        config.num_layers = _first(model_config, data, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers")
    if config.token_dim is None:
        config.token_dim = _first(model_config, data, ("hidden_size", "n_embd", "d_model"), "token_dim")
    if config.num_attention_heads is None:
        config.num_attention_heads = _first(
            model_config, data, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
            "num_attention_heads")
    if isinstance(config, PrefixTuningConfig) and "num_key_value_heads" in data:
        # grouped-query attention: the cached keys/values have num_key_value_heads heads
        head_dim = data.get("head_dim") or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * data["num_key_value_heads"]
        config.num_attention_heads = data["num_key_value_heads"]
    if getattr(config, "encoder_hidden_size", 0) is None:
        config.encoder_hidden_size = config.token_dim
    if isinstance(config, PrefixTuningConfig) and config.token_dim % config.num_attention_heads:
        raise ConfigError(f"token_dim={config.token_dim} is not a multiple of "
                          f"num_attention_heads={config.num_attention_heads}")
    return config


def _check_fits(config: PromptLearningConfig, model: nn.Module) -> None:
    """Fields given in the config (e.g. read from a file) must fit the model, or forward fails deep inside."""
    fresh = _fill(dataclasses.replace(config, token_dim=None, num_layers=None, num_attention_heads=None), model)
    names = ("token_dim",) if not isinstance(config, PrefixTuningConfig) else ("token_dim", "num_layers",
                                                                              "num_attention_heads")
    for name in names:
        if getattr(fresh, name) != getattr(config, name):
            raise ConfigError(f"the adapter config says {name}={getattr(config, name)} but this "
                              f"{type(model).__name__} has {getattr(fresh, name)} (was the adapter made for "
                              f"another base model?)")


def total_virtual_tokens(config: PromptLearningConfig) -> int:
    if config.peft_type == PeftType.PREFIX_TUNING:
        return config.num_virtual_tokens
    return config.num_virtual_tokens * config.num_transformer_submodules


def output_shape(config: PromptLearningConfig) -> tuple[int, int]:
    """Shape of the encoder output, which is also the on-disk ``prompt_embeddings`` shape."""
    if config.peft_type == PeftType.PREFIX_TUNING:
        return config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
    return total_virtual_tokens(config), config.token_dim


class PromptEmbedding(nn.Module):
    """Trained rows used as they are: prompt tuning, and every adapter loaded from a file."""

    def __init__(self, num_rows: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_rows, dim)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(nn.Module):
    """P-tuning: the virtual token embeddings are an MLP (or bi-LSTM + MLP) of trained vectors."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(total_virtual_tokens(config), dim)
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(hidden * 2, hidden * 2), nn.ReLU(), nn.Linear(hidden * 2, dim))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn("encoder_num_layers is ignored for the MLP encoder (it has 2 hidden layers, as "
                              "in peft)", stacklevel=4)
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)
        if self.encoder_type == "LSTM":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]


class PrefixEncoder(nn.Module):
    """Prefix tuning: per-layer keys and values, optionally through a 2-layer tanh MLP."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        self.prefix_projection = config.prefix_projection
        width = config.num_layers * 2 * config.token_dim
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def forward(self) -> torch.Tensor:
        if self.prefix_projection:
            return self.transform(self.embedding.weight)
        return self.embedding.weight


def _text_init_rows(config: PromptTuningConfig, word_embeddings: nn.Module, rows: int) -> torch.Tensor:
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, word_embeddings.num_embeddings, (rows,))
    else:
        if not config.tokenizer_name_or_path:
            raise ConfigError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path")
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # a config file must not be able to run code
        try:
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tokenizer_name_or_path={config.tokenizer_name_or_path!r}: cannot load a "
                              f"tokenizer ({type(exc).__name__})") from None
        token_ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
        if not token_ids:
            raise ConfigError("prompt_tuning_init_text gives no tokens")
        token_ids = (token_ids * math.ceil(rows / len(token_ids)))[:rows]
        ids = torch.tensor(token_ids, dtype=torch.long)
    weight = word_embeddings.weight
    with torch.no_grad():
        return word_embeddings(ids.to(weight.device)).detach().clone().float()


def build_encoder(config: PromptLearningConfig, word_embeddings: nn.Module) -> nn.Module:
    """A new encoder; in inference mode (peft's rule) just the embedding that holds the output."""
    rows, dim = output_shape(config)
    if config.inference_mode:
        return PromptEmbedding(rows, dim)
    if isinstance(config, PromptEncoderConfig):
        return PromptEncoder(config)
    if isinstance(config, PrefixTuningConfig):
        return PrefixEncoder(config)
    encoder = PromptEmbedding(rows, dim)
    if config.prompt_tuning_init in ("TEXT", "SAMPLE_VOCAB"):
        with torch.no_grad():
            encoder.embedding.weight.copy_(_text_init_rows(config, word_embeddings, rows))
    return encoder


def prefix_key_values(rows: torch.Tensor, config: PrefixTuningConfig, batch_size: int
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A prefix's rows (the encoder output, peft's ``prompt_embeddings``) as each decoder layer's
    (keys, values), each (batch, heads, num_virtual_tokens, head_dim).

    The layout is peft's, so that files move both ways. For encoder-decoders peft duplicates the
    rows and splits them four per layer, then keeps only each group's first two (decoder
    self-attention): decoder layer ``i`` gets the keys/values saved for layer ``2*i mod num_layers``.
    """
    nvt, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    subs = config.num_transformer_submodules
    kv = rows.unsqueeze(0).expand(batch_size, -1, -1).reshape(
        batch_size, nvt, layers * 2, heads, config.token_dim // heads)
    if subs == 2:
        kv = torch.cat((kv, kv), dim=2)
    groups = kv.permute(2, 0, 3, 1, 4).split(subs * 2)  # per layer: (2*subs, batch, heads, nvt, head_dim)
    return [(g[0], g[1]) for g in groups]
