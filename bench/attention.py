"""Attention over packed rows, forward + backward: adaptune's packed_sdpa_forward vs transformers' sdpa.

    python bench/attention.py              # SmolLM2-135M's attention shapes, ~1 min on 2 cores
    python bench/attention.py --reps 100

A packed row holds several examples back to back. transformers' ``sdpa`` keeps them apart with a
block-diagonal causal mask over the whole row (what a packed batch gets without adaptune);
adaptune's ``packed_sdpa_forward`` runs causal attention per example (``adaptune/attention.py``).
Both get the same query/key/value (9 query heads, 3 key/value heads, 64 wide, fp32, the query
laid out as a q_proj output is), the same output gradient, and must give the same output and
input gradients. Timed: one forward + backward of one layer's attention, the two alternating,
repeat by repeat; printed: median times and the median of the per-repeat ratios (transformers'
time / adaptune's), with the middle 80% of those ratios.

Rows: ``var`` rows of 8 examples of 8-90 tokens (about the bench's variable-length batches,
seeded), and full rows of 4 x 128 and 8 x 128 tokens (``bench/train.py``'s full blocks in
512-token micro-batches and in whole 1,024-token batches).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from adaptune.speedups.attention import packed_sdpa_forward

HEADS, KV_HEADS, DIM = 9, 3, 64


def rows() -> dict[str, list[int]]:
    rng = random.Random(0)
    return {"var 8 examples (a)": [rng.randint(8, 90) for _ in range(8)],
            "var 8 examples (b)": [rng.randint(8, 90) for _ in range(8)],
            "full 4 x 128": [128] * 4, "full 8 x 128": [128] * 8}


def inputs(lengths: list[int]):
    width = sum(lengths)
    g = torch.Generator().manual_seed(width)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    query = torch.randn(1, width, HEADS, DIM, generator=g).transpose(1, 2)  # as q_proj(x).view(...).transpose(1, 2)
    key, value = (torch.randn(1, KV_HEADS, width, DIM, generator=g) for _ in range(2))
    example = torch.cumsum((position_ids == 0).long(), dim=1)[0]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = ((example[:, None] == example[None, :]) & causal)[None, None]  # block-diagonal causal
    grad = torch.randn(1, width, HEADS, DIM, generator=g)
    return [t.requires_grad_() for t in (query, key, value)], position_ids, mask, grad


def attention_module() -> torch.nn.Module:
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, HEADS // KV_HEADS
    return module.train()


def forward_backward(kind: str, module, qkv, position_ids, mask, grad):
    if kind == "adaptune":
        out, _ = packed_sdpa_forward(module, *qkv, None, position_ids=position_ids, scaling=DIM ** -0.5)
    else:
        out, _ = sdpa_attention_forward(module, *qkv, mask, scaling=DIM ** -0.5)
    out.backward(grad)
    grads = [t.grad for t in qkv]
    for t in qkv:
        t.grad = None
    return out.detach(), grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=40, help="alternating repeats per row (default 40)")
    args = ap.parse_args()
    torch.manual_seed(0)
    module = attention_module()
    print(f"torch threads {torch.get_num_threads()}; one layer's attention, forward + backward, fp32")
    for name, lengths in rows().items():
        qkv, position_ids, mask, grad = inputs(lengths)
        ours, theirs = (forward_backward(k, module, qkv, position_ids, mask, grad) for k in ("adaptune", "sdpa"))
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(ours[1], theirs[1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        times: dict[str, list[float]] = {"adaptune": [], "sdpa": []}
        for rep in range(args.reps):
            for kind in ("adaptune", "sdpa") if rep % 2 == 0 else ("sdpa", "adaptune"):
                t = time.perf_counter()
                forward_backward(kind, module, qkv, position_ids, mask, grad)
                times[kind].append(time.perf_counter() - t)
        ratios = sorted(s / a for s, a in zip(times["sdpa"], times["adaptune"]))
        cut = len(ratios) // 10
        print(f"{name:20} {sum(lengths):5} tokens: adaptune {1e3 * statistics.median(times['adaptune']):6.2f} ms, "
              f"transformers sdpa + mask {1e3 * statistics.median(times['sdpa']):6.2f} ms; "
              f"ratio x{statistics.median(ratios):.2f} [{ratios[cut]:.2f}-{ratios[-cut - 1]:.2f}], same results")


if __name__ == "__main__":
    main()
