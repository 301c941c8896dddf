"""An adapter folder read as the plain low-rank pairs a LoRA GGUF can carry.

Each adapted layer becomes one :class:`LoraPair`: A (r, in), B (out, r) and the scale its update is
multiplied by, already resolved per layer from ``r``/``lora_alpha``, ``rank_pattern``/``alpha_pattern``
and rsLoRA, the way adaptune's (and peft's) LoRA layers resolve it. Everything a LoRA GGUF cannot
express is refused here with the reason and what to use instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import LoraConfig, PeftConfig
from ..errors import AdapterFileError, ConfigError
from ..tuners.files import read_adapter_tensors
from ..tuners.lora.files import PREFIX
from ..tuners.targets import pattern_key

MERGED_HINT = "use --format gguf (the merged model), which carries it"


@dataclass
class LoraPair:
    """One adapted layer: ``delta W = scale * B @ A`` (for an embedding: rows of ``(B @ A).T``)."""

    module: str  # transformers module path, e.g. model.layers.0.self_attn.q_proj
    a: torch.Tensor  # (r, in); for an embedding (r, num_embeddings)
    b: torch.Tensor  # (out, r); for an embedding (embedding_dim, r)
    scale: float
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def read_config(adapter_dir: str | Path) -> PeftConfig:
    """The adapter's config; a missing or broken folder is one AdapterFileError line."""
    folder = Path(adapter_dir)
    if not folder.exists():
        raise AdapterFileError(f"adapter folder {folder} does not exist")
    if not folder.is_dir():
        raise AdapterFileError(f"--adapter {folder} is a file; pass the adapter folder (with adapter_config.json)")
    return PeftConfig.from_pretrained(folder)


def refuse_prompt_learning(config: PeftConfig) -> None:
    if config.is_prompt_learning:
        raise ConfigError(f"{config.peft_type} adapters add trained virtual tokens in front of the input, which "
                          "neither a LoRA GGUF nor a merged GGUF can carry (llama.cpp has no place for them); "
                          "only LoRA adapters can be exported")


def read_pairs(adapter_dir: str | Path, config: LoraConfig, allow_pickle: bool = False) -> list[LoraPair]:
    """The adapter's layers as LoRA pairs; ConfigError for what a LoRA GGUF cannot hold."""
    if config.use_dora:
        raise ConfigError(f"DoRA adapters scale each weight row by a trained magnitude, which a llama.cpp LoRA "
                          f"GGUF cannot express; {MERGED_HINT}")
    if config.bias != "none":
        raise ConfigError(f"this adapter trains biases (bias={config.bias!r}), which a llama.cpp LoRA GGUF cannot "
                          f"hold; {MERGED_HINT}")
    tensors = read_adapter_tensors(Path(adapter_dir), allow_pickle=allow_pickle)
    extra = sorted(k for k in tensors if ".lora_" not in k)
    if extra:
        raise ConfigError(f"this adapter stores whole tensors besides its LoRA pairs (e.g. {extra[0]}, from "
                          f"modules_to_save), which a llama.cpp LoRA GGUF cannot hold; {MERGED_HINT}")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterFileError(f"{adapter_dir}: unexpected tensor name {key} (peft names start with {PREFIX})")
        module, part = key[len(PREFIX):].rsplit(".lora_", 1)
        groups.setdefault(module, {})[part] = value
    pairs = [_pair(module, parts, config, adapter_dir) for module, parts in sorted(groups.items())]
    if not pairs:
        raise AdapterFileError(f"{adapter_dir}: the adapter holds no LoRA tensors")
    return pairs


def _pair(module: str, parts: dict[str, torch.Tensor], config: LoraConfig, source) -> LoraPair:
    embedding = "embedding_A" in parts
    a = parts.get("embedding_A" if embedding else "A.weight")
    b = parts.get("embedding_B" if embedding else "B.weight")
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterFileError(f"{source}: {module} lacks a matching lora_A / lora_B pair")
    r = int(a.shape[0])
    r_key = pattern_key(config.rank_pattern, module)
    expected_r = config.rank_pattern[r_key] if r_key else config.r
    if r != expected_r:
        raise AdapterFileError(f"{source}: {module} has rank {r} but adapter_config.json says {expected_r}")
    a_key = pattern_key(config.alpha_pattern, module)
    alpha = float(config.alpha_pattern[a_key] if a_key else config.lora_alpha)
    scale = alpha / (math.sqrt(r) if config.use_rslora else r)
    return LoraPair(module, a.to(torch.float32), b.to(torch.float32), scale, embedding)
