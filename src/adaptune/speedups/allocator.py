"""How a CPU training process holds memory from one step to the next.

Two process-wide knobs, set when training starts (``speedups.applied``), never on import:

- :func:`cap_onednn_caches`. 16-bit matrix products on a CPU run in oneDNN, which keeps a compiled
  kernel for every operand shape it has seen, in two caches of up to 1,024 entries each (PyTorch's
  ``LRU_CACHE_CAPACITY``, oneDNN's ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), each entry a fraction of a
  MiB. Packed batches of variable length bring new shapes every step, so without a cap a bf16 run's
  heap grows step after step; 64 entries each hold it flat, with no sign of kernels evicted within
  a step (docs/benchmarks.md). The caches read their size when the first 16-bit product runs, so
  the cap must come before that; sizes the user set win.
- :func:`keep_freed_memory` (opt-in). glibc's malloc serves every allocation above its mmap
  threshold with a fresh ``mmap`` and returns it with ``munmap`` when freed. A training step on a
  CPU frees and allocates activations of several MiB hundreds of times, so each one is paid again
  in page faults, with the kernel zeroing every page. Raising the mmap and trim thresholds lets the
  heap keep what a step freed for the next step; the peak stays what the step needs. This is the
  knob PyTorch's CPU performance guides reach with jemalloc or tcmalloc.
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
    must happen before that (the Trainer calls it when training starts); later, it changes nothing.
    Returns the values the environment now holds.
    """
    for name in ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(int(capacity)))
    return {name: os.environ[name] for name in ONEDNN_CACHE_VARIABLES}
