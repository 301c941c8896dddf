"""PromptLearning: the tuner of prompt tuning, P-tuning and prefix tuning, which put trained vectors
in front of a frozen model's input (virtual token embeddings, or keys and values given to the
model as a pre-filled KV cache; the three encoders are in :mod:`.encoders`).

``PeftModel`` holds one :class:`PromptLearning` (a plain object, not a module) when its adapter
is a prompt-learning one and delegates forward / generate / adapters / files to it. The encoders
themselves live on the ``PeftModel`` as ``prompt_encoder = nn.ModuleDict()``, so that parameter
names read ``prompt_encoder.<adapter>.embedding.weight`` as in peft, and so that ``.to()``,
``state_dict()`` and optimizers see them.

Where peft 0.21.2 under transformers 5 is wrong (its generate re-inserts the prompt at every
decoding step and ignores the prefix cache; its SEQ_CLS prefix tuning refuses every model),
adaptune does the right thing instead, checked in the tests against step-by-step decoding with
the full forward pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ...config import PeftType, PromptLearningConfig, TaskType
from ...errors import ConfigError
from ..base import heads_to_save, save_wrappers, wrap_modules_to_save
from . import files
from .encoders import build_encoder, prefix_key_values, prepare_config

__all__ = ["PromptLearning"]


def _no_row_adapters(adapter_names: Sequence[str] | None) -> None:
    if adapter_names is not None:
        raise ConfigError("adapter_names (a different adapter per batch row) is for LoRA adapters; a "
                          "prompt-learning model runs its active adapter on every row")


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

    # ---- the tuner interface --------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def base_transformer(self) -> nn.Module:
        return self.model

    def adapter_state_for_disk(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor] | None = None
                               ) -> tuple[dict[str, torch.Tensor], PromptLearningConfig]:
        return files.state_dict_for_disk(self, adapter_name, state_dict), self.peft_config[adapter_name]

    def load_adapter_state(self, adapter_name: str, tensors: Mapping[str, torch.Tensor], source: str,
                           trainable: bool | None = None) -> None:
        files.load_state_dict_from_disk(self, adapter_name, dict(tensors), source, trainable=trainable)

    @staticmethod
    def prepare_loaded_config(config: PromptLearningConfig, is_trainable: bool) -> PromptLearningConfig:
        """A loaded adapter is built in inference mode (no encoder network, no text init: the file
        holds the encoder's output) and made trainable, if asked, once its rows are loaded."""
        config.inference_mode = True
        return config

    # ---- adapters --------------------------------------------------------------------------
    @property
    def word_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def device(self) -> torch.device:
        return self.word_embeddings.weight.device

    def add_adapter(self, adapter_name: str, config: PromptLearningConfig, autocast_adapter_dtype: bool = True) -> None:
        """Add an adapter (not activated: call ``set_adapter``). Any prompt-learning kind may join."""
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} already exists")
        if not getattr(config, "is_prompt_learning", False):
            raise ConfigError(f"cannot add a {config.peft_type} adapter to a prompt-learning model")
        config = prepare_config(config, self.model)
        if self.peft_config:
            first = next(iter(self.peft_config.values()))
            if config.task_type != first.task_type:
                raise ConfigError(f"task_type {config.task_type} differs from the model's {first.task_type}")
        heads = heads_to_save(self.model, config)
        if heads != list(config.modules_to_save or []):
            config.modules_to_save = heads
        encoder = build_encoder(config, self.word_embeddings).to(self.device)
        wrap_modules_to_save(self.model, config.modules_to_save or [], adapter_name)
        self.encoders[adapter_name] = encoder
        self.peft_config[adapter_name] = config
        self.refresh_trainable()

    def refresh_trainable(self) -> None:
        """Only the active adapter trains (its encoder and heads), unless it is in inference mode."""
        for encoder in self.encoders.values():
            encoder.requires_grad_(False)
        for _, wrapper in save_wrappers(self.model):
            wrapper.modules_to_save.requires_grad_(False)
        config = self.peft_config.get(self.active_adapter)
        if config is None or config.inference_mode:
            return
        self.encoders[self.active_adapter].requires_grad_(True)
        for _, wrapper in save_wrappers(self.model):
            if self.active_adapter in wrapper.modules_to_save:
                wrapper.modules_to_save[self.active_adapter].requires_grad_(True)

    def set_adapter(self, adapter_name: str, inference_mode: bool | None = None) -> None:
        """Activate one adapter; it trains unless its config is in inference mode (``inference_mode``
        is not used: a loaded prompt adapter is made trainable with ``is_trainable`` instead)."""
        if not isinstance(adapter_name, str):
            raise ConfigError("a prompt-learning model has one active adapter at a time; pass its name")
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {list(self.peft_config)}")
        self.active_adapter = adapter_name
        for _, wrapper in save_wrappers(self.model):
            wrapper.set_active([adapter_name])
        self.refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {list(self.peft_config)}")
        if len(self.peft_config) == 1:
            raise ConfigError(f"{adapter_name!r} is the only adapter; use get_base_model() for the bare model")
        del self.peft_config[adapter_name]
        del self.encoders[adapter_name]
        for _, wrapper in save_wrappers(self.model):
            wrapper.delete(adapter_name)
        if self.active_adapter == adapter_name:
            self.set_adapter(next(iter(self.peft_config)))

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside the block forward and generate are the bare base model's (heads included)."""
        was = self._disabled
        wrappers = [w for _, w in save_wrappers(self.model)]
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
        rows = self.prompt_output().to(self.model.dtype)
        self_attention = DynamicCache(prefix_key_values(rows, config, batch_size))
        if config.num_transformer_submodules == 2 or self._is_encoder_decoder():
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

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any):
        _no_row_adapters(adapter_names)
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

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any):
        _no_row_adapters(adapter_names)
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
