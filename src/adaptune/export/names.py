"""Which llama.cpp architecture a transformers model is, and where each of its weights goes there.

llama.cpp names tensors ``blk.N.attn_q.weight`` etc.; the ``gguf`` package's ``TensorNameMap`` knows
the transformers names of each, so the map is taken from there rather than written out again.

Two layout changes happen on the way, exactly as llama.cpp's ``convert_hf_to_gguf.py`` makes them:

* Llama-family ``q_proj``/``k_proj`` rows are permuted (:func:`permute_rows`). transformers rotates
  the two halves of each head (``rotate_half``); llama.cpp's rope rotates neighbouring pairs, so the
  conversion interleaves the halves. transformers' GGUF loader undoes it on the way back. A LoRA on
  q or k changes those rows, so its B matrix must be permuted the same way.
* GPT-2's ``Conv1D`` stores weights as (in, out); llama.cpp wants (out, in), so they are transposed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Arch:
    """How one transformers ``model_type`` becomes a llama.cpp architecture."""

    model_type: str
    gguf_arch: str  # general.architecture in the GGUF file
    permute_qk: bool  # Llama-style q/k row interleaving
    conv1d: bool = False  # GPT-2: 2-D weights stored (in, out)


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", "llama", permute_qk=True),
    "mistral": Arch("mistral", "llama", permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": Arch("qwen2", "qwen2", permute_qk=False),
    "gpt2": Arch("gpt2", "gpt2", permute_qk=False, conv1d=True),
}

SUPPORTED = "Llama (SmolLM, Llama 2/3), Mistral, Qwen2 and GPT-2"


def arch_of(config: Any) -> Arch:
    """The :class:`Arch` of a transformers config; ConfigError naming what is supported otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ConfigError(f"export to GGUF supports {SUPPORTED} models (model_type "
                          f"{', '.join(sorted(ARCHS))}), not model_type {model_type!r}")
    return ARCHS[model_type]


def head_counts(config: Any) -> tuple[int, int]:
    """(attention heads, key/value heads)."""
    n_head = getattr(config, "num_attention_heads", None) or config.n_head
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    return int(n_head), int(n_kv)


def block_count(config: Any) -> int:
    return int(getattr(config, "num_hidden_layers", None) or config.n_layer)


class NameMap:
    """transformers parameter / module names -> llama.cpp tensor names for one model."""

    def __init__(self, arch: Arch, n_blocks: int) -> None:
        import gguf

        self.arch = arch
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_arch)
        self._map = gguf.get_tensor_name_map(arch_id, n_blocks)

    def tensor(self, hf_name: str) -> str | None:
        """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight`` (None if unknown)."""
        return self._map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def module_weight(self, hf_module: str) -> str | None:
        """``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``: the weight a LoRA changes."""
        return self.tensor(hf_module + ".weight")


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k permutation: per head, rows (h0 h1 .. | g0 g1 ..) -> (h0 g0 h1 g1 ..).

    Works on any tensor whose first dimension is the output rows (a weight, a bias, a LoRA B)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ConfigError(f"cannot permute {rows} rows into {n_head} rotary heads")
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_rows` (what transformers' GGUF loader does)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def qk_heads(arch: Arch, gguf_name: str, config: Any) -> int | None:
    """How many heads to permute the rows of ``gguf_name`` by (None: no permutation)."""
    if not arch.permute_qk:
        return None
    n_head, n_kv = head_counts(config)
    if ".attn_q." in gguf_name:
        return n_head
    if ".attn_k." in gguf_name:
        return n_kv
    return None


def to_gguf_layout(arch: Arch, gguf_name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    """A transformers weight (or bias) in the layout llama.cpp reads under ``gguf_name``."""
    heads = qk_heads(arch, gguf_name, config)
    if heads is not None:
        tensor = permute_rows(tensor, heads)
    if arch.conv1d and tensor.dim() == 2 and gguf_name.startswith("blk.") and gguf_name.endswith(".weight"):
        tensor = tensor.t()
    return tensor.contiguous()


def gguf_shape(arch: Arch, gguf_name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The numpy shape :func:`to_gguf_layout` gives a tensor of transformers shape ``shape``."""
    if arch.conv1d and len(shape) == 2 and gguf_name.startswith("blk.") and gguf_name.endswith(".weight"):
        return (shape[1], shape[0])
    return tuple(shape)


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """float32 numpy copy (bf16 tensors cannot go to numpy directly)."""
    return tensor.detach().to(torch.float32).cpu().numpy()
