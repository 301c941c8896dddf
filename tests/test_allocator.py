"""adaptune.speedups.allocator: glibc keeping freed memory, and oneDNN's kernel caches bounded when training
starts (never on import)."""

from __future__ import annotations

import ctypes.util
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from adaptune.speedups.allocator import ONEDNN_CACHE_VARIABLES

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Inside the Trainer's speed-up block: bf16 products of 400 different row counts; the heap in use after 200 of
# them and after 400.
PROBE = r"""
import ctypes, json, os
import torch
from adaptune.speedups import Speedups, applied

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def in_use_mb():
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20

weight = torch.randn(512, 256, dtype=torch.bfloat16)
marks = []
with applied(torch.nn.Linear(2, 2), Speedups()):
    for rows in range(1, 401):
        torch.mm(torch.ones(rows, 256, dtype=torch.bfloat16), weight.t())
        if rows in (200, 400):
            marks.append(in_use_mb())
print(json.dumps({"growth_mb": marks[1] - marks[0],
                  "env": {k: os.environ.get(k) for k in VARIABLES}}))
""".replace("VARIABLES", repr(ONEDNN_CACHE_VARIABLES))


def _probe(env: dict[str, str]) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHE_VARIABLES}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _has_mallinfo2() -> bool:
    return GLIBC and hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallinfo2")


@pytest.mark.skipif(not (_has_mallinfo2() and torch.backends.mkldnn.is_available()),
                    reason="needs glibc's mallinfo2 and a oneDNN build of torch")
def test_training_start_bounds_onednn_kernel_caches_unless_the_user_sized_them():
    capped = _probe({})
    assert capped["env"] == {k: "64" for k in ONEDNN_CACHE_VARIABLES}
    # The user's own sizes win; with torch's default size, new shapes keep adding memory.
    own = _probe({k: "1024" for k in ONEDNN_CACHE_VARIABLES})
    assert own["env"] == {k: "1024" for k in ONEDNN_CACHE_VARIABLES}
    if own["growth_mb"] < 20:
        pytest.skip(f"bf16 products here do not cache kernels per shape ({own['growth_mb']:.1f} MB)")
    assert capped["growth_mb"] < 5, capped


def test_keep_freed_memory_is_idempotent_and_reports_whether_it_applied():
    from adaptune.speedups.allocator import keep_freed_memory

    assert keep_freed_memory() is GLIBC
    assert keep_freed_memory() is GLIBC
    # memory freed and allocated again still reads and writes correctly
    for _ in range(3):
        big = torch.ones(8 << 20)
        assert float(big.sum()) == 8 << 20
        del big


def test_importing_adaptune_changes_no_environment_variable():
    probe = ("import json, os; before = dict(os.environ); import adaptune, adaptune.cli, adaptune.training.trainer; "
             "print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))")
    clean = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHE_VARIABLES}
    out = subprocess.run([sys.executable, "-c", probe], env=clean, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
