"""Keep freed memory in the process during CPU training, instead of giving it back to the OS each time.

glibc's malloc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed. A training step on a CPU frees and allocates
activations of several MiB hundreds of times, so each one is paid again in page faults, with the
kernel zeroing every page: on a 2-core machine a 50 MB tensor takes about 15 ms to allocate and
touch, against 3 ms when the memory is reused. Raising the mmap and trim thresholds lets the heap
keep what a step freed for the next step; the peak stays what the step needs. This is the knob
PyTorch's CPU performance guides reach with jemalloc or tcmalloc, set from inside the process.
"""

from __future__ import annotations

import ctypes
import platform
import sys

__all__ = ["keep_freed_memory"]

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
