"""LoRA training, side by side: adaptune (its Trainer, packing, chunked loss) vs peft + transformers.Trainer.

    python bench/train.py                  # both tools, both data sets (~6-9 min on 2 cores)
    python bench/train.py --summary bench/results/train-*.json   # medians and spread of saved runs

Setup, the same for both tools: the embedded SmolLM2-135M-Instruct in fp32
(``adaptune.models.load_model_and_tokenizer(None)``), LoRA r=8 alpha=16 dropout=0.05 on q_proj and
v_proj, 8 examples per optimizer step, at most 128 tokens an example, AdamW lr 1e-3 with cosine
decay and 2 warm-up steps, one epoch, seed 0 (so both tools see the same examples in the same
batches). Data:

- ``var``: 200 lines of 5-60 words of the embedded Shakespeare (+ EOS); validation: 40 other lines.
- ``full``: 48 blocks of exactly 128 tokens; validation: 16 other blocks.

peft: transformers.Trainer with right-padded batches (labels -100 on padding, the
DataCollatorForLanguageModeling recipe without masking real EOS tokens), full logits, its loss.
adaptune: adaptune.Trainer; each batch's 8 examples first-fit packed into 128-token rows
(BatchPackingCollator: no padding compute, same examples and loss per step), the head + loss only
at labelled positions in chunks (chunked_loss, default on), and micro_batch_tokens (below).

Reported per run: useful tokens/s (tokens that have a label: what the loss is computed on), all
tokens/s (incl. padding), peak RSS of the whole process and of training alone, validation loss
after the epoch (the same full-logits code for both), and the share of this machine's fp32 GEMM
speed that the useful tokens use, counting 4 N FLOP a token (N = 134.5M parameters, the tied output
head counted once: 2N forward + 2N backward for the activation gradients; LoRA's weight gradients
and attention scores are not counted). Each variant runs in its own process.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DATASETS = {"var": (200, 40), "full": (48, 16)}
TOOLS = ("peft", "adaptune", "adaptune-pack")
# adaptune-pack: the whole data set first-fit packed into 128-token rows, 8 rows a step (what
# `adaptune train` does); on full blocks it is the same as adaptune, so it runs on var only.
DEFAULT_RUNS = [("var", "peft"), ("var", "adaptune"), ("full", "peft"), ("full", "adaptune"), ("var", "adaptune-pack")]
LR = 1e-3
WARMUP = 2
MICRO_BATCH_TOKENS = 256


# ---- one variant (child process) -------------------------------------------------------------------


class CountingCollator:
    """Wraps a collator; counts all tokens and the label tokens the causal loss uses."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens = 0
        self.useful = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.tokens += batch["input_ids"].numel()
        self.useful += int((batch["labels"][:, 1:] != -100).sum())
        return batch


def child(tool: str, kind: str, threads: int | None, micro_batch_tokens: int | None, limit: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tok = common.load_smollm2()
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
                       save_strategy="no", report_to="none", seed=0, data_seed=0, use_cpu=True,
                       dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
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
        from adaptune.batching import BatchPackingCollator
        from adaptune.data import DataCollator, Example, pack_examples

        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **common.LORA))
        if tool == "adaptune-pack":
            train = pack_examples([Example(r, list(r)) for r in train_rows], common.MAX_LENGTH)
            collator = CountingCollator(DataCollator(pad, packing=True))
        else:
            collator = CountingCollator(BatchPackingCollator(pad, common.MAX_LENGTH))
        trainer = Trainer(model=peft_model, args=TrainingArguments(**common_args, micro_batch_tokens=micro_batch_tokens),
                          train_dataset=train, data_collator=collator)
    setup_peak = common.peak_rss_mb()
    rss_before = common.rss_mb()
    common.reset_peak_rss()
    t, cpu = time.perf_counter(), time.process_time()
    out = trainer.train()
    train_s, cpu_s = time.perf_counter() - t, time.process_time() - cpu
    train_peak = common.peak_rss_mb()
    val = common.validation_loss(peft_model, val_rows, pad)
    return {
        "tool": tool, "data": kind, "steps": out.global_step, "examples": len(train_rows), "train_s": train_s,
        "cpu_s": cpu_s, "useful_tok_cpu_s": collator.useful / cpu_s,
        "useful_tokens": collator.useful, "tokens": collator.tokens, "useful_tok_s": collator.useful / train_s,
        "tok_s": collator.tokens / train_s, "train_loss": out.training_loss, "val_loss": val,
        "peak_rss_mb": max(setup_peak, train_peak), "setup_peak_rss_mb": setup_peak, "rss_before_train_mb": rss_before,
        "train_peak_rss_mb": train_peak, "load_s": load_s, "n_params": n_params,
        "threads": torch.get_num_threads(), "micro_batch_tokens": micro_batch_tokens if tool == "adaptune" else None,
    }


# ---- the parent: run, tabulate, compare ------------------------------------------------------------


def report(record: dict) -> str:
    gflops = record["gflops"]
    lines = [f"machine: fp32 GEMM {gflops['start']:.1f} GFLOP/s at start, {gflops['end']:.1f} at end; "
             f"load {record['load_start']} at start, {record['load_end']} at end; torch threads {record['threads']}"]
    rows = []
    for r in record["results"]:
        if "error" in r:
            rows.append([r["args"], "ERROR", r["error"], "; ".join(r["tail"][-2:])])
            continue
        flop = 4 * r["n_params"] * r["useful_tok_s"] / 1e9
        rows.append([r["data"], r["tool"], r["steps"], f"{r['useful_tok_s']:.1f}", f"{r['tok_s']:.1f}",
                     f"{r['peak_rss_mb']:.0f}", f"{r['train_peak_rss_mb']:.0f}", f"{r['val_loss']:.4f}",
                     f"{flop:.1f} ({100 * flop / gflops['mean']:.0f}%)", f"{r['train_s']:.0f}",
                     f"{r['useful_tok_cpu_s']:.1f}", f"{100 * r['others_cpu']:.0f}%"])
    lines.append(common.table(rows, ["data", "tool", "steps", "useful tok/s", "all tok/s", "peak RSS MB",
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


def _ratio_values(a: dict, p: dict) -> tuple[float, float, float, float]:
    return (a["useful_tok_s"] / p["useful_tok_s"], a["peak_rss_mb"] / p["peak_rss_mb"],
            a["train_peak_rss_mb"] / p["train_peak_rss_mb"], 100 * (a["val_loss"] / p["val_loss"] - 1))


def ratios(results: list[dict]) -> str:
    out = ["ratios to peft + transformers.Trainer:"]
    for kind, tool, a, p in _pairs(results):
        speed, rss, train_rss, val = _ratio_values(a, p)
        out.append(f"  {kind:4} {tool:13}: useful tok/s x{speed:.2f}, peak RSS x{rss:.2f} "
                   f"(training alone x{train_rss:.2f}), val loss {val:+.2f}%")
    return "\n".join(out)


def summary(paths: list[str]) -> str:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    keys = [("useful_tok_s", "useful tok/s"), ("useful_tok_cpu_s", "useful tok/CPU-s"), ("peak_rss_mb", "peak RSS MB"),
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
    names = ["useful tok/s x", "peak RSS x", "train peak x", "val loss %"]
    for (kind, tool), values in per.items():
        cols = list(zip(*values))
        text.append(f"  {kind:4} {tool:13}: " + ", ".join(
            f"{n}{common.median_spread(list(c))[0]:.2f} [{min(c):.2f}-{max(c):.2f}]" for n, c in zip(names, cols)))
    gf = [f"{run['gflops']['mean']:.1f}" for run in runs]
    loads = [run["load_start"].split(" (")[0] for run in runs]
    text.append(f"GEMM GFLOP/s per run: {', '.join(gf)}; load at start of each run: {'; '.join(loads)}")
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tool", choices=TOOLS)
    ap.add_argument("--data", choices=list(DATASETS), nargs="+", default=list(DATASETS))
    ap.add_argument("--tools", choices=TOOLS, nargs="+", default=list(TOOLS[:2]),
                    help="default: peft adaptune (add adaptune-pack for dataset-level packing)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--micro-batch-tokens", type=int, default=MICRO_BATCH_TOKENS,
                    help="adaptune's micro_batch_tokens (0: whole batches)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many train/val examples (smoke runs)")
    ap.add_argument("--wait-quiet", type=float, default=120,
                    help="before each variant, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--summary", nargs="+", help="print medians and spread of saved result files")
    args = ap.parse_args()
    if args.summary:
        print(summary(sorted({p for pattern in args.summary for p in glob.glob(pattern)})))
        return
    if args.child:
        common.emit(child(args.tool, args.data[0], args.threads, args.micro_batch_tokens or None, args.limit))
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [(k, t) for k, t in DEFAULT_RUNS if k in args.data and t in args.tools]
    record = {"load_start": common.load_average(), "threads": torch.get_num_threads(), "limit": args.limit,
              "micro_batch_tokens": args.micro_batch_tokens, "results": []}
    start_gflops = common.matmul_gflops()
    sizes = {k: tuple(min(n, args.limit or n) for n in v) for k, v in DATASETS.items()}
    print(f"load {record['load_start']}; fp32 GEMM {start_gflops:.1f} GFLOP/s; (train, val) examples {sizes}; "
          f"{common.BATCH} examples a step (adaptune-pack: 8 packed rows), 1 epoch", flush=True)
    for kind, tool in runs:
        extra = ["--threads", str(args.threads)] if args.threads else []
        extra += ["--limit", str(args.limit)] if args.limit else []
        res = common.run_child("train.py", ["--tool", tool, "--data", kind,
                                            "--micro-batch-tokens", str(args.micro_batch_tokens), *extra],
                               quiet_wait=args.wait_quiet)
        record["results"].append(res)
        brief = (f"{res['steps']} steps, {res['useful_tok_s']:.1f} useful tok/s, peak {res['peak_rss_mb']:.0f} MB, "
                 f"val {res['val_loss']:.4f}, {res['train_s']:.0f} s") if "error" not in res else res
        print(f"  {kind} {tool}: {brief}", flush=True)
    end_gflops = common.matmul_gflops()
    record["gflops"] = {"start": start_gflops, "end": end_gflops, "mean": (start_gflops + end_gflops) / 2}
    record["load_end"] = common.load_average()
    path = common.save("train", record)
    print(f"saved {path.relative_to(common.ROOT)}")
    print(report(record))


if __name__ == "__main__":
    main()
