"""How a CPU training process holds memory from one step to the next.

Two knobs, both set from inside the process:

- :func:`keep_freed_memory` (opt-in). glibc's malloc serves every allocation above its mmap
  threshold (at most 32 MiB) with a fresh ``mmap`` and returns it with ``munmap`` when freed. A
  training step on a CPU frees and allocates activations of several MiB hundreds of times, so each
  one is paid again in page faults, with the kernel zeroing every page: on a 2-core machine a 50 MB
  tensor takes about 15 ms to allocate and touch, against 3 ms when the memory is reused. Raising
  the mmap and trim thresholds lets the heap keep what a step freed for the next step; the peak
  stays what the step needs. This is the knob PyTorch's CPU performance guides reach with jemalloc
  or tcmalloc.
- :func:`cap_onednn_caches` (on import of adaptune). 16-bit matrix products on a CPU run in oneDNN,
  which keeps a compiled kernel for every operand shape it has seen, in two caches of up to 1,024
  entries each (PyTorch's ``LRU_CACHE_CAPACITY``, oneDNN's ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``):
  about half a MiB more for each new shape. Packed batches of variable length bring new shapes every
  step, so bf16 training held 11 MB more after each step on SmolLM2-135M (the benchmark's
  variable-length data), which adds up to hundreds of MB over a run. With 64 entries each, the same
  run held flat and peaked at 1,828 instead of 2,120 MB, no slower (30.1 vs 32.5 s): no sign of
  kernels evicted within a step.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["cap_onednn_caches", "keep_freed_memory", "ONEDNN_CACHE_VARIABLES"]

ONEDNN_CACHE_VARIABLES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_DONE: dict[int, bool] = {}


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Let glibc reuse freed blocks below ``limit_bytes`` instead of unmapping them.

    Process-wide and lasting; a no-op (False) where the C library is not glibc.
    """
    if limit_bytes in _DONE:
        return _DONE[limit_bytes]
    ok = False
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL("libc.so.6")
            value = ctypes.c_int(min(int(limit_bytes), 2**31 - 1))
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, value)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, value))
        except (OSError, AttributeError):
            ok = False
    _DONE[limit_bytes] = ok
    return ok


def cap_onednn_caches(capacity: int = 64) -> dict[str, str]:
    """Bound oneDNN's per-shape kernel caches to ``capacity`` entries each, unless the user set them.

    Both caches read their size from the environment when the first oneDNN product runs, so this
    must happen before that (adaptune calls it on import); later, it changes nothing. Returns the
    values the environment now holds.
    """
    for name in ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(int(capacity)))
    return {name: os.environ[name] for name in ONEDNN_CACHE_VARIABLES}
