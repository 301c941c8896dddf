"""The merged model (base + adapter folded in) as one self-contained GGUF file.

Two ways, by where the base came from:

* a GGUF file (the embedded default is one): the file is rebuilt around the source. Its metadata
  (tokenizer, chat template, special tokens, hyper-parameters) is copied as it is and its tensors
  keep their names and order. With ``--quant source`` a tensor the merge left unchanged is copied
  byte for byte, and a changed one is re-encoded in its original type (Q4_1 for the embedded
  default) by the ``gguf`` package's quantizers. Whether a tensor changed is decided by comparing it
  with the source's own dequantized values, so everything a merge can touch counts, not only the
  layers the adapter lists.
* a transformers folder or hub id: the metadata is built from the config and tokenizer
  (``hparams.py``, ``vocab.py``), as llama.cpp's ``convert_hf_to_gguf.py`` builds it.

Other ``--quant`` values give every weight one type, vectors staying F32, as llama.cpp's converter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from .hparams import add_hparams, extra_tensors
from .names import Arch, NameMap, as_numpy, block_count, gguf_shape, to_gguf_layout
from .vocab import add_tokenizer
from .writer import QUANTS, Planned, encode, weight_type, write_gguf

# transformers buffers that are not weights (GPT-2's causal mask in older checkpoints)
_NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def gguf_state(model: torch.nn.Module, arch: Arch) -> dict[str, tuple[str, torch.Tensor]]:
    """{llama.cpp tensor name: (transformers name, tensor)} for a plain (merged) transformers model.

    A head tied to the embeddings is left out, as llama.cpp's converter leaves it out."""
    names = NameMap(arch, block_count(model.config))
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for hf_name, tensor in model.state_dict(keep_vars=True).items():
        if hf_name.endswith(_NOT_WEIGHTS):
            continue
        target = names.tensor(hf_name)
        if target is None:
            raise ConfigError(f"{hf_name} has no place in a llama.cpp {arch.gguf_arch} model, so the merged model "
                              f"cannot be written as GGUF")
        if target == "output.weight" and head_is_tied(model):
            continue
        out[target] = (hf_name, tensor.detach())
    return out


def head_is_tied(model: torch.nn.Module) -> bool:
    """Whether the output head is the embedding matrix itself (one tensor, llama.cpp reuses it)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def _layout(state: dict, arch: Arch, config: Any, name: str) -> np.ndarray:
    """The merged tensor ``name`` in llama.cpp's layout, made when it is written."""
    return as_numpy(to_gguf_layout(arch, name, state[name][1], config))


def plan_from_model(model: torch.nn.Module, arch: Arch, quant: str) -> list[Planned]:
    """Every weight of a transformers model at one quant type."""
    state = gguf_state(model, arch)
    planned = []
    for name, (_, tensor) in state.items():
        shape = gguf_shape(arch, name, tuple(tensor.shape))
        qtype = weight_type(quant, name, shape)
        planned.append(Planned(name, shape, qtype,
                               lambda n=name, q=qtype: encode(_layout(state, arch, model.config, n), q)))
    for name, tensor in extra_tensors(arch, model.config).items():
        planned.append(Planned(name, tuple(tensor.shape), weight_type("f32", name, tuple(tensor.shape)),
                               lambda t=tensor: as_numpy(t)))
    return planned


def plan_from_source(reader: Any, model: torch.nn.Module, arch: Arch, quant: str) -> list[Planned]:
    """The source GGUF's tensors, in its order, with the merged model's values."""
    state = gguf_state(model, arch)
    planned = []
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.name not in state:  # in the file but not a model weight, e.g. Llama 3.1's rope_freqs
            if quant == "source":
                planned.append(Planned(t.name, shape, t.tensor_type, _copy(t)))
            else:
                qtype = weight_type(quant, t.name, shape)
                dequantized = _dequantized(t, shape)
                planned.append(Planned(t.name, shape, qtype, lambda m=dequantized, q=qtype: encode(m(), q)))
            continue
        merged_shape = gguf_shape(arch, t.name, tuple(state[t.name][1].shape))
        if merged_shape != shape:
            raise ConfigError(f"the model's {state[t.name][0]} has shape {merged_shape} but the source "
                              f"GGUF's {t.name} has {shape}: is --model the GGUF the adapter was trained on?")
        qtype = t.tensor_type if quant == "source" else weight_type(quant, t.name, shape)
        merged = functools.partial(_layout, state, arch, model.config, t.name)
        planned.append(Planned(t.name, shape, qtype, _source_or_merged(t, shape, merged, qtype, quant)))
    for name in sorted(state.keys() - {t.name for t in reader.tensors}):  # e.g. a head the adapter untied
        shape = gguf_shape(arch, name, tuple(state[name][1].shape))
        qtype = weight_type("q8_0" if quant == "source" else quant, name, shape)  # no source type to keep
        planned.append(Planned(name, shape, qtype,
                               lambda n=name, q=qtype: encode(_layout(state, arch, model.config, n), q)))
    return planned


def _copy(t) -> Callable[[], np.ndarray]:
    return lambda: np.asarray(t.data)


def _dequantized(t, shape) -> Callable[[], np.ndarray]:
    import gguf

    return lambda: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)


def _source_or_merged(t, shape, merged: Callable[[], np.ndarray], qtype, quant: str) -> Callable[[], np.ndarray]:
    """With --quant source, an unchanged tensor is copied as stored (no second rounding)."""
    def make() -> np.ndarray:
        values = merged()
        if quant == "source" and np.array_equal(_dequantized(t, shape)(), values):
            return np.asarray(t.data)
        return encode(values, qtype)
    return make


def copy_metadata(reader: Any, writer: Any, file_type: int | None) -> None:
    """Every key/value of the source except the file layout's own and the file type."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
            continue
        if key == gguf.Keys.General.FILE_TYPE and file_type is not None:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY and len(value) == 0:
            continue
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    if file_type is not None:
        writer.add_file_type(file_type)


def write_merged_gguf(path: str | Path, model: torch.nn.Module, tokenizer: Any, arch: Arch, quant: str,
                      source_gguf: str | Path | None = None, name: str | None = None) -> int:
    """Write the merged model; returns the file size in bytes."""
    import gguf

    if quant == "source" and source_gguf is None:
        raise ConfigError("--quant source keeps the types of a GGUF base; this base is not a GGUF file "
                          f"(choose one of {', '.join(QUANTS)})")
    if source_gguf is not None:
        reader = gguf.GGUFReader(str(source_gguf))
        src_arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
        if src_arch != arch.gguf_arch:
            raise ConfigError(f"the source GGUF is a {src_arch!r} model, expected {arch.gguf_arch!r}")
        planned = plan_from_source(reader, model, arch, quant)
        file_type = None if quant == "source" else QUANTS[quant][1]
        return write_gguf(path, arch.gguf_arch, lambda w: copy_metadata(reader, w, file_type), planned)

    planned = plan_from_model(model, arch, quant)

    def metadata(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        if name:
            writer.add_name(name)
        add_hparams(writer, arch, model.config)
        writer.add_file_type(QUANTS[quant][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, int(model.config.vocab_size))

    return write_gguf(path, arch.gguf_arch, metadata, planned)
