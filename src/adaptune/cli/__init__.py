"""``adaptune train | generate | eval | merge | inspect``.

Each sub-command is a thin layer over the library: parse flags, call one function, print. Any
``AdaptuneError`` (bad file, bad config, bad data...) is printed as one line, exit code 2, and no
traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import AdaptuneError

EXIT_USER_ERROR = 2


def _number(kind: type, low: float, inclusive: bool, what: str, high: float = float("inf")):
    """An argparse type: ``kind`` (int/float) at or above ``low`` (or above, if not ``inclusive``)
    and at most ``high``; NaN and infinities are refused."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        finite = value == value and value not in (float("inf"), float("-inf"))
        if not finite or value < low or (value == low and not inclusive) or value > high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


POSITIVE_INT = _number(int, 1, True, "a positive integer")
COUNT = _number(int, 0, True, "an integer >= 0")
POSITIVE = _number(float, 0, False, "a positive number")


# ---- helpers -----------------------------------------------------------------------------------
def _add_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id, local folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    _add_trust_flag(p)


def _add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code that comes with the model (its own modeling files); off by default")


def _add_pickle_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="read an adapter stored only as pickled adapter_model.bin (with torch.load(weights_only=True)); "
                        "off by default: only safetensors are read")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=POSITIVE_INT, default=64)
    p.add_argument("--temperature", type=POSITIVE, default=0.7, help="sampling temperature (> 0; --greedy for none)")
    p.add_argument("--top-p", type=_number(float, 0, False, "a number in (0, 1]", high=1.0), default=0.9)
    p.add_argument("--top-k", type=POSITIVE_INT, default=None)
    p.add_argument("--repetition-penalty", type=POSITIVE, default=None)
    p.add_argument("--no-repeat-ngram-size", type=POSITIVE_INT, default=None)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--seed", type=int, default=None)


def _load_for_inference(model_name: str | None, adapter: str | None, allow_pickle: bool = False,
                        trust_remote_code: bool = False):
    """Base (+ adapter) ready for generation or evaluation; the base defaults to the adapter's."""
    from ..hub import load_model_and_tokenizer
    from ..peft_model import PeftModel

    if adapter and model_name is None:
        model_name = _adapter_base_name(adapter)
    model, tokenizer = load_model_and_tokenizer(model_name, trust_remote_code=trust_remote_code)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter, allow_pickle=allow_pickle)
    model.eval()
    return model, tokenizer


def _adapter_base_name(adapter: str) -> str | None:
    """The base an adapter was trained on, when it is a usable name (else the default model)."""
    from ..config import PeftConfig
    from ..hub import names_embedded_default

    name = PeftConfig.from_pretrained(adapter).base_model_name_or_path
    return None if not name or names_embedded_default(name) else name


# ---- train -------------------------------------------------------------------------------------
def _train_parser(sub) -> None:
    from ..training.job import DEFAULT_LR, METHODS, TrainJob

    d = TrainJob()
    p = sub.add_parser("train", help="fine-tune a model (default: SmolLM2-135M on Shakespeare)",
                       description="Fine-tune with LoRA (or another method) and save a peft-format adapter.")
    p.add_argument("--config", help="YAML file with the same option names; flags given here win")
    _add_model_flag(p)
    p.add_argument("--data", help="text or jsonl file (text, prompt/completion, messages, alpaca); "
                                  "default: the embedded Shakespeare")
    p.add_argument("--output", help=f"output folder (default {d.output})")
    p.add_argument("--method", choices=METHODS, help=f"default {d.method}")
    p.add_argument("--r", type=int, help=f"LoRA rank (default {d.r})")
    p.add_argument("--alpha", type=float, help=f"LoRA alpha (default {d.alpha})")
    p.add_argument("--dropout", type=float, help=f"LoRA dropout (default {d.dropout})")
    p.add_argument("--targets", help="comma-separated layer names, a regex, or all-linear "
                                     "(default: the architecture's; see `adaptune inspect`)")
    p.add_argument("--quantize", choices=("nf4", "fp4", "int8"), help="load the base quantized (bitsandbytes)")
    p.add_argument("--quantize-embeddings", action="store_true", default=None,
                   help="keep the frozen embedding table (and the head tied to it) as int8 rows: 4x smaller, "
                        "slower head (lora, dora, qlora)")
    p.add_argument("--int8-modules", help="with a 4-bit base: keep these layers int8 instead, comma-separated "
                                          "(e.g. down_proj,v_proj: closer to full precision for more memory)")
    p.add_argument("--lora-init", choices=("default", "loftq"),
                   help="loftq: quantize the base so that base + adapter start close to the full-precision "
                        "weights (LoftQ; --method qlora or --quantize nf4/int8). Default: a zero adapter")
    p.add_argument("--loftq-iter", type=int, help=f"LoftQ's alternating iterations (default {d.loftq_iter})")
    p.add_argument("--virtual-tokens", type=int, help=f"prompt/prefix methods (default {d.virtual_tokens})")
    p.add_argument("--epochs", type=float, help=f"used when --max-steps is 0 (default {d.epochs})")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps; 0 = by epochs (default {d.max_steps})")
    p.add_argument("--lr", type=float, help="learning rate (default by method: "
                   + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    p.add_argument("--batch-size", type=int, help=f"per device (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"gradient accumulation steps (default {d.grad_accum})")
    p.add_argument("--max-length", type=int, help=f"tokens per block/example (default {d.max_length})")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="pack short examples into full blocks (default on)")
    p.add_argument("--train-on-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="loss on prompts too, not only answers (default off)")
    p.add_argument("--val-fraction", type=float, help=f"validation share (default {d.val_fraction})")
    p.add_argument("--max-examples", type=int, help="use only the first N examples")
    p.add_argument("--eval-every", type=int, help=f"validation loss every N steps, plotted in loss.png; 0 = only "
                                                  f"perplexity before/after (default {d.eval_every})")
    p.add_argument("--save-every", type=int, help=f"checkpoint every N steps (default {d.save_every})")
    p.add_argument("--logging-steps", type=int, help=f"log the training loss every N steps (default {d.logging_steps})")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint in --output")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 | auto (the checkpoint's; default: by hardware)")
    _preference_flags(p)
    # every train option is None unless given, so that a YAML value stands unless a flag says otherwise
    p.set_defaults(func=cmd_train, trust_remote_code=None)


def _preference_flags(p: argparse.ArgumentParser) -> None:
    from ..training.preference.options import DEFAULT_BETA, LOSS_TYPES, OBJECTIVES

    p.add_argument("--objective", choices=OBJECTIVES,
                   help="sft (default), or preference tuning: dpo, ipo, orpo, simpo, kto; --data is then a jsonl of "
                        "{prompt, chosen, rejected} pairs ({prompt, completion, label} rows for kto)")
    p.add_argument("--beta", type=POSITIVE, help="preference strength (default by objective: "
                   + ", ".join(f"{o} {b:g}" for o, b in DEFAULT_BETA.items()) + ")")
    p.add_argument("--loss-type", help="the objective's variant: "
                   + "; ".join(f"{o}: {', '.join(t)}" for o, t in LOSS_TYPES.items() if len(t) > 1)
                   + " (default: the first)")
    p.add_argument("--label-smoothing", type=float, help="dpo --loss-type robust, simpo: share of flipped labels")
    p.add_argument("--ref-adapter", help="continue this (SFT) adapter folder; a frozen copy of it is the reference")


def job_from_args(args: argparse.Namespace):
    from ..training.job import TrainJob

    fields = {f.name for f in dataclasses.fields(TrainJob)}
    # None = not given; False from a --no-X switch is a choice (it must win over a YAML value too)
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return TrainJob.from_yaml(args.config, **given) if args.config else TrainJob(**given)


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.job import run_train

    run_train(job_from_args(args))
    # Only after a run that ended well: a failed rank's peers may still be inside a collective,
    # and ending the group under them can wait on them for ever (the failure ends the job anyway).
    _close_process_group()
    return 0


def _close_process_group() -> None:
    """Under torchrun, end the process group before the interpreter does: gloo's worker threads
    left running at exit sometimes abort the process ("terminate called without an active
    exception", SIGABRT) after a run that trained and saved correctly (pytorch/pytorch#190489)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - never hide the run's own outcome behind a teardown error
            pass


# ---- generate ----------------------------------------------------------------------------------
def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a base model or an adapter")
    _add_model_flag(p)
    p.add_argument("--adapter", help="adapter folder (peft format); the base defaults to the one it was trained on")
    _add_pickle_flag(p)
    p.add_argument("--prompt", default="Write a few lines in the style of Shakespeare about the sea.")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: when the tokenizer has one)")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..tools.generation import generate_text

    model, tokenizer = _load_for_inference(args.model, args.adapter, args.allow_pickle, args.trust_remote_code)
    generate_text(model, tokenizer, args.prompt, chat=args.chat, stream=True, max_new_tokens=args.max_new_tokens,
                  do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                  seed=args.seed)
    return 0


# ---- eval --------------------------------------------------------------------------------------
def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model or adapter on a data file")
    _add_model_flag(p)
    p.add_argument("--adapter", help="adapter folder")
    _add_pickle_flag(p)
    p.add_argument("--data", help="text or jsonl file (default: the embedded Shakespeare)")
    p.add_argument("--max-length", type=POSITIVE_INT, default=128)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8)
    p.add_argument("--max-examples", type=COUNT, default=64, help="evaluate the first N blocks/examples (0 = all)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..data.examples import DataCollator, default_data_path, load_examples, pad_token_id_for
    from ..tools.evaluation import perplexity

    model, tokenizer = _load_for_inference(args.model, args.adapter, args.allow_pickle, args.trust_remote_code)
    examples, report = load_examples(args.data or default_data_path(), tokenizer, args.max_length)
    if args.max_examples:
        examples = examples[:args.max_examples]
    features = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    ppl = perplexity(model, features, DataCollator(pad_token_id_for(tokenizer), packing=False), args.batch_size)
    print(f"perplexity: {ppl:.3f} ({len(features)} examples of {report.path})")
    return 0


# ---- merge -------------------------------------------------------------------------------------
def _merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base and write a plain transformers folder")
    _add_model_flag(p)
    p.add_argument("--adapter", required=True, help="adapter folder")
    _add_pickle_flag(p)
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
    model, tokenizer = _load_for_inference(args.model, args.adapter, args.allow_pickle, args.trust_remote_code)
    merged = model.merge_and_unload(safe_merge=True)
    with atomic_directory(args.output) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged model written to {args.output}")
    return 0


# ---- inspect -----------------------------------------------------------------------------------
def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="list a model's adaptable layers, default targets and parameter counts")
    p.add_argument("model", nargs="?", default=None, help="hub id, local folder or .gguf (default: embedded model)")
    _add_trust_flag(p)
    p.add_argument("--r", type=POSITIVE_INT, default=8, help="rank for the trainable-parameter count")
    p.add_argument("--targets", default=None, help="comma-separated names, a regex, or all-linear")
    p.add_argument("--memory", action="store_true", help="estimate training memory (full / LoRA / QLoRA)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--objective", default="sft", choices=("sft", "dpo", "ipo", "orpo", "simpo", "kto"),
                   help="--memory for preference training: --batch-size pairs (kto: rows) of --seq-len tokens")
    p.set_defaults(func=cmd_inspect)


def meta_model(name: str | None, trust_remote_code: bool = False):
    """The model's architecture on the meta device: no weights are read or downloaded."""
    import torch

    from ..hub import auto_class_for_task, load_config

    config = load_config(name, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return auto_class_for_task("CAUSAL_LM").from_config(config)


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..tuners.targets import (
        DEFAULT_TARGETS,
        FUSED_SLICES,
        describe_adaptable,
        model_type,
        parse_targets,
        resolve_targets,
    )

    model = meta_model(args.model, trust_remote_code=args.trust_remote_code)
    mtype = model_type(model)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (embedded)'} ({type(model).__name__}, type {mtype})")
    rows = describe_adaptable(model)
    print(f"\n{'layer name pattern':<48} {'type':<10} {'in':>6} {'out':>6} {'count':>5}")
    for row in rows:
        print(f"{row['pattern']:<48} {row['kind']:<10} {row['in']:>6} {row['out']:>6} {row['count']:>5}")
    print(f"\ndefault targets: {DEFAULT_TARGETS.get(mtype, 'none (pass --targets)')}")
    for fused, names in FUSED_SLICES.get(mtype or "", {}).items():
        print(f"fused slices of {fused}: {', '.join(names)} (e.g. --targets {names[0]},{names[-1]})")
    targets = parse_targets(args.targets)
    chosen = resolve_targets(model, targets if targets is not None else None)
    total = sum(p.numel() for p in model.parameters())
    trainable = 0
    for t in chosen:
        module = model.get_submodule(t.name)
        from ..tuners.targets import in_out_features

        fin, fout = in_out_features(module)
        if t.slices:
            trainable += len(t.slices) * args.r * (fin + (t.slices[0][1] - t.slices[0][0]))
        else:
            trainable += args.r * (fin + fout)
    label = args.targets or "default targets"
    print(f"LoRA r={args.r} on {label}: {len(chosen)} layers, trainable params: {trainable:,d} "
          f"|| all params: {total + trainable:,d} || trainable%: {100 * trainable / (total + trainable):.4f}")
    if args.memory:
        from ..tools.memory import estimate_training_memory, format_estimates

        kw = dict(batch_size=args.batch_size, seq_len=args.seq_len, r=args.r, objective=args.objective)
        if targets is not None:
            kw["target_modules"] = targets
        estimates = [estimate_training_memory(model.config, m, **kw) for m in ("full", "lora", "qlora")]
        what = "" if args.objective == "sft" else f", {args.objective}: " + ("rows" if args.objective == "kto"
                                                                             else "pairs")
        print(f"\nestimated training memory (batch {args.batch_size} x {args.seq_len} tokens{what}, AdamW):")
        print(format_estimates(estimates))
    return 0


# ---- entry point -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptune", description="Parameter-efficient fine-tuning with peft-compatible adapters.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _generate_parser(sub)
    _eval_parser(sub)
    _merge_parser(sub)
    _inspect_parser(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """The error as one line, whatever a library put into the text it wraps."""
    return " ".join(part.strip() for part in str(exc).strip().splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted before or after the command
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    with _quiet_libraries(enabled=not debug):
        try:
            return args.func(args)
        except AdaptuneError as exc:
            if debug:
                raise
            print(f"adaptune: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("adaptune: interrupted", file=sys.stderr)
            return 130


@contextmanager
def _quiet_libraries(enabled: bool) -> Iterator[None]:
    """Hide library chatter (deprecation notes, info logs) for the command's duration only."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    bnb_logger = logging.getLogger("bitsandbytes")  # warns about an optional hub kernel on import
    old_bnb, old_hf = bnb_logger.level, hf_logging.get_verbosity()
    bnb_logger.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        bnb_logger.setLevel(old_bnb)
        hf_logging.set_verbosity(old_hf)


if __name__ == "__main__":
    sys.exit(main())
