"""Adapter folders as the server holds them.

LoRA and DoRA adapters live as named adapters of one :class:`LoraHost` (the LoRA layers of the
base model); a batch picks each row's adapters with ``row_adapters``. Prompt tuning, P-tuning and
prefix tuning adapters are plain tensors put in front of a request at prefill: virtual token
embeddings, or a prefix of keys and values. Reading and checking a folder happens before the
model is touched, so a bad folder changes nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import LoraConfig, PeftConfig, PeftType, PromptLearningConfig, TaskType
from ..errors import AdapterFileError
from ..tuners.files import check_values, read_adapter_tensors
from ..tuners.lora import files as lora_files
from ..tuners.lora.layer import LoraLayer
from ..tuners.lora.model import LoraModel
from ..tuners.prompt.encoders import output_shape, prefix_key_values, prepare_config
from ..tuners.prompt.files import DISK_KEY
from .batching import KV

SERVABLE_TASKS = (None, TaskType.CAUSAL_LM)


@dataclass(frozen=True)
class PromptAdapter:
    """What a prompt-learning adapter adds at prefill: ``embeds`` (virtual tokens, n x dim) or
    ``prefix`` (per layer keys and values, each 1 x heads x n x head_dim)."""

    n_virtual: int
    embeds: torch.Tensor | None = None
    prefix: KV | None = None


@dataclass(frozen=True)
class AdapterFiles:
    """A checked adapter folder, read into memory: a LoRA (config + tensors) or a prompt adapter."""

    path: Path
    lora_config: LoraConfig | None = None
    tensors: dict[str, torch.Tensor] | None = None
    prompt: PromptAdapter | None = None

    @property
    def kind(self) -> str:
        return "lora" if self.lora_config is not None else "prompt"


def read_adapter(path: Path, model: nn.Module) -> AdapterFiles:
    """Read and check the adapter folder ``path`` for ``model``; AdapterFileError if it cannot serve."""
    if not path.is_dir():
        raise AdapterFileError(f"{path}: no such adapter folder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown fields from newer writers: harmless here
        config = PeftConfig.from_pretrained(path)
    if config.task_type not in SERVABLE_TASKS:
        raise AdapterFileError(f"{path}: a {config.task_type} adapter; the server serves CAUSAL_LM adapters")
    tensors = read_adapter_tensors(path)
    if isinstance(config, LoraConfig):
        return AdapterFiles(path, lora_config=_servable_lora(config, path), tensors=tensors)
    if isinstance(config, PromptLearningConfig):
        return AdapterFiles(path, prompt=_prompt_adapter(config, tensors, model, path))
    raise AdapterFileError(f"{path}: a {config.peft_type} adapter cannot be served")


def _servable_lora(config: LoraConfig, path: Path) -> LoraConfig:
    """A LoRA whose effect is confined to its own rows: trained full layers or biases would change
    the shared base model for every request, so such adapters are refused."""
    if config.modules_to_save:
        raise AdapterFileError(f"{path}: the adapter trains whole layers ({', '.join(config.modules_to_save)}, "
                               f"modules_to_save), which cannot be shared in a batch; merge it and serve the "
                               f"merged model instead")
    if config.bias != "none":
        raise AdapterFileError(f"{path}: the adapter trains biases (bias={config.bias!r}), which would change "
                               f"the shared base model; merge it and serve the merged model instead")
    config = lora_files.config_from_disk(config)
    config.inference_mode = True
    config.init_lora_weights = True  # the file holds the weights; no LoftQ/PiSSA start to compute
    return config


def _prompt_adapter(config: PromptLearningConfig, tensors: dict[str, torch.Tensor], model: nn.Module,
                    path: Path) -> PromptAdapter:
    config = prepare_config(config, model)
    extra = sorted(set(tensors) - {DISK_KEY})
    if extra:
        raise AdapterFileError(f"{path}: the adapter also trains whole layers ({extra[0]}...), which cannot be "
                               f"shared in a batch")
    value = tensors.get(DISK_KEY)
    if value is None:
        raise AdapterFileError(f"{path}: no {DISK_KEY!r} tensor")
    if tuple(value.shape) != output_shape(config):
        raise AdapterFileError(f"{path}: {DISK_KEY} has shape {tuple(value.shape)} but this base model needs "
                               f"{output_shape(config)} (was the adapter made for another base model?)")
    check_values({DISK_KEY: value}, str(path))
    weight = model.get_input_embeddings().weight
    value = value.to(device=weight.device, dtype=weight.dtype)
    n = config.num_virtual_tokens
    if config.peft_type != PeftType.PREFIX_TUNING:
        return PromptAdapter(n, embeds=value[:n])
    pairs = prefix_key_values(value, config, batch_size=1)
    return PromptAdapter(n, prefix=[(k.contiguous(), v.contiguous()) for k, v in pairs])


class LoraHost:
    """The base model's LoRA layers, holding every resident LoRA/DoRA adapter under an internal key.

    Keys are the server's own (``lora1``, ``lora2``...), never a user's name, so that a replaced
    adapter can stay loaded beside its successor until the requests that use it finish.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._tuner: LoraModel | None = None
        self.layers: list[LoraLayer] = []

    @property
    def keys(self) -> list[str]:
        return list(self._tuner.peft_config) if self._tuner is not None else []

    def add(self, key: str, files: AdapterFiles) -> None:
        """Inject and fill adapter ``key``; on any failure the model is left as it was."""
        config = files.lora_config
        created = self._tuner is None
        try:
            if created:
                self._tuner = LoraModel(self.model, config, key)
            else:
                self._tuner.inject_adapter(config, key)
            lora_files.load_lora_state_dict(self._tuner, key, files.tensors, str(files.path))
        except Exception:
            if self._tuner is not None and key in self._tuner.peft_config:
                self.remove(key)
            elif created:
                self._tuner = None
            raise
        finally:
            self._refresh()
        for p in self._tuner.parameters():
            p.requires_grad_(False)

    def remove(self, key: str) -> None:
        if self._tuner is None or key not in self._tuner.peft_config:
            return
        self._tuner.delete_adapter(key)  # layers left with no adapter go back to the plain base layer
        if not self._tuner.peft_config:
            self._tuner = None
        self._refresh()

    def _refresh(self) -> None:
        self.layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
