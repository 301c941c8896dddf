"""Where one LoRA training step's memory and time go, on SmolLM2-135M (adaptune only, no peer).

    python bench/step_profile.py                  # 8 x 128 tokens, LoRA r=8 dropout 0.05 on q/v
    python bench/step_profile.py --tokens 512
    python bench/step_profile.py --ops           # where one step's time goes, op by op

A diagnostic behind bench/train.py's numbers, not a comparison. For each setting it prints:

- what autograd keeps for backward after the forward (the model's own weights left out), from a
  walk over the graph's saved tensors (:mod:`torch.autograd.graph` hooks), with the fused
  paths off (plain ``nn.Dropout`` + ``lora_A``; the MLP's own ``silu(gate) * up``) and on;
- median step time over a few steps and minor page faults per step, with freed memory returned
  to the OS as glibc does by default, and kept (``adaptune.speedups.allocator.keep_freed_memory``). Each
  allocator setting runs in a fresh process (a mallopt cannot be undone), after the model loads,
  and reports the loop's peak RSS too.

With ``--ops`` it prints instead where the time of one step goes (the Trainer's defaults: fused
paths, packed attention): the share of matrix products and their GFLOP/s against this machine's
fp32 GEMM speed measured in the same run, attention, dropout masks and the other ops, the
biggest products by shape with their rates in the step and alone (the same shapes timed again
back to back, caches hot), the useful rate as bench/train.py counts it (4 N FLOP a token), and
that rate's ceilings: what it would be if every op but the products (and the attention kernels,
whose work the 4 N count leaves out) took no time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402


def build(tokens: int, fused: bool):
    from adaptune import LoraConfig, get_peft_model
    from adaptune.hub import load_model
    from adaptune.speedups.swiglu import fuse_gated_mlps, unfuse_gated_mlps

    torch.manual_seed(0)
    model = load_model(None, dtype=torch.float32)
    model.config.use_cache = False
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                  target_modules=["q_proj", "v_proj"]))
    (fuse_gated_mlps if fused else unfuse_gated_mlps)(peft_model)
    peft_model.train()
    rows = max(1, tokens // 128)
    ids = torch.randint(0, model.config.vocab_size, (rows, 128))
    return peft_model, {"input_ids": ids, "labels": ids.clone()}


def saved_mb(model, inputs, fused: bool) -> float:
    """MB autograd keeps for backward after one forward, weights excluded."""
    from adaptune.speedups.loss import causal_lm_loss

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    if not fused:  # plain path: an nn.Dropout followed by lora_A, as peft does it
        from adaptune.tuners.lora import layer as lora_module

        original = lora_module.dropout_linear
        lora_module.dropout_linear = lambda x, w, p: torch.nn.functional.linear(
            torch.nn.functional.dropout(x, p, training=True), w)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = causal_lm_loss(model, inputs, None)
    finally:
        if not fused:
            lora_module.dropout_linear = original
    del loss
    return sum(storages.values()) / 2**20


def train_step(model, inputs):
    """A function running one LoRA training step (chunked loss, backward, AdamW) on ``inputs``."""
    from adaptune.speedups.loss import causal_lm_loss

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss, _ = causal_lm_loss(model, inputs, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, n: int) -> list[float]:
    """Seconds each of ``n`` calls of ``step`` took."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def child(tokens: int, keep: bool, steps: int) -> dict:
    from adaptune.speedups.allocator import keep_freed_memory

    model, inputs = build(tokens, fused=True)
    if keep:
        keep_freed_memory()
    step = train_step(model, inputs)
    step()
    common.reset_peak_rss()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = timed(step, steps)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps
    return {"keep": keep, "step_s": statistics.median(times), "faults_per_step": faults,
            "peak_rss_mb": common.peak_rss_mb(), "tok_s": inputs["input_ids"].numel() / statistics.median(times)}


def alone_seconds(op: str, shapes: list, repeats: int = 15) -> float | None:
    """Median time of one ``mm`` of these operand shapes run alone, back to back (hot caches,
    contiguous operands): how fast the product can go on this machine. None for other ops."""
    if op != "aten::mm" or len(shapes) < 2 or len(shapes[0]) != 2 or len(shapes[1]) != 2:
        return None
    a, b = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    out = torch.empty(a.shape[0], b.shape[1])
    torch.mm(a, b, out=out)
    return statistics.median(timed(lambda: torch.mm(a, b, out=out), repeats))


def op_profile(tokens: int) -> None:
    """Time shares of one training step by kind of op (torch.profiler), and the GEMM rates."""
    from torch.profiler import ProfilerActivity, profile

    from adaptune.speedups.attention import packed_attention
    from adaptune.speedups.fused import fuse_rms_norms

    model, inputs = build(tokens, fused=True)
    fuse_rms_norms(model)
    inputs["position_ids"] = torch.arange(128).repeat(inputs["input_ids"].shape[0], 1)
    n_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    step = train_step(model, inputs)
    gemm = common.matmul_gflops()
    with packed_attention(model):
        timed(step, 2)  # warm-up
        times = timed(step, 3)
        with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    kinds = {"matrix products (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
             "attention kernels": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                   "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
             "dropout masks (random numbers)": ("aten::random_", "aten::uniform_")}
    step_s = statistics.median(times)
    useful = 4 * n_params * tokens / step_s / 1e9
    print(f"{tokens} tokens a step: {step_s:.2f} s; fp32 GEMM {gemm:.0f} GFLOP/s measured now; useful "
          f"{useful:.0f} GFLOP/s = {100 * useful / gemm:.0f}% of it (4 N FLOP a token, N = {n_params / 1e6:.1f}M)")
    seen = set()
    for kind, names in kinds.items():
        picked = [e for e in events if e.key in names]
        seen.update(e.key for e in picked)
        t = sum(e.self_cpu_time_total for e in picked)
        flops = sum(e.flops for e in picked)
        rate = f", {flops / t / 1e3:.0f} GFLOP/s = {100 * flops / t / 1e3 / gemm:.0f}% of GEMM" if flops else ""
        print(f"  {kind:34}: {100 * t / total:4.1f}% of the step{rate}")
    rest = sorted((e for e in events if e.key not in seen), key=lambda e: -e.self_cpu_time_total)
    rest_share = 100 * sum(e.self_cpu_time_total for e in rest) / total
    most = ", ".join(f"{e.key.replace('aten::', '')} {100 * e.self_cpu_time_total / total:.1f}%" for e in rest[:6])
    print(f"  {'everything else':34}: {rest_share:4.1f}%, most: {most}")
    print("  the biggest products by shape (operands), their share of the step and rate:")
    products = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.key in kinds[next(iter(kinds))]),
                      key=lambda e: -e.self_cpu_time_total)
    alone = {id(e): alone_seconds(e.key, e.input_shapes) for e in products}
    for e in products[:8]:
        t = e.self_cpu_time_total
        shapes = " x ".join(str(s) for s in e.input_shapes[:2])
        rate_alone = e.flops / e.count / alone[id(e)] / 1e9 if alone[id(e)] else float("nan")
        print(f"    {e.key.replace('aten::', ''):5} {shapes:28} x{e.count:<4} {100 * t / total:4.1f}%  "
              f"{e.flops / t / 1e3:4.0f} GFLOP/s = {100 * e.flops / t / 1e3 / gemm:3.0f}% of GEMM "
              f"(alone: {100 * rate_alone / gemm:3.0f}%)")
    # What the useful rate would be if the other work took no time: the step's own products (as timed
    # in it, and as fast as each shape runs alone and hot) plus its attention kernels, which do work
    # the 4 N count leaves out.
    step_us = step_s * 1e6
    products_us = sum(e.self_cpu_time_total for e in products) * step_us / total
    attention_us = sum(e.self_cpu_time_total for e in events if e.key in kinds["attention kernels"]) * step_us / total
    products_alone_us = sum(e.count * alone[id(e)] * 1e6 if alone[id(e)] else e.self_cpu_time_total * step_us / total
                            for e in products)
    useful_flop = 4 * n_params * tokens
    for label, us in (("the products as timed in the step", products_us),
                      ("+ the attention kernels", products_us + attention_us),
                      ("the products at their rate alone + attention", products_alone_us + attention_us)):
        print(f"  ceiling, if all else took no time, {label:45}: {100 * useful_flop / us / 1e3 / gemm:3.0f}% of GEMM")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="tokens a step, in 128-token rows (default 1024)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per allocator setting (default 5)")
    p.add_argument("--child", choices=["default", "keep"], help=argparse.SUPPRESS)
    p.add_argument("--ops", action="store_true", help="where one step's time goes, op by op (no memory runs)")
    args = p.parse_args()
    if args.ops:
        op_profile(args.tokens)
        return
    if args.child:
        print("RESULT " + json.dumps(child(args.tokens, args.child == "keep", args.steps)), flush=True)
        return

    print(f"SmolLM2-135M fp32, LoRA r=8 dropout 0.05 on q_proj/v_proj, {args.tokens} tokens a step, "
          f"load {common.load_average()}", flush=True)
    for fused in (False, True):
        model, inputs = build(args.tokens, fused)
        print(f"kept for backward, fused paths {'on ' if fused else 'off'}: {saved_mb(model, inputs, fused):7.1f} MB",
              flush=True)
        del model
    for setting in ("default", "keep"):
        out = subprocess.run([sys.executable, __file__, "--child", setting, "--tokens", str(args.tokens),
                              "--steps", str(args.steps)], capture_output=True, text=True, check=True).stdout
        r = json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][7:])
        print(f"allocator {setting:7}: {r['step_s']:.2f} s a step ({r['tok_s']:.0f} tok/s), "
              f"{r['faults_per_step']:,.0f} page faults a step, peak RSS {r['peak_rss_mb']:,.0f} MB", flush=True)


if __name__ == "__main__":
    main()
