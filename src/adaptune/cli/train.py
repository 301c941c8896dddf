"""``adaptune train``: every option of ``TrainJob`` as a flag; a YAML file with the same names under them."""

from __future__ import annotations

import argparse
import dataclasses

from .options import add_model_flag


def add_parser(sub) -> None:
    from ..training.job import TrainJob

    defaults = TrainJob()
    p = sub.add_parser("train", help="fine-tune a model (default: SmolLM2-135M on Shakespeare)",
                       description="Fine-tune with LoRA (or another method) and save a peft-format adapter.")
    p.add_argument("--config", help="YAML file with the same option names; flags given here win")
    add_model_flag(p)
    p.add_argument("--data", help="a txt, jsonl, json, csv, parquet or arrow file, a folder written by datasets' "
                                  "save_to_disk, or a hub dataset id (rows: text, prompt/completion, messages, "
                                  "conversations, instruction/output); several sources with weights: list them "
                                  "under data: in --config. Default: the embedded Shakespeare")
    p.add_argument("--output", help=f"output folder (default {defaults.output})")
    _method_flags(p, defaults)
    _objective_flags(p)
    _data_flags(p, defaults)
    _schedule_flags(p, defaults)
    # every train option is None unless given, so that a YAML value stands unless a flag says otherwise
    p.set_defaults(func=cmd_train, trust_remote_code=None)


def _method_flags(p: argparse.ArgumentParser, d) -> None:
    """What is trained: the method, LoRA's shape, and how the base is stored."""
    p = p.add_argument_group("method")
    from ..device import PRECISIONS
    from ..training.methods import METHODS

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
    p.add_argument("--dtype", help="the base's weights: float32 | bfloat16 | float16 | auto (the checkpoint's; "
                                   "default: by hardware)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the products' precision (autocast; adapters stay fp32). auto (default): bf16 where the "
                        "hardware computes it natively (recent GPUs, CPUs with AVX512-BF16 or AMX), fp16 on "
                        "older GPUs, else fp32; the run says which and why")


def _objective_flags(p: argparse.ArgumentParser) -> None:
    """What the adapter learns from: text (sft) or preferences (docs/preference.md)."""
    p = p.add_argument_group("objective")
    from ..training.preference.options import DEFAULT_BETA, LOSS_TYPES, OBJECTIVES

    p.add_argument("--objective", choices=OBJECTIVES,
                   help="sft (default), or preference tuning: dpo, ipo, orpo, simpo, kto; --data then holds "
                        "{prompt, chosen, rejected} pairs ({prompt, completion, label} rows, or pairs, for kto)")
    p.add_argument("--beta", type=float, help="preference strength (default by objective: "
                   + ", ".join(f"{o} {b:g}" for o, b in DEFAULT_BETA.items()) + ")")
    p.add_argument("--loss-type", help="the objective's variant: "
                   + "; ".join(f"{o}: {', '.join(t)}" for o, t in LOSS_TYPES.items() if len(t) > 1)
                   + " (default: the first)")
    p.add_argument("--label-smoothing", type=float, help="dpo --loss-type robust, simpo: the assumed share of "
                                                         "pairs whose labels are flipped")
    p.add_argument("--ref-adapter", metavar="DIR", help="continue this (SFT) adapter; a frozen copy of it is the "
                                                        "reference")


def _data_flags(p: argparse.ArgumentParser, d) -> None:
    """How the data becomes training rows."""
    p = p.add_argument_group("data")
    from ..data.formats import FORMATS

    p.add_argument("--data-config", help="the hub dataset's configuration (subset)")
    p.add_argument("--data-split", help="the split of a hub dataset or saved DatasetDict (default train)")
    p.add_argument("--data-format", choices=FORMATS, help="the rows' format (default: detected from their keys)")
    p.add_argument("--columns", help="map column names onto adaptune's: name=column,... "
                                     "(e.g. prompt=question,completion=answer)")
    p.add_argument("--streaming", action="store_true", default=None,
                   help="read, tokenize and pack the data on the fly, for data larger than memory (needs --max-steps)")
    p.add_argument("--stream-window", type=int, help=f"rows packed and shuffled together when streaming "
                                                     f"(default {d.stream_window})")
    p.add_argument("--token-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the tokens of an earlier run on the same data, tokenizer and options (default on)")
    p.add_argument("--token-cache-dir", help="where tokens are cached (default $ADAPTUNE_TOKEN_CACHE or "
                                             "~/.cache/adaptune/tokens)")
    p.add_argument("--max-length", type=int, help=f"tokens per block/example (default {d.max_length})")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="pack short examples into full blocks (default on)")
    p.add_argument("--train-on-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="loss on prompts too, not only answers (default off)")
    p.add_argument("--val-fraction", type=float, help=f"validation share (default {d.val_fraction})")
    p.add_argument("--max-examples", type=int, help="use only the first N examples")


def _schedule_flags(p: argparse.ArgumentParser, d) -> None:
    """How long, how fast, and what is written along the way."""
    p = p.add_argument_group("schedule and output")
    from ..training.methods import DEFAULT_LR

    p.add_argument("--epochs", type=float, help=f"used when --max-steps is 0 (default {d.epochs})")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps; 0 = by epochs (default {d.max_steps})")
    p.add_argument("--lr", type=float, help="learning rate (default by method: "
                   + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    p.add_argument("--batch-size", type=int, help=f"per device (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"gradient accumulation steps (default {d.grad_accum})")
    p.add_argument("--eval-every", type=int, help=f"validation loss every N steps, plotted in loss.png; 0 = only "
                                                  f"perplexity before/after (default {d.eval_every})")
    p.add_argument("--save-every", type=int, help=f"checkpoint every N steps (default {d.save_every})")
    p.add_argument("--logging-steps", type=int, help=f"log the training loss every N steps (default {d.logging_steps})")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint in --output")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--report-to", help="tensorboard, wandb, mlflow or none (several comma-separated; default none); "
                                       "their local files go under --output")
    p.add_argument("--run-name", help="the run's name in the trackers")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the adapter folder and its model card to this hub "
                                                         "repo after saving it")


def job_from_args(args: argparse.Namespace):
    from ..training.job import TrainJob

    fields = {f.name for f in dataclasses.fields(TrainJob)}
    # None = not given; False from a --no-X switch is a choice (it must win over a YAML value too)
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return TrainJob.from_yaml(args.config, **given) if args.config else TrainJob(**given)


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.run import run_train

    run_train(job_from_args(args))
    # Only after a run that ended well: a failed rank's peers may still be inside a collective,
    # and ending the group under them can wait on them for ever (the failure ends the job anyway).
    close_process_group()
    return 0


def close_process_group() -> None:
    """Under torchrun, end the process group before the interpreter does: gloo's worker threads
    left running at exit sometimes abort the process ("terminate called without an active
    exception", SIGABRT) after a run that trained and saved correctly (pytorch/pytorch#190489)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - never hide the run's own outcome behind a teardown error
            pass
