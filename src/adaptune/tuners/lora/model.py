"""LoraModel: puts LoRA layers into a transformers model and manages them as named adapters.

It is what ``PeftModel.base_model`` holds for LoRA, as in peft, so that parameter names read
``base_model.model.<module path>.lora_A.<adapter>.weight``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch
from torch import nn

from ...config import LoraConfig, TaskType
from ...errors import ConfigError
from ..targets import DEFAULT_TARGETS, FUSED_SLICES, Target, model_type, module_kind, pattern_key, resolve_targets
from .layer import AdapterSpec, LoraLayer, ModulesToSaveWrapper

# Classifier heads that task types train in full and save with the adapter (peft's lists).
TASK_HEADS: dict[TaskType, tuple[str, ...]] = {
    TaskType.SEQ_CLS: ("classifier", "score"),
    TaskType.TOKEN_CLS: ("classifier", "score"),
    TaskType.QUESTION_ANS: ("qa_outputs",),
}


def _get_parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


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

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ---- discovery -----------------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                yield name, module

    def save_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    # ---- injection -----------------------------------------------------------------------
    def _modules_to_save(self, config: LoraConfig) -> list[str]:
        names = list(config.modules_to_save or [])
        heads = TASK_HEADS.get(config.task_type, ())
        present = {n.rsplit(".", 1)[-1] for n, _ in self.model.named_modules()}
        names += [h for h in heads if h in present and h not in names]
        return names

    def inject_adapter(self, config: LoraConfig, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Wrap every target of ``config`` (raising before any change if something is wrong).
        ``autocast_adapter_dtype``: adapter weights in fp32 on an fp16/bf16 base, as in peft."""
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} already exists")
        if adapter_name == "__base__":
            raise ConfigError("'__base__' is reserved for 'no adapter' in mixed batches")
        save_names = self._modules_to_save(config)
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
                parent, child = _get_parent(self.model, target.name)
                module = LoraLayer(module)
                setattr(parent, child, module)
            module.add(adapter_name, spec, upcast=autocast_adapter_dtype)
        self._wrap_modules_to_save(save_names, adapter_name)
        self.peft_config[adapter_name] = config
        self._set_trainable()
        if any(layer.kind in ("linear4bit", "linear8bitlt") for _, layer in self.lora_layers()):
            from ...quant.bnb import keep_trainable_layout

            keep_trainable_layout(self.model)  # see quant.py: bitsandbytes' CPU eval re-packing

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
        other = sorted({k for k in kinds.values() if k not in ("linear", "linear4bit", "linear8bitlt")})
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

    def _wrap_modules_to_save(self, names: Sequence[str], adapter_name: str) -> None:
        if not names:
            return
        found = False
        for name, module in list(self.model.named_modules()):
            if isinstance(module, (ModulesToSaveWrapper, LoraLayer)) or ".modules_to_save." in name \
                    or ".original_module" in name or not name:
                continue
            if any(name == n or name.endswith("." + n) for n in names):
                parent, child = _get_parent(self.model, name)
                wrapper = ModulesToSaveWrapper(module)
                setattr(parent, child, wrapper)
                wrapper.add(adapter_name)
                found = True
        for name, wrapper in self.save_wrappers():
            if adapter_name not in wrapper.modules_to_save and any(
                    name == n or name.endswith("." + n) for n in names):
                wrapper.add(adapter_name)
                found = True
        if not found:
            raise ConfigError(f"modules_to_save={list(names)} matches no module of the model")

    # ---- state -----------------------------------------------------------------------------
    def _set_trainable(self) -> None:
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

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for n in names:
            if n not in self.peft_config:
                raise ConfigError(f"no adapter named {n!r}; adapters: {list(self.peft_config)}")
        for _, layer in self.lora_layers():
            layer.set_active(names)
        for _, wrapper in self.save_wrappers():
            wrapper.set_active(names)
        self.active_adapter = names[0]
        self.active_adapters = names  # several at once: their outputs add up
        self._set_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {list(self.peft_config)}")
        del self.peft_config[adapter_name]
        for name, layer in list(self.lora_layers()):
            layer.delete(adapter_name)
            if not layer.specs:
                parent, child = _get_parent(self.model, name)
                setattr(parent, child, layer.base_layer)
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
            parent, child = _get_parent(self.model, name)
            setattr(parent, child, base)
        for name, wrapper in list(self.save_wrappers()):  # the trained copy stays, merged or not (peft)
            parent, child = _get_parent(self.model, name)
            setattr(parent, child, wrapper.current())
        return self.model

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> nn.Module:
        """A quantized (bitsandbytes) base comes back fully dequantized: a plain float model."""
        model = self._replace_wrappers(True, safe_merge, adapter_names)
        from ...quant.bnb import dequantize_model, has_quantized_layers

        if has_quantized_layers(model) or getattr(model, "is_loaded_in_4bit", False) \
                or getattr(model, "is_loaded_in_8bit", False):
            dequantize_model(model)
        return model

    def unload(self) -> nn.Module:
        return self._replace_wrappers(False, False, None)

    # ---- combining adapters ----------------------------------------------------------------
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None) -> None:
        """A new adapter from a weighted combination of existing ones (peft's semantics).

        ``cat`` stacks the adapters (rank = sum of ranks): its delta is exactly sum(w_i * delta_i).
        ``svd`` takes that same exact delta and keeps its best rank-``svd_rank`` approximation.
        ``linear`` (equal ranks) adds sqrt(w_i * s_i)-weighted A's and B's, as peft does; it is
        not the sum of deltas (cross terms), and kept for compatibility.
        """
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} already exists")
        if len(adapters) != len(weights) or not adapters:
            raise ConfigError("adapters and weights must be non-empty lists of the same length")
        configs = [self.peft_config[a] for a in adapters]
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
        targets = sorted({t for c in configs for t in _as_list(c.target_modules)})
        new_config = replace(configs[0], r=new_r, lora_alpha=new_r, use_rslora=False, rank_pattern={},
                             alpha_pattern={}, target_modules=targets or None)
        self.peft_config[adapter_name] = new_config
        for _, layer in self.lora_layers():
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.specs]
            if not present:
                continue
            slices = layer.specs[present[0][0]].slices
            if slices or layer.is_embedding:
                if combination_type != "cat" or any(layer.specs[a].slices != slices for a, _ in present):
                    raise ConfigError("sliced and embedding adapters combine only with combination_type='cat'")
            layer.add(adapter_name, AdapterSpec(r=new_r, alpha=new_r, slices=slices))
            _combine_into(layer, present, adapter_name, combination_type)
        for _, wrapper in self.save_wrappers():
            source = next((a for a in adapters if a in wrapper.modules_to_save), None)
            if source is not None:
                import copy
                wrapper.modules_to_save[adapter_name] = copy.deepcopy(wrapper.modules_to_save[source])
        self._set_trainable()


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _merged_base(layer: LoraLayer, names: Sequence[str], safe: bool) -> nn.Module:
    """The base module with ``names`` merged; a quantized base comes back as a float Linear."""
    weight = layer.merged_weight([n for n in names if n not in layer.merged_adapters], safe=safe)
    if layer.kind in ("linear4bit", "linear8bitlt"):
        from ...quant.bnb import float_linear_from

        return float_linear_from(layer.base_layer, weight)
    layer._write_base_weight(weight)
    return layer.base_layer


def _combine_into(layer: LoraLayer, present: list[tuple[str, float]], new: str, how: str) -> None:
    with torch.no_grad():
        if layer.is_embedding:  # cat only: stack ranks, weights folded into A
            a = torch.cat([layer.lora_embedding_A[n] * w * layer.scaling(n) for n, w in present], 0)
            b = torch.cat([layer.lora_embedding_B[n] for n, _ in present], 1)
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
    rows = spec.slices[0][1] - spec.slices[0][0]
    a_blocks, b_blocks = [], []
    for i in range(len(spec.slices)):
        a_i, b_i = [], []
        for n, w in present:
            r_n = layer.specs[n].r
            a_i.append(layer.lora_A[n].weight[i * r_n:(i + 1) * r_n] * w * layer.scaling(n))
            b_i.append(layer.lora_B[n].weight[i * rows:(i + 1) * rows])
        a_blocks.append(torch.cat(a_i, 0))
        b_blocks.append(torch.cat(b_i, 1))
    return torch.cat(a_blocks, 0), torch.cat(b_blocks, 0)


def fused_slice_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    return FUSED_SLICES.get(model_type(model) or "", {})
