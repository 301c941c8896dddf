"""``adaptune inspect``: a model's adaptable layers, default targets, LoRA parameter counts and, with
``--memory``, the memory training would need; from the config alone (no weights are read)."""

from __future__ import annotations

import argparse

from ..training.preference.options import OBJECTIVES
from .options import POSITIVE_INT, add_trust_flag


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="list a model's adaptable layers, default targets and parameter counts")
    p.add_argument("model", nargs="?", default=None, help="hub id, local folder or .gguf (default: embedded model)")
    add_trust_flag(p)
    p.add_argument("--r", type=POSITIVE_INT, default=8, help="rank for the trainable-parameter count")
    p.add_argument("--targets", default=None, help="comma-separated names, a regex, or all-linear")
    p.add_argument("--memory", action="store_true", help="estimate training memory (full / LoRA / QLoRA)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--objective", default="sft", choices=OBJECTIVES,
                   help="--memory for preference training: --batch-size pairs (kto: rows) of --seq-len tokens")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..hub import describe_model, meta_model
    from ..tuners.targets import parse_targets

    model = meta_model(args.model, trust_remote_code=args.trust_remote_code)
    _print_layers(model, describe_model(args.model))
    targets = parse_targets(args.targets)
    _print_lora_count(model, targets, args.r, args.targets or "default targets")
    if args.memory:
        from ..tools.memory import ESTIMATED_METHODS, estimate_training_memory, format_estimates

        kw = dict(batch_size=args.batch_size, seq_len=args.seq_len, r=args.r, objective=args.objective)
        if targets is not None:
            kw["target_modules"] = targets
        estimates = [estimate_training_memory(model.config, m, **kw) for m in ESTIMATED_METHODS]
        unit = {"sft": "", "kto": ", kto: rows"}.get(args.objective, f", {args.objective}: pairs")
        print(f"\nestimated training memory (batch {args.batch_size} x {args.seq_len} tokens{unit}, AdamW):")
        print(format_estimates(estimates))
    return 0


def _print_layers(model, label: str) -> None:
    from ..tuners.targets import DEFAULT_TARGETS, FUSED_SLICES, describe_adaptable, model_type

    mtype = model_type(model)
    print(f"model: {label} ({type(model).__name__}, type {mtype})")
    print(f"\n{'layer name pattern':<48} {'type':<10} {'in':>6} {'out':>6} {'count':>5}")
    for row in describe_adaptable(model):
        print(f"{row['pattern']:<48} {row['kind']:<10} {row['in']:>6} {row['out']:>6} {row['count']:>5}")
    print(f"\ndefault targets: {DEFAULT_TARGETS.get(mtype, 'none (pass --targets)')}")
    for fused, names in FUSED_SLICES.get(mtype or "", {}).items():
        print(f"fused slices of {fused}: {', '.join(names)} (e.g. --targets {names[0]},{names[-1]})")


def _print_lora_count(model, targets, r: int, label: str) -> None:
    from ..tuners.targets import lora_pairs, lora_parameter_count

    pairs = lora_pairs(model, targets)
    trainable = lora_parameter_count(pairs, r)
    total = sum(p.numel() for p in model.parameters()) + trainable
    print(f"LoRA r={r} on {label}: {len(pairs)} layers, trainable params: {trainable:,d} "
          f"|| all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
