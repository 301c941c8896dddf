"""``adaptune merge``: fold an adapter into its base and write a plain transformers folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_model_flag, add_pickle_flag, load_for_inference


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base and write a plain transformers folder")
    add_model_flag(p)
    p.add_argument("--adapter", required=True, help="adapter folder")
    add_pickle_flag(p)
    p.add_argument("--output", required=True, help="folder to write (loads with AutoModelForCausalLM, no adaptune)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from ..atomic import atomic_directory, check_writable
    from ..errors import ConfigError

    output = Path(args.output)
    if output.resolve() == Path(args.adapter).resolve():
        raise ConfigError(f"--output {args.output} is the adapter folder itself; write the merged model elsewhere")
    if output.exists() and not (output.is_dir() and not any(output.iterdir())) and not args.overwrite:
        raise ConfigError(f"--output {args.output} exists and is not an empty folder; pass --overwrite to "
                          "replace it, or choose another folder")
    check_writable(output.parent if output.parent != Path("") else Path("."))
    model, tokenizer = load_for_inference(args.model, args.adapter, args.allow_pickle, args.trust_remote_code)
    merged = model.merge_and_unload(safe_merge=True)
    with atomic_directory(args.output) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged model written to {args.output}")
    return 0
