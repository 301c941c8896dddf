"""Writing a GGUF file tensor by tensor, atomically, with the ``gguf`` package's own encoders.

The header lists every tensor's name, type and size before any data, so tensors are planned first
(:class:`Planned`: a name, a type, a shape and a function that makes the data) and made one at a
time while writing: a merged model never needs a second copy of itself in memory. The file is
written under a temporary name and renamed into place (``adaptune.atomic``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import ConfigError

# --quant value -> (ggml type name for 2-D weights, general.file_type)
QUANTS: dict[str, tuple[str, int]] = {
    "f32": ("F32", 0),
    "f16": ("F16", 1),
    "bf16": ("BF16", 32),
    "q8_0": ("Q8_0", 7),
}


def ggml_type(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def weight_type(quant: str, gguf_name: str, shape: tuple[int, ...]):
    """The type llama.cpp's converter gives this tensor at ``quant``: vectors (norms, biases) stay
    F32; a weight whose rows do not split into whole quant blocks falls back to F16."""
    import gguf

    if len(shape) < 2 or not gguf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    qtype = ggml_type(QUANTS[quant][0])
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16
    return qtype


def encode(data: np.ndarray, qtype) -> np.ndarray:
    """float data -> the bytes (or float array) GGUF stores for ``qtype``."""
    import gguf

    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    try:
        return gguf.quants.quantize(data, qtype)
    except NotImplementedError:
        raise ConfigError(f"the gguf package cannot write {qtype.name} tensors; choose --quant f16, bf16 or "
                          f"q8_0") from None


def nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


@dataclass
class Planned:
    """One tensor of the file: ``make()`` returns exactly what is stored (numpy shape ``shape``)."""

    name: str
    shape: tuple[int, ...]  # numpy order (rows, columns), as a float tensor
    qtype: object  # gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]


def write_gguf(path: str | Path, arch: str, metadata: Callable[[object], None],
               tensors: Iterable[Planned]) -> int:
    """Write a GGUF file: ``metadata(writer)`` adds the key/values, then the planned tensors.

    Returns the file size in bytes."""
    import gguf

    tensors = list(tensors)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            metadata(writer)
            for t in tensors:
                raw = None if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else t.qtype
                dtype = {gguf.GGMLQuantizationType.F32: np.float32,
                         gguf.GGMLQuantizationType.F16: np.float16}.get(t.qtype, np.float32)
                writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), nbytes(t.shape, t.qtype), raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                data = t.make()
                expected = nbytes(t.shape, t.qtype)
                if data.nbytes != expected:
                    raise AssertionError(f"{t.name}: made {data.nbytes} bytes, planned {expected}")
                writer.write_tensor_data(data)
            writer.flush()
        finally:
            writer.close()
        return tmp.stat().st_size
