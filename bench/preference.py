"""DPO with a LoRA adapter, side by side: adaptune's DPOTrainer vs TRL's DPOTrainer with a peft LoRA.

    python bench/preference.py                      # trl, adaptune (a few minutes each on 2 quiet cores)
    python bench/preference.py --tools trl trl-precompute adaptune

Setup, the same for every tool: the embedded SmolLM2-135M-Instruct in fp32
(``adaptune.hub.load_model_and_tokenizer(None)``); LoRA r=8 alpha=16 on q_proj and v_proj, the same
starting weights for both (A drawn from a seeded generator per parameter name, B zero; dropout off,
as both trainers do by default); 32 pairs built from the embedded Shakespeare
(``shakespeare_pairs.py``: a passage, its true next line(s) as chosen, lines from elsewhere as
rejected), 8 pairs a step, 2 epochs (8 steps), the sigmoid DPO loss with beta 0.1, AdamW lr 5e-5
with cosine decay and 2 warm-up steps, max_length 128, no gradient checkpointing (TRL's default
turns it on; here neither uses it), seed 0 (the same pairs in the same batches). The reference is
the base model with the adapter disabled in both.

Tools:

- ``trl``: TRL's DPOTrainer with its defaults otherwise: padded rows, a reference forward every
  step (``precompute_ref_log_probs=False``), its fused (chunked) LM head.
- ``trl-precompute`` (``--tools``): the same with ``precompute_ref_log_probs=True`` (one reference
  pass over the data set before training, included in the time).
- ``adaptune``: adaptune's DPOTrainer with its defaults: the 16 sequences of a batch packed into one
  row (no padding, each attending to itself), reference log-probs computed on first use and cached
  (epoch 2 runs no reference forward), the chunked head on answer positions only, fused MLP / RMSNorm.

Reported: pairs/s over the whole training (reference passes included) and per epoch, peak RSS of
the process (VmHWM, model load included) and of training alone, the mean training loss of each
epoch, and the held-out DPO loss and reward accuracy after training on 32 other pairs, computed by
the same plain full-logits code for both tools. Each tool runs in a process of its own.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from shakespeare_pairs import make_pairs  # noqa: E402

TOOLS = ("trl", "trl-precompute", "adaptune")
PAIRS, VAL_PAIRS, BATCH, EPOCHS = 32, 32, 8, 2
LR, WARMUP, BETA, MAX_LENGTH = 5e-5, 2, 0.1, 128
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def same_start(model) -> None:
    """Every tool's adapter starts from the same weights: A from a generator seeded by its name, B zero."""
    import math
    import zlib

    import torch

    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if not p.requires_grad:
                continue
            if "lora_A" in name:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                bound = 1 / math.sqrt(p.shape[1])
                p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
            else:
                p.zero_()


def heldout(model, tokenizer, pairs: list[dict], beta: float = BETA) -> dict:
    """Held-out DPO loss, reward accuracy and margin: plain padded forwards with full logits, the
    reference = the same model with its adapter disabled (the same code for every tool)."""
    import torch
    import torch.nn.functional as F

    from adaptune.data.preference import pair_feature

    def logps(features: list[dict], side: str) -> torch.Tensor:
        seqs = [f["prompt_ids"] + f[side] for f in features]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        answer = torch.tensor([[0] * len(f["prompt_ids"]) + [1] * len(f[side]) + [0] * (width - len(s))
                               for f, s in zip(features, seqs)])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        token = logits.log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
        return (token * answer[:, 1:]).sum(1)

    features = [pair_feature(p, tokenizer, MAX_LENGTH)[0].as_dict() for p in pairs]
    model.eval()
    out = {"chosen": [], "rejected": [], "ref_chosen": [], "ref_rejected": []}
    with torch.no_grad():
        for i in range(0, len(features), 8):
            part = features[i:i + 8]
            out["chosen"].append(logps(part, "chosen_ids"))
            out["rejected"].append(logps(part, "rejected_ids"))
            with model.disable_adapter():
                out["ref_chosen"].append(logps(part, "chosen_ids"))
                out["ref_rejected"].append(logps(part, "rejected_ids"))
    c, r, rc, rr = (torch.cat(out[k]) for k in ("chosen", "rejected", "ref_chosen", "ref_rejected"))
    margin = beta * ((c - rc) - (r - rr))
    return {"loss": float(-F.logsigmoid(margin).mean()), "accuracy": float((margin > 0).float().mean()),
            "margin": float(margin.mean())}


def step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.losses: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepClock()


def child(tool: str, pairs: int, epochs: int) -> dict:
    import torch

    t0 = time.perf_counter()
    model, tok = common.load_smollm2()
    load_s = time.perf_counter() - t0
    rows, val = make_pairs(pairs), make_pairs(VAL_PAIRS, held_out=True)
    args = dict(output_dir=tempfile.mkdtemp(prefix=f"bench-{tool}-"), per_device_train_batch_size=BATCH,
                num_train_epochs=epochs, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=WARMUP,
                logging_steps=1, save_strategy="no", report_to="none", seed=0, data_seed=0, use_cpu=True,
                dataloader_num_workers=0, disable_tqdm=True, bf16=False, gradient_checkpointing=False,
                beta=BETA, max_length=MAX_LENGTH)
    torch.manual_seed(0)
    if tool.startswith("trl"):
        from datasets import Dataset
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**args, precompute_ref_log_probs=tool == "trl-precompute"),
                             train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    else:
        from adaptune import DPOConfig, DPOTrainer, LoraConfig

        trainer = DPOTrainer(model=model, args=DPOConfig(**args), train_dataset=rows, processing_class=tok,
                             peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    same_start(trainer.model)
    clock = step_clock()
    trainer.add_callback(clock)
    setup_peak = common.peak_rss_mb()
    common.reset_peak_rss()
    t, cpu = time.perf_counter(), time.process_time()
    out = trainer.train()
    train_s, cpu_s = time.perf_counter() - t, time.process_time() - cpu
    train_peak = common.peak_rss_mb()
    per_epoch = len(clock.ends) // epochs
    epoch_s = [clock.ends[per_epoch - 1] - t] + [clock.ends[(e + 1) * per_epoch - 1] - clock.ends[e * per_epoch - 1]
                                                  for e in range(1, epochs)]
    epoch_loss = [sum(clock.losses[e * per_epoch:(e + 1) * per_epoch]) / per_epoch for e in range(epochs)]
    evaluation = heldout(trainer.model, tok, val)
    return {"tool": tool, "pairs": pairs, "epochs": epochs, "steps": out.global_step, "train_s": train_s,
            "cpu_s": cpu_s, "pairs_s": pairs * epochs / train_s, "epoch_s": epoch_s,
            "epoch_pairs_s": [pairs / s for s in epoch_s], "epoch_loss": epoch_loss, "train_loss": out.training_loss,
            "last_step_loss": clock.losses[-1], "heldout": evaluation, "peak_rss_mb": max(setup_peak, train_peak),
            "setup_peak_rss_mb": setup_peak, "train_peak_rss_mb": train_peak, "load_s": load_s,
            "threads": torch.get_num_threads()}


def report(record: dict) -> str:
    rows = []
    for r in record["results"]:
        if "error" in r:
            rows.append([r["args"], "ERROR", r["error"], "; ".join(r["tail"][-2:])])
            continue
        h = r["heldout"]
        rows.append([r["tool"], r["steps"], f"{r['pairs_s']:.2f}", " / ".join(f"{x:.2f}" for x in r["epoch_pairs_s"]),
                     f"{r['peak_rss_mb']:.0f}", f"{r['train_peak_rss_mb']:.0f}",
                     " / ".join(f"{x:.4f}" for x in r["epoch_loss"]), f"{r['last_step_loss']:.4f}",
                     f"{h['loss']:.4f}", f"{h['accuracy']:.2f}", f"{h['margin']:.4f}", f"{r['train_s']:.0f}",
                     f"{100 * r['others_cpu']:.0f}%"])
    lines = [f"machine: fp32 GEMM {record['gflops']:.1f} GFLOP/s; load {record['load_start']} at start",
             common.table(rows, ["tool", "steps", "pairs/s", "pairs/s by epoch", "peak RSS MB", "train peak MB",
                                 "train loss by epoch", "last step loss", "held-out loss", "held-out acc",
                                 "held-out margin", "train s", "others' CPU"])]
    by = {r["tool"]: r for r in record["results"] if "error" not in r}
    ours = by.get("adaptune")
    for peer in ("trl", "trl-precompute"):
        p = by.get(peer)
        if ours and p:
            lines.append(f"adaptune / {peer}: pairs/s x{ours['pairs_s'] / p['pairs_s']:.2f} (by epoch "
                         + " / ".join(f"x{a / b:.2f}" for a, b in zip(ours["epoch_pairs_s"], p["epoch_pairs_s"]))
                         + f"), peak RSS x{ours['peak_rss_mb'] / p['peak_rss_mb']:.2f} (training alone "
                         f"x{ours['train_peak_rss_mb'] / p['train_peak_rss_mb']:.2f}), held-out loss "
                         f"{ours['heldout']['loss']:.4f} vs {p['heldout']['loss']:.4f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tool", choices=TOOLS)
    ap.add_argument("--tools", choices=TOOLS, nargs="+", default=["trl", "adaptune"])
    ap.add_argument("--pairs", type=int, default=PAIRS)
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--wait-quiet", type=float, default=120)
    args = ap.parse_args()
    if args.child:
        common.emit(child(args.tool, args.pairs, args.epochs))
        return
    record = {"load_start": common.load_average(), "gflops": common.matmul_gflops(), "pairs": args.pairs,
              "epochs": args.epochs, "results": []}
    print(f"load {record['load_start']}; fp32 GEMM {record['gflops']:.1f} GFLOP/s; {args.pairs} pairs, "
          f"{BATCH} a step, {args.epochs} epochs", flush=True)
    for tool in args.tools:
        res = common.run_child("preference.py", ["--tool", tool, "--pairs", str(args.pairs),
                                                 "--epochs", str(args.epochs)], quiet_wait=args.wait_quiet,
                               timeout=3600)
        record["results"].append(res)
        brief = (f"{res['pairs_s']:.2f} pairs/s, peak {res['peak_rss_mb']:.0f} MB, held-out loss "
                 f"{res['heldout']['loss']:.4f}, {res['train_s']:.0f} s") if "error" not in res else res
        print(f"  {tool}: {brief}", flush=True)
    record["load_end"] = common.load_average()
    path = common.save("preference", record)
    print(f"saved {path.relative_to(common.ROOT)}")
    print(report(record))


if __name__ == "__main__":
    main()
