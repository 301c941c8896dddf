"""``adaptune eval``: perplexity of a model or adapter on a data file."""

from __future__ import annotations

import argparse

from .options import COUNT, POSITIVE_INT, add_model_flag, add_pickle_flag, load_for_inference


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model or adapter on a data file")
    add_model_flag(p)
    p.add_argument("--adapter", help="adapter folder")
    add_pickle_flag(p)
    p.add_argument("--data", help="text or jsonl file (default: the embedded Shakespeare)")
    p.add_argument("--max-length", type=POSITIVE_INT, default=128)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    p.add_argument("--max-examples", type=COUNT, default=64, help="evaluate the first N blocks/examples (0 = all)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data import DataCollator, default_data_path, load_examples, pad_token_id_for
    from ..tools.evaluation import perplexity

    model, tokenizer = load_for_inference(args.model, args.adapter, args.allow_pickle, args.trust_remote_code)
    examples, report = load_examples(args.data or default_data_path(), tokenizer, args.max_length)
    if args.max_examples:
        examples = examples[:args.max_examples]
    features = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    ppl = perplexity(model, features, DataCollator(pad_token_id_for(tokenizer), packing=False), args.batch_size)
    print(f"perplexity: {ppl:.3f} ({len(features)} examples of {report.path})")
    return 0
