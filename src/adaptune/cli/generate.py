"""``adaptune generate``: text from a base model or an adapter, streamed as it comes."""

from __future__ import annotations

import argparse

from .options import add_model_flag, add_pickle_flag, add_sampling_flags, load_for_inference


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a base model or an adapter")
    add_model_flag(p)
    p.add_argument("--adapter", help="adapter folder (peft format); the base defaults to the one it was trained on")
    add_pickle_flag(p)
    p.add_argument("--prompt", default="Write a few lines in the style of Shakespeare about the sea.")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: when the tokenizer has one)")
    add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..tools.generation import generate_text

    model, tokenizer = load_for_inference(args.model, args.adapter, args.allow_pickle, args.trust_remote_code)
    generate_text(model, tokenizer, args.prompt, chat=args.chat, stream=True, max_new_tokens=args.max_new_tokens,
                  do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                  seed=args.seed)
    return 0
