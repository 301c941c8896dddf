"""LoRA training, side by side: adaptune (its Trainer, packing, chunked loss) vs peft + transformers.Trainer.

    python bench/train.py                  # peft, adaptune, adaptune-whole on both data sets (~8 min, 2 cores)
    python bench/train.py --summary "bench/results/train-*.json"   # medians and spread of saved runs
    python bench/train.py --bf16           # the same with bf16 autocast for every tool (bf16=True)

Setup, the same for every tool: the embedded SmolLM2-135M-Instruct in fp32
(``adaptune.hub.load_model_and_tokenizer(None)``), LoRA r=8 alpha=16 dropout=0.05 on q_proj and
v_proj, 8 examples per optimizer step, at most 128 tokens an example, AdamW lr 1e-3 with cosine
decay and 2 warm-up steps, one epoch, seed 0 (so every tool sees the same examples in the same
batches and takes the same number of steps). Data:

- ``var``: 200 lines of 5-60 words of the embedded Shakespeare (+ EOS); validation: 40 other lines.
- ``full``: 48 blocks of exactly 128 tokens; validation: 16 other blocks.

Tools:

- ``peft``: peft's LoRA + transformers.Trainer, right-padded batches (labels -100 on padding, the
  DataCollatorForLanguageModeling recipe without masking real EOS tokens), full logits, its loss.
- ``adaptune``: adaptune's LoRA + adaptune.Trainer with its defaults; each batch's 8 examples
  packed into rows of at most 512 tokens (BatchPackingCollator: restarting position_ids, the batch's
  own loss and gradient, almost no padding), each example attending only to itself
  (adaptune.speedups.attention, ``packed_attention``: one causal attention call per example length, so a
  wide row costs no extra attention), the output head + loss only at labelled positions in 256-row
  chunks (chunked_loss), and ``micro_batch_tokens=512`` (forward/backward in row groups of at most
  512 tokens: less activation memory, same gradients; ``--micro-batch-tokens`` changes both 512s).
  Its Trainer also keeps 2 instead of 3 MLP tensors for backward (fused_mlp_activation), runs
  RMSNorm in one buffer (fused_rms_norm), and LoRA dropout keeps a bool mask (adaptune.speedups.dropout).
- ``adaptune-whole``: the same with rows of up to 1,024 tokens and no micro-batches (each batch in
  one forward): fewer passes over the weights, more memory.
- ``adaptune-pack`` (not run by default; ``--tools``): the whole data set first-fit packed into
  128-token rows, 8 rows a step, as ``adaptune train`` does: fewer, larger optimizer steps.

Reported per variant: useful tokens/s (tokens that have a label, i.e. what the loss is computed on),
useful tokens/s in steady state (steps 2..N: no first step, no end-of-training callbacks),
all tokens/s (incl. padding), useful tokens per CPU-second, peak RSS of the whole process (VmHWM,
model load included) and of training alone, validation loss after the epoch (the same full-logits
code for every tool), the share of this machine's fp32 GEMM speed (measured in the same run) that
the useful tokens use, counting 4 N FLOP a token with N = 134.5M parameters (the tied output head
counted once): 2N forward + 2N backward for the activation gradients (LoRA's own FLOPs, attention
scores and the weight gradients of the adapters are not counted), and how much CPU other processes
took meanwhile (the machine is shared; a variant disturbed by > 10% is run again once).
Each variant runs in a process of its own.

``--bf16``: every tool trains with ``bf16=True`` (transformers' CPU autocast: the matrix products
in bf16; weights, norms, softmax and loss in fp32), the GEMM speed is measured in bf16, and results
go to ``train-bf16-*.json``. The issue's comparison is the fp32 one; this one is for CPUs with fast
bf16 (AVX512-BF16, AMX), where bf16 is what users would run. 16-bit products run in oneDNN, which
keeps a kernel per operand shape; adaptune's Trainer caps those caches at 64 entries when training
starts (``adaptune.speedups.allocator``), and peft's process keeps torch's own 1,024, as its users
have it.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DATASETS = {"var": (200, 40), "full": (48, 16)}
TOOLS = ("peft", "adaptune", "adaptune-whole", "adaptune-pack")
# adaptune: micro_batch_tokens=MICRO_BATCH_TOKENS (less memory); adaptune-whole: each batch in one
# forward (faster: every forward streams all weights from memory once, ~0.17 s here); adaptune-pack:
# the whole data set first-fit packed into 128-token rows, 8 rows a step (fewer, larger steps),
# on var only (on full blocks it is adaptune).
DEFAULT_RUNS = [("var", "peft"), ("var", "adaptune"), ("var", "adaptune-whole"), ("full", "peft"),
                ("full", "adaptune"), ("full", "adaptune-whole"), ("var", "adaptune-pack")]
LR = 1e-3
WARMUP = 2
MICRO_BATCH_TOKENS = 512
NOISY = 0.10  # a variant during which other processes used more than this share of the CPUs is rerun


# ---- one variant (child process) -------------------------------------------------------------------


class CountingCollator:
    """Wraps a collator; counts all tokens and the label tokens the causal loss uses."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens = 0
        self.useful = 0
        self.per_batch: list[int] = []  # useful tokens of each batch, in order

    def __call__(self, features):
        batch = self.inner(features)
        useful = int((batch["labels"][:, 1:] != -100).sum())
        self.tokens += batch["input_ids"].numel()
        self.useful += useful
        self.per_batch.append(useful)
        return batch


def step_clock():
    """A callback that notes the time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepClock()


def child(tool: str, kind: str, threads: int | None, micro_batch_tokens: int | None, limit: int | None,
          bf16: bool = False, device: str = "cpu") -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = common.load_smollm2(device)
    load_s = time.perf_counter() - t0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n_train, n_val = DATASETS[kind]
    if limit:
        n_train, n_val = min(n_train, limit), min(n_val, limit)
    train_rows, val_rows = common.make_data(kind, tok, n_train, n_val)
    n_params = sum(p.numel() for p in model.parameters())
    train = [{"input_ids": r, "labels": list(r)} for r in train_rows]
    out_dir = tempfile.mkdtemp(prefix=f"bench-{tool}-")
    common_args = dict(output_dir=out_dir, per_device_train_batch_size=common.BATCH, num_train_epochs=1,
                       learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP, logging_steps=5,
                       save_strategy="no", report_to="none", seed=0, data_seed=0, use_cpu=device == "cpu",
                       dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False, bf16=bf16)
    torch.manual_seed(0)
    if tool == "peft":
        import transformers
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **common.LORA))
        collator = CountingCollator(lambda feats: common.padded_batch([f["input_ids"] for f in feats], pad))
        trainer = transformers.Trainer(model=peft_model, args=transformers.TrainingArguments(**common_args),
                                       train_dataset=train, data_collator=collator)
    else:
        from adaptune import LoraConfig, Trainer, TrainingArguments, get_peft_model
        from adaptune.data import DataCollator, Example, pack_examples
        from adaptune.data.batch_packing import BatchPackingCollator

        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **common.LORA))
        micro = None if tool == "adaptune-whole" else micro_batch_tokens
        if tool == "adaptune-pack":
            train = pack_examples([Example(r, list(r)) for r in train_rows], common.MAX_LENGTH)
            collator = CountingCollator(DataCollator(pad, packing=True))
        else:  # rows as wide as a micro-batch (packed attention: no cost for width)
            collator = CountingCollator(BatchPackingCollator(pad, micro or common.BATCH * common.MAX_LENGTH))
        trainer = Trainer(model=peft_model, args=TrainingArguments(**common_args, micro_batch_tokens=micro),
                          train_dataset=train, data_collator=collator)
    clock = step_clock()
    trainer.add_callback(clock)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    setup_peak = common.peak_rss_mb()
    rss_before = common.rss_mb()
    common.reset_peak_rss()
    t, cpu = time.perf_counter(), time.process_time()
    out = trainer.train()
    train_s, cpu_s = time.perf_counter() - t, time.process_time() - cpu
    train_peak = common.peak_rss_mb()
    # steady state: steps 2..N (no first-step warm-up, no end-of-training callbacks)
    steady_s = clock.ends[-1] - clock.ends[0] if len(clock.ends) > 1 else float("nan")
    steady_useful = sum(collator.per_batch[1:len(clock.ends)])
    val = common.validation_loss(peft_model, val_rows, pad)
    return {
        "tool": tool, "data": kind, "steps": out.global_step, "examples": len(train_rows), "train_s": train_s,
        "cpu_s": cpu_s, "useful_tok_cpu_s": collator.useful / cpu_s,
        "steady_useful_tok_s": steady_useful / steady_s, "first_step_s": clock.ends[0] - t,
        "after_last_step_s": t + train_s - clock.ends[-1],
        "useful_tokens": collator.useful, "tokens": collator.tokens, "useful_tok_s": collator.useful / train_s,
        "tok_s": collator.tokens / train_s, "train_loss": out.training_loss, "val_loss": val,
        "peak_rss_mb": max(setup_peak, train_peak), "setup_peak_rss_mb": setup_peak, "rss_before_train_mb": rss_before,
        "train_peak_rss_mb": train_peak, "load_s": load_s, "n_params": n_params,
        "threads": torch.get_num_threads(), "device": device,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "micro_batch_tokens": micro_batch_tokens if tool in ("adaptune", "adaptune-pack") else None,
    }


# ---- the parent: run, tabulate, compare ------------------------------------------------------------


def report(record: dict) -> str:
    gflops = record["gflops"]
    precision = record.get("precision", "fp32")
    lines = [f"machine: {precision} GEMM {gflops['start']:.1f} GFLOP/s at start, {gflops['end']:.1f} at end; "
             f"load {record['load_start']} at start, {record['load_end']} at end; torch threads {record['threads']}"]
    rows = []
    for r in record["results"]:
        if "error" in r:
            rows.append([r["args"], "ERROR", r["error"], "; ".join(r["tail"][-2:])])
            continue
        flop = 4 * r["n_params"] * r["useful_tok_s"] / 1e9
        rows.append([r["data"], r["tool"], r["steps"], f"{r['useful_tok_s']:.1f}", f"{r['steady_useful_tok_s']:.1f}",
                     f"{r['tok_s']:.1f}",
                     f"{r['peak_rss_mb']:.0f}", f"{r['train_peak_rss_mb']:.0f}", f"{r['val_loss']:.4f}",
                     f"{flop:.1f} ({100 * flop / gflops['mean']:.0f}%)", f"{r['train_s']:.0f}",
                     f"{r['useful_tok_cpu_s']:.1f}", f"{100 * r['others_cpu']:.0f}%"])
    lines.append(common.table(rows, ["data", "tool", "steps", "useful tok/s", "steady useful tok/s", "all tok/s",
                                     "peak RSS MB",
                                     "train peak MB", "val loss", "GFLOP/s useful (of GEMM)", "train s",
                                     "useful tok/CPU-s", "others' CPU"]))
    lines.append(ratios(record["results"]))
    return "\n".join(lines)


def _pairs(results: list[dict]):
    """(data, adaptune variant, its result, peft's result) for every variant that has a peft run."""
    by = {(r.get("tool"), r.get("data")): r for r in results if "error" not in r}
    for kind in DATASETS:
        for tool in TOOLS[1:]:
            a, p = by.get((tool, kind)), by.get(("peft", kind))
            if a and p:
                yield kind, tool, a, p


def _ratio_values(a: dict, p: dict) -> tuple[float, ...]:
    """Speed, steady speed, peak memory, training's peak memory, val loss difference. On a GPU the
    memory is the device's (peak allocated) for both memory ratios."""
    peak, train_peak = ("peak_gpu_mb", "peak_gpu_mb") if a.get("peak_gpu_mb") else ("peak_rss_mb", "train_peak_rss_mb")
    return (a["useful_tok_s"] / p["useful_tok_s"], a["steady_useful_tok_s"] / p["steady_useful_tok_s"],
            a[peak] / p[peak], a[train_peak] / p[train_peak], 100 * (a["val_loss"] / p["val_loss"] - 1))


def ratios(results: list[dict]) -> str:
    out = ["ratios to peft + transformers.Trainer:"]
    for kind, tool, a, p in _pairs(results):
        speed, steady, rss, train_rss, val = _ratio_values(a, p)
        out.append(f"  {kind:4} {tool:14}: useful tok/s x{speed:.2f} (steady x{steady:.2f}), peak RSS x{rss:.2f} "
                   f"(training alone x{train_rss:.2f}), val loss {val:+.2f}%")
    return "\n".join(out)


def summary(paths: list[str]) -> str:
    """Medians and spread over saved runs, leaving out variants that other processes disturbed
    (> NOISY of the CPUs; their counts are said)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    dropped = 0
    for run in runs:
        kept = [r for r in run["results"] if "error" not in r and r.get("others_cpu", 0) <= NOISY]
        dropped += len(run["results"]) - len(kept)
        run["results"] = kept
    keys = [("useful_tok_s", "useful tok/s"), ("steady_useful_tok_s", "steady useful tok/s"),
            ("useful_tok_cpu_s", "useful tok/CPU-s"), ("peak_rss_mb", "peak RSS MB"),
            ("train_peak_rss_mb", "train peak MB"), ("val_loss", "val loss")]
    rows = []
    for kind in DATASETS:
        for tool in TOOLS:
            rs = [r for run in runs for r in run["results"] if r.get("tool") == tool and r.get("data") == kind]
            if not rs:
                continue
            cells = [kind, tool, len(rs), rs[0]["steps"]]
            for key, _ in keys:
                med, lo, hi = common.median_spread([r[key] for r in rs])
                cells.append(f"{med:.4g} [{lo:.4g}-{hi:.4g}]")
            rows.append(cells)
    text = [common.table(rows, ["data", "tool", "runs", "steps"] + [f"{name} median [min-max]" for _, name in keys])]
    text.append("ratios to peft per run, median [min-max]:")
    per: dict[tuple[str, str], list] = {}
    for run in runs:
        for kind, tool, a, p in _pairs(run["results"]):
            per.setdefault((kind, tool), []).append(_ratio_values(a, p))
    names = ["useful tok/s x", "steady x", "peak RSS x", "train peak x", "val loss %"]
    for (kind, tool), values in per.items():
        cols = list(zip(*values))
        text.append(f"  {kind:4} {tool:14}: " + ", ".join(
            f"{n}{common.median_spread(list(c))[0]:.2f} [{min(c):.2f}-{max(c):.2f}]" for n, c in zip(names, cols)))
    text.append(f"{len(runs)} runs; {dropped} variant results left out (disturbed by other processes or failed)")
    gf = [f"{run['gflops']['mean']:.1f}" for run in runs]
    loads = [run["load_start"].split(" (")[0] for run in runs]
    precisions = sorted({run.get("precision", "fp32") for run in runs})
    text.append(f"{'/'.join(precisions)} GEMM GFLOP/s per run: {', '.join(gf)}; "
                f"load at start of each run: {'; '.join(loads)}")
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tool", choices=TOOLS)
    ap.add_argument("--data", choices=list(DATASETS), nargs="+", default=list(DATASETS))
    ap.add_argument("--tools", choices=TOOLS, nargs="+", default=list(TOOLS[:3]),
                    help="default: peft adaptune adaptune-whole (add adaptune-pack for dataset-level packing)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--micro-batch-tokens", type=int, default=MICRO_BATCH_TOKENS,
                    help="adaptune's micro_batch_tokens (0: whole batches)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many train/val examples (smoke runs)")
    ap.add_argument("--wait-quiet", type=float, default=120,
                    help="before each variant, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--retries", type=int, default=1,
                    help=f"run a variant again (this many times) when other processes took > "
                         f"{round(100 * NOISY)}%% of the CPUs")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for every tool; GEMM speed in bf16")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where every tool trains (cuda: see bench/gpu.sh); default cpu")
    ap.add_argument("--summary", nargs="+", help="print medians and spread of saved result files")
    args = ap.parse_args()
    if args.summary:
        print(summary(sorted({p for pattern in args.summary for p in glob.glob(pattern)})))
        return
    if args.child:
        common.emit(child(args.tool, args.data[0], args.threads, args.micro_batch_tokens or None, args.limit,
                          args.bf16, args.device))
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [(k, t) for k, t in DEFAULT_RUNS if k in args.data and t in args.tools]
    precision, dtype = ("bf16", "bfloat16") if args.bf16 else ("fp32", "float32")
    record = {"load_start": common.load_average(), "threads": torch.get_num_threads(), "limit": args.limit,
              "micro_batch_tokens": args.micro_batch_tokens, "precision": precision, "results": []}
    record["device"] = args.device
    start_gflops = common.matmul_gflops(dtype=dtype, device=args.device)
    sizes = {k: tuple(min(n, args.limit or n) for n in v) for k, v in DATASETS.items()}
    print(f"load {record['load_start']}; {precision} GEMM {start_gflops:.1f} GFLOP/s; (train, val) examples {sizes}; "
          f"{common.BATCH} examples a step (adaptune-pack: 8 packed rows), 1 epoch", flush=True)
    for kind, tool in runs:
        extra = ["--threads", str(args.threads)] if args.threads else []
        extra += ["--limit", str(args.limit)] if args.limit else []
        extra += ["--bf16"] if args.bf16 else []
        extra += ["--device", args.device]
        for attempt in range(args.retries + 1):
            res = common.run_child("train.py", ["--tool", tool, "--data", kind,
                                                "--micro-batch-tokens", str(args.micro_batch_tokens), *extra],
                                   quiet_wait=args.wait_quiet)
            if res.get("others_cpu", 0) <= NOISY or attempt == args.retries:
                break
            print(f"  {kind} {tool}: other processes used {100 * res['others_cpu']:.0f}% of the CPUs; "
                  f"running it again", flush=True)
            record.setdefault("noisy_results", []).append(res)
        record["results"].append(res)
        brief = (f"{res['steps']} steps, {res['useful_tok_s']:.1f} useful tok/s, peak {res['peak_rss_mb']:.0f} MB, "
                 f"val {res['val_loss']:.4f}, {res['train_s']:.0f} s") if "error" not in res else res
        print(f"  {kind} {tool}: {brief}", flush=True)
    end_gflops = common.matmul_gflops(dtype=dtype, device=args.device)
    record["gflops"] = {"start": start_gflops, "end": end_gflops, "mean": (start_gflops + end_gflops) / 2}
    record["load_end"] = common.load_average()
    path = common.save("train-bf16" if args.bf16 else "train", record)
    print(f"saved {path.relative_to(common.ROOT)}")
    print(report(record))


if __name__ == "__main__":
    main()
