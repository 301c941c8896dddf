"""LoraModel: the LoRA tuner. It puts LoRA layers into a transformers model and manages them as
named adapters.

It is what ``PeftModel.base_model`` holds for LoRA, as in peft, so that parameter names read
``base_model.model.<module path>.lora_A.<adapter>.weight``. It implements
:class:`adaptune.tuners.base.Tuner`, plus what only LoRA can do: merge into the base weights,
unload, and combine adapters (:mod:`.combine`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ...config import LoraConfig, PeftConfig
from ...errors import ConfigError
from ...quant.kinds import QUANT_KINDS
from ..base import ModulesToSaveWrapper, heads_to_save, save_wrappers, set_parent, wrap_modules_to_save
from ..targets import DEFAULT_TARGETS, Target, model_type, module_kind, pattern_key, resolve_targets
from . import files
from .combine import add_weighted_adapter
from .layer import AdapterSpec, LoraLayer
from .mixed import BASE_ROW, row_adapters

__all__ = ["LoraModel"]


class LoraModel(nn.Module):
    """The wrapped transformers model (``self.model``) with LoRA layers injected."""

    # transformers' flag for "trainable adapters are attached": its Trainer refuses to fine-tune a
    # quantized model (QLoRA) without it unless peft's own PeftModel class is used. PeftModel
    # passes unknown attributes through to this object, so trainer.validate sees it there.
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str = adapter_name
        self.active_adapters: list[str] = [adapter_name]
        self.inject_adapter(config, adapter_name, autocast_adapter_dtype)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- the tuner interface --------------------------------------------------------------
    def base_transformer(self) -> nn.Module:
        return self.model

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any):
        """The model's forward; ``adapter_names`` gives each batch row its adapter (``__base__``: none)."""
        with row_adapters(self._layers(), adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any):
        with row_adapters(self._layers(), adapter_names):
            return self.model.generate(*args, **kwargs)

    def add_adapter(self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool = True) -> None:
        """Add an adapter without activating it (the active ones stay active)."""
        if not isinstance(config, LoraConfig):
            raise ConfigError(f"cannot add a {config.peft_type} adapter to a LORA model")
        active = list(self.active_adapters)
        self.inject_adapter(config, adapter_name, autocast_adapter_dtype)
        self.set_adapter(active[0] if len(active) == 1 else active)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside the block the model is exactly the base model; merges are restored after."""
        layers = self._layers()
        merged = {id(layer): list(layer.merged_adapters) for layer in layers}
        for layer in layers:
            layer.unmerge()
        self.set_disabled(True)
        try:
            yield
        finally:
            self.set_disabled(False)
            for layer in layers:
                layer.merge(merged[id(layer)])

    def adapter_state_for_disk(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor] | None = None
                               ) -> tuple[dict[str, torch.Tensor], LoraConfig]:
        return files.lora_state_dict(self, adapter_name, state_dict), files.config_for_disk(self, adapter_name)

    def load_adapter_state(self, adapter_name: str, tensors: Mapping[str, torch.Tensor], source: str,
                           trainable: bool | None = None) -> None:
        """LoRA keeps each parameter's trainability as it is: ``trainable`` is not needed."""
        files.load_lora_state_dict(self, adapter_name, dict(tensors), source)

    @staticmethod
    def prepare_loaded_config(config: LoraConfig, is_trainable: bool) -> LoraConfig:
        """A config read from a file, ready to build the adapter it describes."""
        config = files.config_from_disk(config)
        config.inference_mode = not is_trainable
        return config

    # ---- discovery -----------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                yield name, module

    def _layers(self) -> list[LoraLayer]:
        return [layer for _, layer in self.lora_layers()]

    def save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        return save_wrappers(self.model)

    # ---- injection -----------------------------------------------------------------------
    def inject_adapter(self, config: LoraConfig, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Wrap every target of ``config`` (raising before any change if something is wrong).
        ``autocast_adapter_dtype``: adapter weights in fp32 on an fp16/bf16 base, as in peft."""
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} already exists")
        if adapter_name == BASE_ROW:
            raise ConfigError("'__base__' is reserved for 'no adapter' in mixed batches")
        save_names = heads_to_save(self.model, config)
        if save_names != list(config.modules_to_save or []):
            config = replace(config, modules_to_save=save_names)
        if config.target_modules is None and model_type(self.model) in DEFAULT_TARGETS:
            # written out as peft does, so a reader needs no per-architecture table of its own
            config = replace(config, target_modules=list(DEFAULT_TARGETS[model_type(self.model)]))
        targets = resolve_targets(
            self.model, config.target_modules, config.exclude_modules, config.layers_to_transform,
            config.layers_pattern, skip=save_names,
        )
        specs = [(t, self._spec_for(t, config)) for t in targets]  # validate all before touching
        self._check_loftq_targets(config, targets)
        self._note_fan_in_fan_out(config, targets)
        for target, spec in specs:
            module = self.model.get_submodule(target.name)
            if not isinstance(module, LoraLayer):
                module = LoraLayer(module)
                set_parent(self.model, target.name, module)
            module.add(adapter_name, spec, upcast=autocast_adapter_dtype)
        wrap_modules_to_save(self.model, save_names, adapter_name)
        self.peft_config[adapter_name] = config
        self.refresh_trainable()
        if any(layer.kind in QUANT_KINDS for _, layer in self.lora_layers()):
            from ...quant.kbit import keep_trainable_layout

            keep_trainable_layout(self.model)  # see quant/kbit.py: bitsandbytes' CPU re-packing

    def _note_fan_in_fan_out(self, config: LoraConfig, targets: Sequence[Target]) -> None:
        kinds = {type(self.model.get_submodule(t.name)).__name__ for t in targets}
        if "Conv1D" in kinds and not config.fan_in_fan_out:
            warnings.warn("target layers are GPT-2 style Conv1D (weights stored as in x out); "
                          "setting fan_in_fan_out=True", stacklevel=3)
            config.fan_in_fan_out = True

    def _spec_for(self, target: Target, config: LoraConfig) -> AdapterSpec:
        r_key = pattern_key(config.rank_pattern, target.name)
        a_key = pattern_key(config.alpha_pattern, target.name)
        r = config.rank_pattern[r_key] if r_key else config.r
        alpha = config.alpha_pattern[a_key] if a_key else config.lora_alpha
        if config.init_lora_weights not in (True, False, "gaussian", "loftq"):
            raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} cannot start a new adapter in "
                              "adaptune yet (adapter files that name it still load); use True, False, "
                              "'gaussian' or 'loftq'")
        loftq = config.loftq
        bits = 4
        if loftq is not None:
            b_key = pattern_key(loftq.loftq_bits_pattern, target.name)
            bits = loftq.loftq_bits_pattern[b_key] if b_key else loftq.loftq_bits
        return AdapterSpec(r=r, alpha=alpha, dropout=config.lora_dropout, use_rslora=config.use_rslora,
                           use_dora=config.use_dora, init=config.init_lora_weights, slices=target.slices,
                           loftq_bits=bits, loftq_iter=loftq.loftq_iter if loftq else 1)

    def _check_loftq_targets(self, config: LoraConfig, targets: Sequence[Target]) -> None:
        """LoftQ needs float nn.Linear targets; say what happens to the others before changing anything."""
        if config.init_lora_weights != "loftq":
            return
        kinds = {t.name: module_kind(self.model.get_submodule(t.name)) for t in targets}
        other = sorted({k for k in kinds.values() if k != "linear" and k not in QUANT_KINDS})
        if other:
            raise ConfigError(f"LoftQ works on nn.Linear targets; these targets are {', '.join(other)} layers")
        quantized = [n for n, k in kinds.items() if k != "linear"]
        if quantized:
            loftq = config.loftq
            warnings.warn(
                f"{len(quantized)} of {len(kinds)} LoftQ target layers are already quantized: LoftQ needs their "
                f"full-precision weights, so they start as plain LoRA (load the model without "
                f"quantization_config and LoftQ quantizes it itself)"
                + (f"; with loftq_iter={loftq.loftq_iter} their base also differs from the one LoftQ would store"
                   if loftq.loftq_iter > 1 else ""), stacklevel=4)

    # ---- state -----------------------------------------------------------------------------
    def refresh_trainable(self) -> None:
        """Only active adapters that are not in inference mode train (plus bias per config)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        config = self.peft_config.get(self.active_adapter)
        if config is None or config.inference_mode:
            return
        name = self.active_adapter
        for _, layer in self.lora_layers():
            for p in layer.adapter_parameters(name):
                p.requires_grad_(True)
            if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)
        if config.bias == "all":
            for pname, p in self.model.named_parameters():
                # not the frozen original of a modules_to_save head: its trained copy is the one (peft)
                if pname.endswith("bias") and "lora_" not in pname and ".original_module." not in pname:
                    p.requires_grad_(True)
        for _, wrapper in self.save_wrappers():
            if name in wrapper.modules_to_save:
                for p in wrapper.modules_to_save[name].parameters():
                    p.requires_grad_(True)

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool | None = None) -> None:
        """Activate adapter(s); several at once add their outputs. As in peft, an adapter activated
        by name trains unless ``inference_mode=True`` (None: keep its config's mode)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ConfigError(f"no adapter named {n!r}; adapters: {list(self.peft_config)}")
        if inference_mode is not None and isinstance(adapter_name, str):
            self.peft_config[adapter_name].inference_mode = inference_mode
        for _, layer in self.lora_layers():
            layer.set_active(names)
        for _, wrapper in self.save_wrappers():
            wrapper.set_active(names)
        self.active_adapter = names[0]
        self.active_adapters = names  # several at once: their outputs add up
        self.refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {list(self.peft_config)}")
        del self.peft_config[adapter_name]
        for name, layer in list(self.lora_layers()):
            layer.delete(adapter_name)
            if not layer.specs:
                set_parent(self.model, name, layer.base_layer)
        for _, wrapper in self.save_wrappers():
            wrapper.delete(adapter_name)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        if self.active_adapter == adapter_name:
            remaining = list(self.peft_config)
            if remaining:
                self.set_adapter(remaining[0])
        elif self.active_adapters:
            self.set_adapter(self.active_adapters)

    def set_disabled(self, disabled: bool) -> None:
        for _, layer in self.lora_layers():
            layer.disabled = disabled
        for _, wrapper in self.save_wrappers():
            wrapper.disabled = disabled

    # ---- merging ---------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        for _, layer in self.lora_layers():
            layer.merge(adapter_names, safe=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.unmerge()

    def _replace_wrappers(self, merge: bool, safe_merge: bool, adapter_names: Sequence[str] | None) -> nn.Module:
        for name, layer in list(self.lora_layers()):
            base = layer.base_layer
            if merge:
                names = adapter_names if adapter_names is not None else layer.active_adapters
                base = _merged_base(layer, names, safe_merge)
            elif layer.merged_adapters:
                layer.unmerge()
            set_parent(self.model, name, base)
        for name, wrapper in list(self.save_wrappers()):  # the trained copy stays, merged or not (peft)
            set_parent(self.model, name, wrapper.current())
        return self.model

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Fold the adapter(s) into the weights and return the plain transformers model. A quantized
        (bitsandbytes) base comes back fully dequantized: a plain float model."""
        if any(layer.kind in QUANT_KINDS for _, layer in self.lora_layers()):
            warnings.warn("the base is quantized: merging dequantizes it and returns a full-precision model",
                          stacklevel=3)
        model = self._replace_wrappers(True, safe_merge, adapter_names)
        from ...quant.dequant import dequantize_model
        from ...quant.kinds import has_quantized_layers

        if has_quantized_layers(model) or getattr(model, "is_loaded_in_4bit", False) \
                or getattr(model, "is_loaded_in_8bit", False):
            dequantize_model(model)
        return model

    def unload(self) -> nn.Module:
        return self._replace_wrappers(False, False, None)

    # ---- combining adapters ----------------------------------------------------------------
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None) -> None:
        """A new adapter from a weighted combination of existing ones (see :mod:`.combine`)."""
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank)


def _merged_base(layer: LoraLayer, names: Sequence[str], safe: bool) -> nn.Module:
    """The base module with ``names`` merged; a quantized base comes back as a float Linear."""
    weight = layer.merged_weight([n for n in names if n not in layer.merged_adapters], safe=safe)
    if layer.kind in QUANT_KINDS:
        from ...quant.dequant import float_linear_from

        return float_linear_from(layer.base_layer, weight)
    layer.write_base_weight(weight)
    return layer.base_layer
