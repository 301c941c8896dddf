"""Which modules of a model an adapter config selects.

The rules are peft's, so a ``target_modules`` list written for peft selects the same layers here:

* a list: a module is chosen when its name equals an entry or ends with ``"." + entry``;
* a string: a regular expression that must match the whole module name;
* ``"all-linear"``: every linear layer except the output head;
* ``None``: the default of the model's architecture (``DEFAULT_TARGETS``).

Two additions: GPT-2 keeps q, k and v in one fused ``c_attn``; the names ``q_attn``, ``k_attn`` and
``v_attn`` select its slices (the LoRA paper adapted only W_q and W_v of GPT-2). And when nothing
matches, the error lists the layers the model really has and the closest names.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import TargetError
from ..quant.kinds import layer_kind

try:  # GPT-2 style layers that store W as (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]

# peft's defaults per architecture (model_type -> names), the attention query/value projections.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "stablelm": ["q_proj", "v_proj"],
    "starcoder2": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
}

# Fused projections: model_type -> fused module name -> ordered slice names (equal-size rows).
FUSED_SLICES: dict[str, dict[str, tuple[str, ...]]] = {
    "gpt2": {"c_attn": ("q_attn", "k_attn", "v_attn")},
}

# Default "layers" containers, used to read a layer index out of a module name.
LAYER_PATTERNS: tuple[str, ...] = ("layers", "h", "block", "blocks", "layer")


Slices = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Target:
    """One module to adapt; ``slices`` are (start, stop) output rows when only parts are adapted."""

    name: str
    slices: Slices | None = None
    slice_names: tuple[str, ...] | None = None


def slice_width(slices: Slices) -> int:
    """Output rows in each slice of a fused projection (they are all the same size)."""
    start, stop = slices[0]
    return stop - start


def as_list(value: str | Sequence[str] | None) -> list[str]:
    """A ``target_modules``-like value as a list (a single name or regex becomes one entry)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def module_kind(module: nn.Module) -> str | None:
    """The adapter-relevant kind of a module (``linear``, ``conv1d``, ``embedding``, or a quantized
    kind of :data:`adaptune.quant.QUANT_KINDS`), or None when LoRA cannot wrap it."""
    quantized = layer_kind(module)
    if quantized is not None:
        return quantized
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear-like module or (num_embeddings, embedding_dim) of an embedding."""
    kind = module_kind(module)
    if kind == "conv1d":
        return module.weight.shape[0], module.weight.shape[1]
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    return module.in_features, module.out_features


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output embedding (lm_head), excluded from "all-linear" as peft does."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
    return names


def adaptable_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every (name, module, kind) that a LoRA layer can wrap."""
    out = []
    inside: list[str] = []  # prefixes of adapter wrappers, whose internals are not targets
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if type(module).__name__ in ("LoraLayer", "ModulesToSaveWrapper"):
            inside.append(name + ".")
            base = getattr(module, "base_layer", None)
            kind = module_kind(base) if base is not None else None
            if kind is not None:  # an already wrapped layer can take another adapter
                out.append((name, base, kind))
            continue
        kind = module_kind(module)
        if kind is not None and name:
            out.append((name, module, kind))
    return out


def matches(name: str, selector: str | Sequence[str] | None) -> bool:
    """peft's matching rule: regex full match for a string, exact or dotted suffix for a list."""
    if selector is None:
        return False
    if isinstance(selector, str):
        try:
            return re.fullmatch(selector, name) is not None
        except re.error as exc:
            raise TargetError(f"{selector!r} is not a valid regular expression ({exc}); give layer names "
                              "separated by commas, or a regex") from None
    return any(name == key or name.endswith("." + key) for key in selector)


REGEX_CHARACTERS = set("*()[]|\\^$?+{}")


def parse_targets(value: str | Sequence[str] | None) -> str | list[str] | None:
    """Targets as a user types them (CLI, YAML): ``"q_proj,v_proj"`` and ``"q_proj"`` are names,
    ``"all-linear"`` stays, text with regex characters is a regex. A list passes through."""
    if value is None or not isinstance(value, str):
        return None if value is None else list(value)
    if value == "all-linear" or REGEX_CHARACTERS & set(value):
        return value
    return [t.strip() for t in value.split(",") if t.strip()]


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The block index in a module name (``model.layers.3.self_attn.q_proj`` -> 3)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or LAYER_PATTERNS)
    for pattern in patterns:
        found = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if found:
            return int(found.group(1))
    return None


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The rank_pattern / alpha_pattern key that applies to module ``name`` (peft's rule)."""
    for key in patterns:
        if name == key or re.fullmatch(rf"(.*\.)?({key})", name):
            return key
    return None


def _generic_name(name: str) -> str:
    """``transformer.h.3.attn.c_attn`` -> ``transformer.h.*.attn.c_attn`` for listing layers."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def describe_adaptable(model: nn.Module) -> list[dict]:
    """Rows (pattern, leaf name, kind, in, out, count) summarising the adaptable layers."""
    rows: dict[tuple, dict] = {}
    for name, module, kind in adaptable_modules(model):
        fin, fout = in_out_features(module)
        key = (_generic_name(name), kind, fin, fout)
        row = rows.setdefault(key, {"pattern": key[0], "leaf": name.rsplit(".", 1)[-1], "kind": kind,
                                    "in": fin, "out": fout, "count": 0})
        row["count"] += 1
    return list(rows.values())


def _fused_slice_targets(model: nn.Module, wanted: set[str]) -> dict[str, tuple[str, ...]]:
    """For GPT-2-like models: fused module name -> the slice names among ``wanted``."""
    out = {}
    real = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for fused, slice_names in FUSED_SLICES.get(model_type(model) or "", {}).items():
        chosen = tuple(s for s in slice_names if s in wanted and s not in real)
        if chosen:
            out[fused] = chosen
    return out


def _not_found_error(model: nn.Module, selector: object, wanted: Iterable[str]) -> TargetError:
    leaves = Counter(name.rsplit(".", 1)[-1] for name, _, kind in adaptable_modules(model))
    available = ", ".join(f"{leaf} (x{n})" for leaf, n in sorted(leaves.items()))
    hints = []
    for want in wanted:
        close = difflib.get_close_matches(want, list(leaves), n=3, cutoff=0.4)
        if close:
            hints.append(f"{want!r} -> did you mean {' or '.join(repr(c) for c in close)}?")
    slice_names = [s for fused in FUSED_SLICES.get(model_type(model) or "", {}).values() for s in fused]
    extra = f" Fused slices: {', '.join(slice_names)}." if slice_names else ""
    hint = (" " + " ".join(hints)) if hints else ""
    return TargetError(
        f"target_modules={selector!r} matches no layer of this {type(model).__name__}.{hint} "
        f"Adaptable layers: {available}.{extra} Run `adaptune inspect MODEL` to see them all."
    )


def resolve_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    skip: Iterable[str] = (),
) -> list[Target]:
    """The modules a LoRA config adapts, in model order. Raises TargetError when none match."""
    if target_modules is None:
        mtype = model_type(model)
        if mtype not in DEFAULT_TARGETS:
            raise TargetError(
                f"no default target_modules for model type {mtype!r}; pass target_modules "
                f"(a list of layer names, a regex, or 'all-linear'). Run `adaptune inspect MODEL`."
            )
        target_modules = DEFAULT_TARGETS[mtype]
    skip = set(skip)
    candidates = [(n, m, k) for n, m, k in adaptable_modules(model)
                  if not any(n == s or n.startswith(s + ".") or n.endswith("." + s) for s in skip)]

    if target_modules == "all-linear":
        heads = _output_head_names(model)
        chosen = [Target(n) for n, _, k in candidates if k != "embedding" and n not in heads]
        wanted: list[str] = ["all-linear"]
    else:
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        fused = {} if isinstance(target_modules, str) else _fused_slice_targets(model, set(wanted))
        plain = wanted if isinstance(target_modules, str) else [
            w for w in wanted if not any(w in s for s in fused.values())]
        chosen = []
        for name, module, kind in candidates:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in fused and kind in ("conv1d", "linear"):
                if plain and matches(name, plain if not isinstance(target_modules, str) else target_modules):
                    raise TargetError(
                        f"{name}: target both the whole fused layer and its slices {fused[leaf]}; pick one")
                slices = _slice_rows(model, module, leaf, fused[leaf])
                chosen.append(Target(name, slices=slices, slice_names=fused[leaf]))
            elif plain and matches(name, target_modules if isinstance(target_modules, str) else plain):
                chosen.append(Target(name))

    if exclude_modules is not None:
        chosen = [t for t in chosen if not matches(t.name, exclude_modules)]
    if layers_to_transform is not None:
        keep = set(layers_to_transform)
        chosen = [t for t in chosen if layer_index(t.name, layers_pattern) in keep]
    if not chosen:
        raise _not_found_error(model, target_modules, wanted)
    return chosen


def _slice_rows(model: nn.Module, module: nn.Module, leaf: str, chosen: tuple[str, ...]
                ) -> tuple[tuple[int, int], ...]:
    """Output-row ranges of the chosen slices of a fused projection (equal thirds for GPT-2)."""
    all_names = FUSED_SLICES[model_type(model)][leaf]
    _, out = in_out_features(module)
    if out % len(all_names):
        raise TargetError(f"cannot split {leaf} ({out} outputs) into {len(all_names)} equal slices")
    size = out // len(all_names)
    return tuple((all_names.index(s) * size, (all_names.index(s) + 1) * size) for s in chosen)


def lora_pairs(model: nn.Module, target_modules: str | Sequence[str] | None) -> dict[str, list[tuple[int, int]]]:
    """Module name -> ``(in, out)`` of each A/B pair LoRA puts on it (one per fused slice)."""
    found: dict[str, list[tuple[int, int]]] = {}
    for t in resolve_targets(model, target_modules):
        fan_in, fan_out = in_out_features(model.get_submodule(t.name))
        found[t.name] = [(fan_in, stop - start) for start, stop in t.slices] if t.slices else [(fan_in, fan_out)]
    return found


def lora_parameter_count(pairs: dict[str, list[tuple[int, int]]], r: int) -> int:
    """Parameters a rank-``r`` LoRA with these :func:`lora_pairs` adds: ``r * (in + out)`` per pair."""
    return sum(r * (fan_in + fan_out) for layer in pairs.values() for fan_in, fan_out in layer)
