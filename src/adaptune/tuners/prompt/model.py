"""Prompt tuning, P-tuning and prefix tuning: the encoders, the input plumbing, peft's file format.

All three put trained vectors *in front of* the input of a frozen model:

- prompt tuning (Lester et al. 2021): ``num_virtual_tokens`` trained embeddings are prepended to
  the input embeddings;
- P-tuning (Liu et al. 2021): the same, but the virtual token embeddings are the output of a
  small MLP or bi-LSTM over trained input vectors (a reparameterisation that trains better);
- prefix tuning (Li & Liang 2021): trained keys and values are put in front of every attention
  layer's own, passed to the model as a pre-filled KV cache.

``PeftModel`` holds one :class:`PromptLearning` (a plain object, not a module) when its adapter
is a prompt-learning one and delegates forward / generate / adapters / files to it. The encoders
themselves live on the ``PeftModel`` as ``prompt_encoder = nn.ModuleDict()``, so that parameter
names read ``prompt_encoder.<adapter>.embedding.weight`` as in peft, and so that ``.to()``,
``state_dict()`` and optimizers see them.

File format (peft's): one tensor ``prompt_embeddings`` holding the encoder's *output*, shape
(num_virtual_tokens * num_transformer_submodules, token_dim), or for prefix tuning
(num_virtual_tokens, num_layers * 2 * token_dim); P-tuning's MLP/LSTM and prefix tuning's
projection are not saved. A loaded adapter therefore always becomes a plain embedding that holds
the saved output and is used as is, which reproduces the saved prompt exactly. Heads a task trains
in full (the classifier of SEQ_CLS) are saved as ``base_model.<path>.<param>``.

Where peft 0.21.2 under transformers 5 is wrong (its generate re-inserts the prompt at every
decoding step and ignores the prefix cache; its SEQ_CLS prefix tuning refuses every model),
adaptune does the right thing instead, checked in the tests against step-by-step decoding with
the full forward pass.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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
from ...errors import AdapterFileError, ConfigError
from ..lora.files import clean_path, disk_tensors, tensor_reader
from ..lora.layer import ModulesToSaveWrapper

# Heads a task trains in full and saves with the adapter (peft's names).
TASK_HEADS: dict[TaskType, tuple[str, ...]] = {TaskType.SEQ_CLS: ("classifier", "score")}
SUPPORTED_TASKS = (None, TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.SEQ_2_SEQ_LM, TaskType.FEATURE_EXTRACTION)
DISK_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."


# ---- config --------------------------------------------------------------------------------
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


# ---- encoders (parameter names are peft's) ---------------------------------------------------
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


# ---- the plumbing --------------------------------------------------------------------------
def _prepend(t: torch.Tensor, n: int, value: float | int) -> torch.Tensor:
    head = torch.full((t.shape[0], n), value, dtype=t.dtype, device=t.device)
    return torch.cat((head, t), dim=1)


def _batch_size(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ConfigError("pass input_ids or inputs_embeds")


class PromptLearning:
    """The prompt-learning adapters of one ``PeftModel``; see the module docstring."""

    def __init__(self, peft_model: nn.Module, config: PromptLearningConfig, adapter_name: str = "default") -> None:
        self.model: nn.Module = peft_model.base_model  # the transformers model itself
        self.encoders = nn.ModuleDict()
        peft_model.prompt_encoder = self.encoders  # registered on the PeftModel, peft's names
        self.peft_config: dict[str, PromptLearningConfig] = {}
        self.active_adapter = adapter_name
        self._disabled = False
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    # ---- adapters --------------------------------------------------------------------------
    @property
    def word_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def _device(self) -> torch.device:
        return self.word_embeddings.weight.device

    def add_adapter(self, adapter_name: str, config: PromptLearningConfig) -> None:
        """Add an adapter (not activated: call ``set_adapter``)."""
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} already exists")
        if not getattr(config, "is_prompt_learning", False):
            raise ConfigError(f"cannot add a {config.peft_type} adapter to a prompt-learning model")
        config = prepare_config(config, self.model)
        if self.peft_config:
            first = next(iter(self.peft_config.values()))
            if config.task_type != first.task_type:
                raise ConfigError(f"task_type {config.task_type} differs from the model's {first.task_type}")
        heads = [h for h in TASK_HEADS.get(config.task_type, ()) if self._find_heads(h)]
        if heads:
            config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *heads]))
        encoder = build_encoder(config, self.word_embeddings).to(self._device())
        self._wrap_heads(config.modules_to_save or [], adapter_name)
        self.encoders[adapter_name] = encoder
        self.peft_config[adapter_name] = config
        self._set_trainable()

    def _find_heads(self, name: str) -> list[tuple[str, nn.Module]]:
        """Modules called ``name`` (a wrapper counts; what is inside a wrapper does not)."""
        return [(n, m) for n, m in self.model.named_modules()
                if n and (n == name or n.endswith("." + name)) and ".modules_to_save." not in n
                and ".original_module" not in n]

    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def _wrap_heads(self, names: list[str], adapter_name: str) -> None:
        if not names:
            return
        wrapped = {n for n, _ in self._wrappers()}
        found = False
        for name in names:
            for path, module in self._find_heads(name):
                if isinstance(module, ModulesToSaveWrapper) or any(path.startswith(w + ".") for w in wrapped):
                    continue
                parent_name, _, child = path.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, ModulesToSaveWrapper(module))
                wrapped.add(path)
        for path, wrapper in self._wrappers():
            if any(path == n or path.endswith("." + n) for n in names):
                wrapper.add(adapter_name)
                found = True
        if not found:
            raise ConfigError(f"modules_to_save={names} matches no module of the model")

    def _set_trainable(self) -> None:
        """Only the active adapter trains (its encoder and heads), unless it is in inference mode."""
        for encoder in self.encoders.values():
            encoder.requires_grad_(False)
        for _, wrapper in self._wrappers():
            wrapper.modules_to_save.requires_grad_(False)
        config = self.peft_config.get(self.active_adapter)
        if config is None or config.inference_mode:
            return
        self.encoders[self.active_adapter].requires_grad_(True)
        for _, wrapper in self._wrappers():
            if self.active_adapter in wrapper.modules_to_save:
                wrapper.modules_to_save[self.active_adapter].requires_grad_(True)

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {list(self.peft_config)}")
        self.active_adapter = adapter_name
        for _, wrapper in self._wrappers():
            wrapper.set_active([adapter_name])
        self._set_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {list(self.peft_config)}")
        if len(self.peft_config) == 1:
            raise ConfigError(f"{adapter_name!r} is the only adapter; use get_base_model() for the bare model")
        del self.peft_config[adapter_name]
        del self.encoders[adapter_name]
        for _, wrapper in self._wrappers():
            wrapper.delete(adapter_name)
        if self.active_adapter == adapter_name:
            self.set_adapter(next(iter(self.peft_config)))

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside the block forward and generate are the bare base model's (heads included)."""
        was = self._disabled
        wrappers = [w for _, w in self._wrappers()]
        states = [w.disabled for w in wrappers]
        self._disabled = True
        for w in wrappers:
            w.disabled = True
        try:
            yield
        finally:
            self._disabled = was
            for w, s in zip(wrappers, states):
                w.disabled = s

    # ---- what goes in front of the input ------------------------------------------------------
    def prompt_output(self, adapter_name: str | None = None) -> torch.Tensor:
        """The encoder output: (total virtual tokens, token_dim), or the flat prefix rows."""
        return self.encoders[adapter_name or self.active_adapter]()

    def prompts(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The virtual token embeddings for the (encoder) input: (batch, num_virtual_tokens, dim)."""
        config = self.peft_config[self.active_adapter]
        out = self.prompt_output()[: config.num_virtual_tokens]
        return out.to(dtype).unsqueeze(0).expand(batch_size, -1, -1)

    def prefix_cache(self, batch_size: int):
        """The prefix as a transformers Cache: DynamicCache, or EncoderDecoderCache for encoder-decoders.

        The reshaping is peft's, so that files move both ways. For encoder-decoders peft
        duplicates the rows and splits them four per layer, then keeps only each group's first
        two (decoder self-attention; the cross-attention part is dropped): decoder layer ``i``
        gets the keys/values saved for layer ``2*i mod num_layers``. adaptune reads the rows the
        same way, or a peft-trained prefix would not give peft's outputs.
        """
        from transformers import DynamicCache, EncoderDecoderCache

        config = self.peft_config[self.active_adapter]
        nvt, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
        subs = config.num_transformer_submodules
        out = self.prompt_output().to(self.model.dtype)
        kv = out.unsqueeze(0).expand(batch_size, -1, -1).reshape(
            batch_size, nvt, layers * 2, heads, config.token_dim // heads)
        if subs == 2:
            kv = torch.cat((kv, kv), dim=2)
        groups = kv.permute(2, 0, 3, 1, 4).split(subs * 2)  # per layer: (2*subs, batch, heads, nvt, head_dim)
        self_attention = DynamicCache([(g[0], g[1]) for g in groups])
        if subs == 2 or self._is_encoder_decoder():
            return EncoderDecoderCache(self_attention, DynamicCache())
        return self_attention

    def _is_encoder_decoder(self) -> bool:
        return bool(getattr(self.model.config, "is_encoder_decoder", False))

    def _cache_kwarg(self) -> str:
        """transformers 5 calls the KV cache argument ``cache``; 4.x ``past_key_values``."""
        for fn in (self.model.forward, getattr(self.model, "base_model", self.model).forward):
            if "cache" in inspect.signature(fn).parameters:
                return "cache"
        return "past_key_values"

    def _check_no_cache(self, kwargs: dict[str, Any]) -> None:
        for key in ("cache", "past_key_values"):
            if kwargs.get(key) is not None:
                raise ConfigError(f"a prompt-learning model builds its own {key}; use generate() for decoding")
            kwargs.pop(key, None)

    def _check_no_checkpointing(self) -> None:
        if self.model.training and any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()):
            raise ConfigError("prefix tuning does not work with gradient checkpointing (the checkpointed layers "
                              "drop the KV cache that carries the prefix); turn one of them off")

    # ---- forward ----------------------------------------------------------------------------
    def _bind(self, fn, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        if not args:
            return kwargs
        names = [n for n, p in inspect.signature(fn).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for name, value in zip(names, args):
            if kwargs.get(name) is not None:
                raise TypeError(f"got multiple values for argument {name!r}")
            kwargs[name] = value
        return kwargs

    def forward(self, *args: Any, **kwargs: Any):
        kwargs = self._bind(self.model.forward, args, kwargs)
        kwargs.pop("task_ids", None)
        if self._disabled:
            return self.model(**kwargs)
        self._check_no_cache(kwargs)
        config = self.peft_config[self.active_adapter]
        if config.task_type == TaskType.SEQ_2_SEQ_LM:
            return self._forward_seq2seq(config, kwargs)
        nvt = config.num_virtual_tokens
        input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        batch = _batch_size(input_ids, inputs_embeds)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = _prepend(kwargs["attention_mask"], nvt, 1)
        if config.peft_type == PeftType.PREFIX_TUNING:
            self._check_no_checkpointing()
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + nvt
            kwargs[self._cache_kwarg()] = self.prefix_cache(batch)
            return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        inputs_embeds = torch.cat((self.prompts(batch, inputs_embeds.dtype), inputs_embeds), dim=1)
        if kwargs.get("position_ids") is not None:
            # the virtual tokens take positions 0..nvt-1, the real ones follow them
            pos = kwargs["position_ids"]
            head = torch.arange(nvt, dtype=pos.dtype, device=pos.device).expand(*pos.shape[:-1], nvt)
            kwargs["position_ids"] = torch.cat((head, pos + nvt), dim=-1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _prepend(kwargs["token_type_ids"], nvt, 0)
        if config.task_type == TaskType.CAUSAL_LM and kwargs.get("labels") is not None:
            kwargs["labels"] = _prepend(kwargs["labels"], nvt, -100)
        return self.model(inputs_embeds=inputs_embeds, **kwargs)

    def _forward_seq2seq(self, config: PromptLearningConfig, kwargs: dict[str, Any]):
        nvt = config.num_virtual_tokens
        input_ids, inputs_embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        batch = _batch_size(input_ids, inputs_embeds)
        if config.peft_type == PeftType.PREFIX_TUNING:
            # the prefix goes into the decoder's self-attention; the encoder input is unchanged
            self._check_no_checkpointing()
            if kwargs.get("decoder_attention_mask") is not None:
                kwargs["decoder_attention_mask"] = _prepend(kwargs["decoder_attention_mask"], nvt, 1)
            kwargs[self._cache_kwarg()] = self.prefix_cache(batch)
            return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        # prompt tuning / P-tuning: the virtual tokens go in front of the encoder input
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        inputs_embeds = torch.cat((self.prompts(batch, inputs_embeds.dtype), inputs_embeds), dim=1)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = _prepend(kwargs["attention_mask"], nvt, 1)
        return self.model(inputs_embeds=inputs_embeds, **kwargs)

    # ---- generate ---------------------------------------------------------------------------
    def _expand_size(self, kwargs: dict[str, Any]) -> int:
        """How many rows generate makes of each input row (beams / returned sequences)."""
        gen = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(gen, "num_beams", 1) or 1
        returned = kwargs.get("num_return_sequences") or getattr(gen, "num_return_sequences", 1) or 1
        return max(beams, returned)

    def generate(self, *args: Any, **kwargs: Any):
        if args:
            if len(args) > 1 or kwargs.get("input_ids") is not None:
                raise TypeError("pass generate's arguments by name (input_ids=..., attention_mask=...)")
            kwargs["input_ids"] = args[0]
        kwargs.pop("task_ids", None)
        if self._disabled:
            return self.model.generate(**kwargs)
        self._check_no_cache(kwargs)
        config = self.peft_config[self.active_adapter]
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ConfigError("generate() with a prompt-learning adapter needs input_ids")
        batch, length = input_ids.shape
        mask = kwargs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones_like(input_ids)
        nvt = config.num_virtual_tokens
        if self._is_encoder_decoder():
            if config.peft_type == PeftType.PREFIX_TUNING:
                cache = self.prefix_cache(batch * self._expand_size(kwargs))
                return self.model.generate(input_ids=input_ids, attention_mask=mask,
                                           **{self._cache_kwarg(): cache}, **kwargs)
            embeds = self.word_embeddings(input_ids)
            embeds = torch.cat((self.prompts(batch, embeds.dtype), embeds), dim=1)
            return self.model.generate(inputs_embeds=embeds, attention_mask=_prepend(mask, nvt, 1), **kwargs)
        # decoder-only: the returned sequences start with input_ids, as without an adapter.
        # generate's max_length counts the user's tokens only; the virtual ones are extra.
        if kwargs.get("max_new_tokens") is None and kwargs.get("max_length") is not None:
            kwargs["max_new_tokens"] = max(kwargs.pop("max_length") - length, 0)
        mask = _prepend(mask, nvt, 1)  # position ids (from the mask) count the virtual tokens too
        if config.peft_type == PeftType.PREFIX_TUNING:
            kwargs["use_cache"] = True  # the prefix lives in the cache
            cache = self.prefix_cache(batch * self._expand_size(kwargs))
            return self.model.generate(input_ids=input_ids, attention_mask=mask,
                                       **{self._cache_kwarg(): cache}, **kwargs)
        embeds = self.word_embeddings(input_ids)
        embeds = torch.cat((self.prompts(batch, embeds.dtype), embeds), dim=1)
        return self.model.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask, **kwargs)

    # ---- files ------------------------------------------------------------------------------
    def state_dict_for_disk(self, adapter_name: str,
                            state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """peft's tensors: ``prompt_embeddings`` (the encoder output) and any trained heads, from
        the modules or from ``state_dict``, the PeftModel's full one (``checkpoint.tensor_reader``)."""
        read = tensor_reader(state_dict)
        encoder = self.encoders[adapter_name]
        weights = {pname: read(f"prompt_encoder.{adapter_name}.{pname}", p)
                   for pname, p in encoder.named_parameters()}
        with torch.no_grad():
            out = {DISK_KEY: torch.func.functional_call(encoder, weights, ())}
        for path, wrapper in self._wrappers():
            path = clean_path(path)
            if adapter_name in wrapper.modules_to_save:
                for pname, p in wrapper.modules_to_save[adapter_name].named_parameters():
                    pname = clean_path(pname)
                    out[f"{HEAD_PREFIX}{path}.{pname}"] = read(
                        f"{HEAD_PREFIX}{path}.modules_to_save.{adapter_name}.{pname}", p)
        return disk_tensors(out)

    def load_state_dict_from_disk(self, adapter_name: str, tensors: dict[str, torch.Tensor], source: str,
                                  trainable: bool | None = None) -> None:
        """Load peft's tensors into ``adapter_name``; the prompt becomes a plain embedding of them.

        ``trainable`` (default: the config's ``not inference_mode``) makes the loaded rows train.
        P-tuning's MLP/LSTM and prefix tuning's projection are not in the file, so training goes on
        from the saved rows directly (said once).
        """
        config = self.peft_config[adapter_name]
        if DISK_KEY not in tensors:
            raise AdapterFileError(f"{source}: no {DISK_KEY!r} tensor (is this a {config.peft_type.value} "
                                   f"adapter? keys: {sorted(tensors)[:5]})")
        value = tensors[DISK_KEY]
        expected = output_shape(config)
        if tuple(value.shape) != expected:
            raise AdapterFileError(f"{source}: {DISK_KEY} has shape {tuple(value.shape)} but this base model needs "
                                   f"{expected} (was the adapter made for another base model?)")
        heads = {f"{HEAD_PREFIX}{path}.{pname}": p for path, w in self._wrappers()
                 if adapter_name in w.modules_to_save
                 for pname, p in w.modules_to_save[adapter_name].named_parameters()}
        unexpected = sorted(set(tensors) - set(heads) - {DISK_KEY})
        if unexpected:
            raise AdapterFileError(f"{source}: {len(unexpected)} tensors belong to no part of this adapter, e.g. "
                                   f"{unexpected[0]}")
        missing = sorted(set(heads) - set(tensors))
        if missing:
            raise AdapterFileError(f"{source}: the trained head tensor {missing[0]} is missing")
        for key, t in tensors.items():
            if not t.dtype.is_floating_point:
                raise AdapterFileError(f"{source}: tensor {key} has dtype {t.dtype}, expected a float dtype")
            if not torch.isfinite(t).all():
                raise AdapterFileError(f"{source}: tensor {key} holds NaN or inf values")
        if trainable is None:
            trainable = not config.inference_mode
        reparameterised = isinstance(config, PromptEncoderConfig) or getattr(config, "prefix_projection", False)
        if trainable and reparameterised:
            warnings.warn(f"{source}: the file holds the {config.peft_type.value} encoder's output only (as in "
                          f"peft); training continues on those rows directly", stacklevel=3)
        encoder = PromptEmbedding(*expected).to(self._device())
        with torch.no_grad():
            encoder.embedding.weight.copy_(value.to(encoder.embedding.weight.dtype))
            for key, p in heads.items():
                p.copy_(tensors[key].to(p.dtype))
        self.encoders[adapter_name] = encoder
        config.inference_mode = not trainable
        self._set_trainable()
