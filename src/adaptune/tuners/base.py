"""The tuner interface, and the heads that a task trains in full (``modules_to_save``).

A *tuner* is what an adapter method puts into a transformers model and manages by adapter name.
``PeftModel`` talks to its tuner through :class:`Tuner` alone, so each of its methods is a line
and a new method (IA3, say) is a new tuner, not a branch in ``PeftModel``:

    PeftModel ──> Tuner ──┬── LoraModel       (tuners/lora: LoRA, DoRA, rsLoRA; layers around Linear)
                          └── PromptLearning  (tuners/prompt: virtual tokens or a prefix in front)

Both tuners may train whole copies of task heads (a SEQ_CLS classifier) next to their adapters:
:class:`ModulesToSaveWrapper` holds one trained copy per adapter and :func:`wrap_modules_to_save`
puts it in place, the same way for every tuner.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from ..config import PeftConfig, TaskType
from ..errors import ConfigError

# Heads that task types train in full and save with the adapter (peft's lists).
TASK_HEADS: dict[TaskType, tuple[str, ...]] = {
    TaskType.SEQ_CLS: ("classifier", "score"),
    TaskType.TOKEN_CLS: ("classifier", "score"),
    TaskType.QUESTION_ANS: ("qa_outputs",),
}

__all__ = ["TASK_HEADS", "ModulesToSaveWrapper", "Tuner", "heads_to_save", "save_wrappers", "set_parent",
           "wrap_modules_to_save"]


class Tuner(Protocol):
    """What ``PeftModel`` asks of an adapter method."""

    peft_config: dict[str, PeftConfig]
    active_adapter: str

    @property
    def active_adapters(self) -> list[str]: ...

    def base_transformer(self) -> nn.Module:
        """The transformers model inside, with the adapter layers in place."""

    def add_adapter(self, adapter_name: str, config: PeftConfig, autocast_adapter_dtype: bool = True) -> None:
        """Add an adapter; it is not activated."""

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate adapter(s); the active one trains unless ``inference_mode``."""

    def delete_adapter(self, adapter_name: str) -> None: ...

    def disabled(self) -> AbstractContextManager[None]:
        """Within the block the model computes exactly what the base model does."""

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any: ...

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any: ...

    def adapter_state_for_disk(self, adapter_name: str, state_dict: Mapping[str, torch.Tensor] | None = None
                               ) -> tuple[dict[str, torch.Tensor], PeftConfig]:
        """The adapter's tensors under the keys its file holds, and the config to write with them."""

    def load_adapter_state(self, adapter_name: str, tensors: Mapping[str, torch.Tensor], source: str,
                           trainable: bool | None = None) -> None:
        """Tensors as a file holds them into adapter ``adapter_name``; ``source`` names them in errors."""


def set_parent(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` inside ``root``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class ModulesToSaveWrapper(nn.Module):
    """A fully trained copy of a module (a classifier head, say) per adapter; the original stays."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def delete(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_active(self, names: Sequence[str]) -> None:
        present = [n for n in names if n in self.modules_to_save]
        self.active_adapter = present[0] if present else None

    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current(), name)


def save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    """Every ``ModulesToSaveWrapper`` in ``model``, with its path."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def heads_to_save(model: nn.Module, config: PeftConfig) -> list[str]:
    """``config.modules_to_save`` plus the heads its task trains that ``model`` has (peft's rule)."""
    names = list(getattr(config, "modules_to_save", None) or [])
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return names + [h for h in TASK_HEADS.get(config.task_type, ()) if h in present and h not in names]


def _selected(name: str, names: Sequence[str]) -> bool:
    return any(name == n or name.endswith("." + n) for n in names)


def wrap_modules_to_save(model: nn.Module, names: Sequence[str], adapter_name: str) -> None:
    """Give adapter ``adapter_name`` a trained copy of every module called (or ending in) one of
    ``names``, wrapping each module once; ConfigError when ``names`` select nothing."""
    if not names:
        return
    wrapped = [n for n, _ in save_wrappers(model)]
    for name, module in list(model.named_modules()):
        inside = any(name == w or name.startswith(w + ".") for w in wrapped)
        if name and not inside and type(module).__name__ != "LoraLayer" and _selected(name, names):
            set_parent(model, name, ModulesToSaveWrapper(module))
            wrapped.append(name)
    found = False
    for name, wrapper in save_wrappers(model):
        if _selected(name, names):
            if adapter_name not in wrapper.modules_to_save:
                wrapper.add(adapter_name)
            found = True
    if not found:
        raise ConfigError(f"modules_to_save={list(names)} matches no module of the model")
