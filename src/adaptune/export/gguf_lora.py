"""A LoRA-only GGUF adapter, as llama.cpp's ``convert_lora_to_gguf.py`` writes it.

``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and one tensor pair per
adapted weight, named after it: ``blk.N.attn_q.weight.lora_a`` (r, in) and ``...lora_b`` (out, r).
llama.cpp loads it with ``--lora`` next to the base GGUF.

llama.cpp applies ``scale = alpha / rank`` to every pair, with one alpha for the file and the rank
read from each pair. adaptune's scale can differ per layer (``rank_pattern``, ``alpha_pattern``) and
with rsLoRA is ``alpha / sqrt(rank)``, so whatever differs from ``alpha / rank`` is folded into B.
For a plain adapter the factor is exactly 1 and the tensors are written as trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .adapter import MERGED_HINT, LoraPair
from .names import Arch, NameMap, as_numpy, block_count, permute_rows, qk_heads
from .writer import QUANTS, Planned, encode, weight_type, write_gguf


def llama_cpp_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp gives a pair of this rank (llama-graph.cpp: alpha 0 means no scaling)."""
    return alpha / rank if alpha else 1.0


def gguf_pairs(pairs: list[LoraPair], arch: Arch, config: Any, alpha: float,
               base_tensors: set[str] | None = None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(llama.cpp weight name, lora_a, lora_b) per pair, in llama.cpp's layout and scaling."""
    names = NameMap(arch, block_count(config))
    out = []
    for pair in pairs:
        target = names.module_weight(pair.module)
        if target is None:
            raise ConfigError(f"the adapter changes {pair.module}, which has no llama.cpp tensor to attach a LoRA "
                              f"to; {MERGED_HINT}")
        if base_tensors is not None and target not in base_tensors:
            hint = " (the output head is tied to the embeddings there)" if target == "output.weight" else ""
            raise ConfigError(f"the adapter changes {pair.module}, but the base GGUF has no {target}{hint}; "
                              f"{MERGED_HINT}")
        b = pair.b * (pair.scale / llama_cpp_scale(alpha, pair.rank))
        a = pair.a
        if pair.embedding:
            # llama.cpp looks up rows of A for the token ids, then multiplies by B (llm_build_inp_embd)
            a = a.t()
        else:
            heads = qk_heads(arch, target, config)
            if heads is not None:
                b = permute_rows(b, heads)
        out.append((target, a.contiguous(), b.contiguous()))
    return out


def write_lora_gguf(path: str | Path, pairs: list[LoraPair], arch: Arch, config: Any, alpha: float,
                    quant: str = "f32", name: str | None = None, base_tensors: set[str] | None = None) -> int:
    """Write the adapter GGUF; returns its size in bytes."""
    import gguf

    triples = gguf_pairs(pairs, arch, config, alpha, base_tensors)
    planned = []
    for target, a, b in triples:
        for suffix, t in (("lora_a", a), ("lora_b", b)):
            qtype = weight_type(quant, target, tuple(t.shape))
            planned.append(Planned(f"{target}.{suffix}", tuple(t.shape), qtype,
                                   lambda t=t, q=qtype: encode(as_numpy(t), q)))

    def metadata(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        if name:
            writer.add_name(name)
        writer.add_file_type(QUANTS[quant][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return write_gguf(path, arch.gguf_arch, metadata, planned)
