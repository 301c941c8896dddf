"""LoRA's tensors and config as peft's files hold them.

On disk a key is the module path inside the wrapped model, prefixed ``base_model.model.``, with
the adapter name left out: ``base_model.model.<path>.lora_A.weight``. A GPT-2 adapter on the q and
v *slices* of ``c_attn`` is written as an ordinary ``c_attn`` LoRA whose k rows are zero (rank and
alpha multiplied so the scaling is unchanged), which peft, vLLM and llama.cpp read as is; the
``fused_slices`` field lets adaptune read it back as the same sliced adapter.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ...config import LoraConfig
from ...errors import AdapterFileError
from ..files import check_shape, check_values, clean_path, disk_tensors, tensor_reader
from ..targets import FUSED_SLICES, as_list, model_type, pattern_key, slice_width
from .layer import LoraLayer

if TYPE_CHECKING:
    from .model import LoraModel

PREFIX = "base_model.model."

__all__ = ["PREFIX", "config_for_disk", "config_from_disk", "load_lora_state_dict", "lora_state_dict"]


def lora_state_dict(tuner: LoraModel, adapter_name: str,
                    state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's on-disk names (``tuner`` is a LoraModel), read from the
    modules or from ``state_dict``, the PeftModel's full state dict (see :func:`tensor_reader`)."""
    config: LoraConfig = tuner.peft_config[adapter_name]
    read = tensor_reader(state_dict, PREFIX)
    out: dict[str, torch.Tensor] = {}
    for name, layer in tuner.lora_layers():
        if adapter_name not in layer.specs:
            continue
        name = clean_path(name)
        key = PREFIX + name
        if layer.is_embedding:
            for part in ("lora_embedding_A", "lora_embedding_B"):
                out[f"{key}.{part}"] = read(f"{name}.{part}.{adapter_name}", getattr(layer, part)[adapter_name])
        else:
            a = read(f"{name}.lora_A.{adapter_name}.weight", layer.lora_A[adapter_name].weight)
            b = read(f"{name}.lora_B.{adapter_name}.weight", layer.lora_B[adapter_name].weight)
            if layer.specs[adapter_name].slices:
                b = _full_b_from_slices(layer, adapter_name, b)
            out[f"{key}.lora_A.weight"] = a
            out[f"{key}.lora_B.weight"] = b
        if adapter_name in layer.lora_magnitude_vector:
            out[f"{key}.lora_magnitude_vector"] = read(f"{name}.lora_magnitude_vector.{adapter_name}.weight",
                                                       layer.lora_magnitude_vector[adapter_name].weight)
        if config.bias in ("lora_only", "all") and getattr(layer.base_layer, "bias", None) is not None:
            out[f"{key}.base_layer.bias"] = read(f"{name}.base_layer.bias", layer.base_layer.bias)
    if config.bias == "all":
        for pname, p in tuner.model.named_parameters():
            pname = clean_path(pname)
            if pname.endswith("bias") and "lora_" not in pname and ".base_layer." not in pname \
                    and ".modules_to_save." not in pname and ".original_module." not in pname:
                out[PREFIX + pname] = read(pname, p)
    for name, wrapper in tuner.save_wrappers():
        name = clean_path(name)
        if adapter_name in wrapper.modules_to_save:
            for pname, p in wrapper.modules_to_save[adapter_name].named_parameters():
                pname = clean_path(pname)
                out[f"{PREFIX}{name}.{pname}"] = read(f"{name}.modules_to_save.{adapter_name}.{pname}", p)
    return disk_tensors(out)


def _full_b_from_slices(layer: LoraLayer, adapter_name: str, b: torch.Tensor) -> torch.Tensor:
    """Block matrix (out, n*r): slice i's B (``b``, slice after slice) in its rows and its r
    columns, zeros elsewhere."""
    spec = layer.specs[adapter_name]
    rows = slice_width(spec.slices)
    full = b.new_zeros(layer.out_features, spec.r * len(spec.slices))
    for i, (start, stop) in enumerate(spec.slices):
        full[start:stop, i * spec.r:(i + 1) * spec.r] = b[i * rows:(i + 1) * rows]
    return full


def config_for_disk(tuner: LoraModel, adapter_name: str) -> LoraConfig:
    """The config as peft should read it: fused slices become a wider plain LoRA.

    A sliced layer's rank and alpha go into rank_pattern / alpha_pattern: under the bare leaf
    (``{"c_attn": 2r}``) when every sliced layer of that leaf agrees and no other key selects them,
    else one full module name per layer. Readers take the first matching key in file order (keys
    are sorted on disk), so a leaf key next to per-layer keys would shadow them.
    """
    config: LoraConfig = tuner.peft_config[adapter_name]
    fused: dict[str, list[str]] = {}
    adapted: dict[str, int] = {}  # adapted layer -> slice count (1: not sliced)
    specs = {}
    for name, layer in tuner.lora_layers():
        spec = layer.specs.get(adapter_name)
        if spec is None:
            continue
        specs[name] = spec
        adapted[name] = len(spec.slices) if spec.slices else 1
        if spec.slices:
            leaf = name.rsplit(".", 1)[-1]
            fused[leaf] = list(_slice_names_of(tuner, leaf, spec.slices, layer.out_features))
    if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        # on disk as the layers it chose, as peft writes it: readers such as vLLM expect a list
        config = replace(config, target_modules=sorted(adapted))
    if not fused:
        return config
    sliced = [n for n, k in adapted.items() if k > 1]
    targets = [t for t in as_list(config.target_modules) if not any(t in s for s in fused.values())]
    targets += list(fused)
    disk_value = {
        "rank_pattern": lambda n: specs[n].r * adapted[n],
        "alpha_pattern": lambda n: specs[n].alpha * (math.sqrt(adapted[n]) if config.use_rslora else adapted[n]),
    }
    patterns = {}
    for field_name, value_of in disk_value.items():
        pattern = dict(getattr(config, field_name))
        for key in list(pattern):  # keys that select only sliced layers are rewritten below
            hits = [n for n in adapted if pattern_key([key], n)]
            if hits and all(adapted[n] > 1 for n in hits):
                del pattern[key]
        for leaf in fused:
            group = [n for n in sliced if n.rsplit(".", 1)[-1] == leaf]
            values = {value_of(n) for n in group}
            if len(values) == 1 and not any(pattern_key(pattern, n) for n in group):
                pattern[leaf] = values.pop()
            else:
                pattern.update({n: value_of(n) for n in group})
        patterns[field_name] = pattern
    disk = replace(config, target_modules=sorted(set(targets)), fused_slices=fused, **patterns)
    _warn_if_patterns_misread(disk, adapted, disk_value)
    return disk


def _warn_if_patterns_misread(disk: LoraConfig, adapted: dict[str, int], disk_value) -> None:
    """peft reads the first matching key in sorted order; say so if that gives other ranks."""
    defaults = {"rank_pattern": disk.r, "alpha_pattern": disk.lora_alpha}
    for field_name, value_of in disk_value.items():
        pattern = getattr(disk, field_name)
        for name in adapted:
            key = pattern_key(sorted(pattern), name)
            read = pattern[key] if key is not None else defaults[field_name]
            if not math.isclose(read, value_of(name)):
                warnings.warn(f"{name}: peft will read {field_name.split('_')[0]} {read} from this adapter's "
                              f"{field_name} instead of {value_of(name)}; the file loads in adaptune but "
                              f"not as the same adapter in peft (use distinct rank_pattern keys)", stacklevel=4)
                return


def config_from_disk(config: LoraConfig) -> LoraConfig:
    """Reverse ``config_for_disk``: a file written with fused slices becomes sliced again."""
    if not config.fused_slices:
        return config
    targets = set(as_list(config.target_modules))
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for leaf, names in config.fused_slices.items():
        k = len(names)
        targets.discard(leaf)
        targets.update(names)
        ours = [key for key in rank_pattern if key == leaf or key.endswith("." + leaf)]
        rank_pattern = {key: (r // k if key in ours else r) for key, r in rank_pattern.items()
                        if not (key == leaf and r // k == config.r)}
        ours = [key for key in alpha_pattern if key == leaf or key.endswith("." + leaf)]
        div = math.sqrt(k) if config.use_rslora else k
        alpha_pattern = {key: (a / div if key in ours else a) for key, a in alpha_pattern.items()
                         if not (key == leaf and math.isclose(a / div, config.lora_alpha))}
    return replace(config, target_modules=sorted(targets), rank_pattern=rank_pattern,
                   alpha_pattern=alpha_pattern, fused_slices=None)


def _slice_names_of(tuner: LoraModel, leaf: str, slices, out_features: int) -> tuple[str, ...]:
    all_names = FUSED_SLICES[model_type(tuner.model)][leaf]
    size = out_features // len(all_names)
    return tuple(all_names[start // size] for start, _ in slices)


def load_lora_state_dict(tuner: LoraModel, adapter_name: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy peft-named tensors into adapter ``adapter_name``; every mismatch is an error naming it."""
    tensors = dict(tensors)
    expected = lora_state_dict(tuner, adapter_name)  # names and shapes this model needs
    missing = [k for k in expected if k not in tensors]
    lora_missing = [k for k in missing if "lora_" in k]
    if lora_missing:
        raise AdapterFileError(
            f"{source}: {len(lora_missing)} adapter tensors this model needs are missing, e.g. "
            f"{lora_missing[0]} (was the adapter made for another base model or target_modules?)")
    extra = _peft_extra_keys(tuner, adapter_name)
    unexpected = [k for k in tensors if k not in expected and k not in extra]
    if unexpected:
        raise AdapterFileError(
            f"{source}: {len(unexpected)} tensors do not belong to any adapted layer of this model, e.g. "
            f"{unexpected[0]} (was the adapter made for another base model?)")
    if missing:
        warnings.warn(f"{source}: {len(missing)} tensors not in the file keep their base values, "
                      f"e.g. {missing[0]}", stacklevel=3)
    check_values(tensors, source)
    try:
        _copy_into(tuner, adapter_name, tensors, extra)
    except AdapterFileError as exc:  # a shape mismatch names the layer; say which file it came from
        raise AdapterFileError(f"{source}: {exc}") from None


def _copy_into(tuner: LoraModel, adapter_name: str, tensors: dict[str, torch.Tensor], extra: dict) -> None:
    with torch.no_grad():
        for name, layer in tuner.lora_layers():
            if adapter_name in layer.specs:
                _load_layer(layer, name, adapter_name, tensors)
        for pname, p in tuner.model.named_parameters():
            key = _disk_key_for_param(pname, adapter_name)
            if key is not None and key in tensors and "lora_" not in key:
                check_shape(pname, key, p.shape, tensors[key].shape)
                p.copy_(tensors[key].to(p.dtype))
        for key, p in extra.items():
            if p is not None and key in tensors:
                check_shape(key[len(PREFIX):].rsplit(".", 1)[0], key, p.shape, tensors[key].shape)
                p.copy_(tensors[key].to(p.dtype))


def _peft_extra_keys(tuner: LoraModel, adapter_name: str) -> dict[str, torch.nn.Parameter | None]:
    """Keys peft may write that adaptune does not: key -> the parameter to load it into (None: skip).

    * ``<layer>.base_layer.weight``: peft's ``save_embedding_layers="auto"`` stores the whole base
      weight of an adapted ``embed_tokens`` / ``lm_head`` (for resized vocabularies); peft loads it.
    * ``<head>.original_module.<p>`` and ``<head>.modules_to_save.<p>``: with ``bias="all"`` peft also
      writes the original head's bias (which it loads) and a duplicate of the saved copy's (ignored).
    """
    out: dict[str, torch.nn.Parameter | None] = {}
    for name, layer in tuner.lora_layers():
        if adapter_name in layer.specs and layer.kind in ("linear", "conv1d", "embedding"):
            out[f"{PREFIX}{name}.base_layer.weight"] = layer.base_layer.weight
    for name, wrapper in tuner.save_wrappers():
        if adapter_name in wrapper.modules_to_save:
            for pname, p in wrapper.original_module.named_parameters():
                out[f"{PREFIX}{name}.original_module.{pname}"] = p
                out[f"{PREFIX}{name}.modules_to_save.{pname}"] = None
    return out


def _disk_key_for_param(pname: str, adapter_name: str) -> str | None:
    """Module-to-save and bias parameters: in-memory name -> on-disk key."""
    marker = f".modules_to_save.{adapter_name}."
    if marker in pname:
        return PREFIX + pname.replace(marker, ".")
    if ".modules_to_save." in pname or ".original_module." in pname:
        return None
    if pname.endswith("bias"):
        return PREFIX + pname
    return None


def _load_layer(layer: LoraLayer, name: str, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    key = PREFIX + name
    spec = layer.specs[adapter_name]
    if layer.is_embedding:
        for part in ("A", "B"):
            param = getattr(layer, f"lora_embedding_{part}")[adapter_name]
            value = tensors[f"{key}.lora_embedding_{part}"]
            check_shape(name, f"lora_embedding_{part}", param.shape, value.shape)
            param.copy_(value.to(param.dtype))
    else:
        a_param, b_param = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        check_shape(name, "lora_A.weight", a_param.shape, a.shape)
        if spec.slices:
            check_shape(name, "lora_B.weight", (layer.out_features, a_param.shape[0]), b.shape)
            rows = slice_width(spec.slices)
            b = torch.cat([b[start:stop, i * spec.r:(i + 1) * spec.r] for i, (start, stop) in enumerate(spec.slices)])
            assert b.shape[0] == rows * len(spec.slices)
        check_shape(name, "lora_B.weight", b_param.shape, b.shape)
        a_param.copy_(a.to(a_param.dtype))
        b_param.copy_(b.to(b_param.dtype))
    if adapter_name in layer.lora_magnitude_vector:
        param = layer.lora_magnitude_vector[adapter_name].weight
        value = tensors[f"{key}.lora_magnitude_vector"]
        check_shape(name, "lora_magnitude_vector", param.shape, value.shape)
        param.copy_(value.to(param.dtype))
