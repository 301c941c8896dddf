"""The fine-tuning job behind ``adaptune train``: model -> adapter -> data -> Trainer -> adapter folder.

One dataclass (``TrainJob``) holds every choice, so the CLI flags, a YAML file and Python callers
share one meaning and one set of defaults. The defaults are sized for the main job: the embedded
SmolLM2-135M-Instruct on the embedded Shakespeare, a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

METHODS = ("lora", "dora", "qlora", "prompt-tuning", "p-tuning", "prefix-tuning", "full")
PROMPT_METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning")
# --lr when not given: what each method trains well with (checked with bench/methods.py on SmolLM2-135M)
DEFAULT_LR = {"lora": 1e-3, "dora": 1e-3, "qlora": 1e-3, "prompt-tuning": 3e-2, "p-tuning": 1e-3,
              "prefix-tuning": 1e-2, "full": 5e-5}
SAMPLE_PROMPT = "Write a few lines in the style of Shakespeare about a king who cannot sleep."


@dataclass
class TrainJob:
    """Everything ``adaptune train`` needs; field names are the CLI flags with ``-`` for ``_``."""

    model: str | None = None  # hub id, local folder, .gguf file; None = embedded SmolLM2-135M
    data: str | None = None  # text / jsonl file; None = embedded Shakespeare
    output: str = "runs/adapter"
    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] | str | None = None  # None: the architecture's default (q_proj, v_proj...)
    quantize: str | None = None  # nf4 | fp4 | int8
    quantize_embeddings: bool = False  # int8 rows for the frozen embedding and tied head (LoRA-family methods)
    int8_modules: list[str] | str | None = None  # with 4-bit: these layers int8 (e.g. down_proj,v_proj)
    lora_init: str = "default"  # default | loftq (quantized base: start the adapter from the quantization error)
    loftq_iter: int = 5  # LoftQ's alternating iterations (more: a stored base closer to the full weights)
    virtual_tokens: int = 20
    epochs: float = 1.0
    max_steps: int = 60
    lr: float | None = None  # None: DEFAULT_LR[method]
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 128
    packing: bool = True
    train_on_prompt: bool = False
    val_fraction: float = 0.02
    max_examples: int | None = None
    eval_every: int = 30  # validation loss every N steps (plotted in loss.png); 0 = only before and after
    save_every: int = 20
    seed: int = 0
    resume: bool = False
    gradient_checkpointing: bool = False
    sample_prompt: str = SAMPLE_PROMPT
    sample_tokens: int = 48
    dtype: str | None = None
    logging_steps: int = 5
    trust_remote_code: bool = False  # run Python files that come with the model; only when asked
    objective: str = "sft"  # sft | dpo | ipo | orpo | simpo | kto (training.preference; --data: pairs / KTO rows)
    beta: float | None = None  # preference objectives; None: the objective's default
    loss_type: str | None = None  # the objective's variant (dpo: sigmoid, hinge, robust, ipo; kto: kto, ...)
    label_smoothing: float = 0.0  # dpo --loss-type robust, simpo
    ref_adapter: str | None = None  # continue this adapter; a frozen copy of it is the reference

    def __post_init__(self) -> None:
        _check_job_types(self)
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        from .preference.options import check_objective  # light: no training stack

        check_objective(self, DEFAULT_LR)
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if self.quantize_embeddings and self.method not in ("lora", "dora", "qlora"):
            raise ConfigError(f"--quantize-embeddings works with lora, dora and qlora; --method {self.method} "
                              "trains or reads the embedding table itself")
        self._check_quantization()
        if self.method == "prefix-tuning" and self.gradient_checkpointing:
            raise ConfigError("--method prefix-tuning does not work with --gradient-checkpointing (the "
                              "checkpointed layers drop the KV cache that carries the prefix); turn one off")
        for name, low in (("r", 1), ("batch_size", 1), ("grad_accum", 1), ("max_length", 1), ("virtual_tokens", 1),
                          ("logging_steps", 1), ("save_every", 1), ("loftq_iter", 1), ("max_steps", 0),
                          ("eval_every", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                kind = "a positive integer" if low else "an integer >= 0"
                raise ConfigError(f"--{name.replace('_', '-')} must be {kind}, got {value!r}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"--max-examples must be a positive integer (or left out for all), "
                              f"got {self.max_examples}")
        if self.max_steps == 0 and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"--epochs must be a positive number when --max-steps is 0, got {self.epochs}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        from ..tuners.targets import parse_targets  # here: the CLI builds its parser from this class

        self.targets = parse_targets(self.targets)

    @property
    def quantize_kind(self) -> str | None:
        """What the base is stored in: --quantize, or nf4 for --method qlora."""
        return self.quantize or ("nf4" if self.method == "qlora" else None)

    def _check_quantization(self) -> None:
        if isinstance(self.int8_modules, str):
            self.int8_modules = [m.strip() for m in self.int8_modules.split(",") if m.strip()]
        if self.int8_modules and self.quantize_kind not in ("nf4", "fp4"):
            raise ConfigError("--int8-modules mixes int8 layers into a 4-bit base: use it with --method qlora "
                              "or --quantize nf4/fp4")
        if self.lora_init not in ("default", "loftq"):
            raise ConfigError(f"--lora-init must be default or loftq, got {self.lora_init!r}")
        if self.lora_init == "loftq":
            if self.method not in ("lora", "qlora") or self.quantize_kind not in ("nf4", "int8"):
                raise ConfigError("--lora-init loftq starts LoRA from a quantized base's error: use it with "
                                  "--method qlora, or --method lora with --quantize nf4 or int8")
            if not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
                raise ConfigError(f"--loftq-iter must be a positive integer, got {self.loftq_iter!r}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainJob:
        """A YAML mapping of the same field names; command-line overrides win."""
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: cannot read YAML config ({exc})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
            raise ConfigError(f"{p}: cannot read YAML config ({problem}{where})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the YAML config must be a mapping of option names to values")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{p}: unknown options {', '.join(unknown)}")
        data.update(overrides)
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None


def _check_job_types(job: TrainJob) -> None:
    """Each option holds a value of its type (a YAML file can hold anything): ConfigError naming it.

    A number written as a string (YAML 1.1 reads ``1e-3`` as a string) is taken as the number.
    """
    import typing

    from ..config import _conforms, _describe_hint

    hints = typing.get_type_hints(type(job))
    for f in dataclasses.fields(job):
        value, hint = getattr(job, f.name), hints[f.name]
        if isinstance(value, str) and not _conforms(value, hint) and _conforms(1.5, hint):
            try:
                value = float(value)
            except ValueError:
                pass
            else:
                setattr(job, f.name, value)
        if not _conforms(value, hint):
            raise ConfigError(f"--{f.name.replace('_', '-')} must be {_describe_hint(hint)}, got {value!r:.80}")


def adapter_config_for(job: TrainJob, model: torch.nn.Module):
    """The peft-style config the method asks for (None for full fine-tuning)."""
    from ..config import LoftQConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    if job.method in ("lora", "dora", "qlora"):
        loftq: dict[str, Any] = {}
        if job.lora_init == "loftq":
            loftq = {"init_lora_weights": "loftq", "loftq_config": LoftQConfig(
                loftq_bits=8 if job.quantize_kind == "int8" else 4, loftq_iter=job.loftq_iter,
                loftq_bits_pattern={m: 8 for m in job.int8_modules or ()})}
        return LoraConfig(r=job.r, lora_alpha=job.alpha, lora_dropout=job.dropout, target_modules=job.targets,
                          use_dora=job.method == "dora", task_type=TaskType.CAUSAL_LM, **loftq)
    if job.method == "prompt-tuning":
        # start from embeddings of real tokens (sampled from the vocabulary), not N(0, 1) rows far
        # larger than the model's own embeddings (Lester et al.: a vocabulary init trains better)
        return PromptTuningConfig(num_virtual_tokens=job.virtual_tokens, task_type=TaskType.CAUSAL_LM,
                                  prompt_tuning_init="SAMPLE_VOCAB")
    if job.method == "p-tuning":
        # encoder_hidden_size None = the model's hidden size (peft's default): the MLP is as wide as the
        # embeddings it makes. Only its output (virtual_tokens x hidden) is saved.
        return PromptEncoderConfig(num_virtual_tokens=job.virtual_tokens, task_type=TaskType.CAUSAL_LM,
                                   encoder_hidden_size=None)
    if job.method == "prefix-tuning":
        return PrefixTuningConfig(num_virtual_tokens=job.virtual_tokens, task_type=TaskType.CAUSAL_LM)
    return None


def load_base(job: TrainJob):
    """Base model + tokenizer, quantized when the method or --quantize asks for it.

    transformers quantizes while loading, unless layers are to be mixed (``--int8-modules``) or
    LoftQ is to choose what each adapted layer stores: then the full-precision model is loaded and
    quantized in memory (``quant.quantize_linears``; with LoftQ by ``wrap_model``).
    """
    from ..hub import load_model_and_tokenizer

    quantize = job.quantize_kind
    in_memory = bool(quantize and (job.int8_modules or job.lora_init == "loftq"))
    kwargs: dict[str, Any] = {"dtype": job.dtype}
    if quantize and not in_memory:
        from ..quant.bnb import bnb_config

        kwargs["quantization_config"] = bnb_config(quantize)
    model, tokenizer = load_model_and_tokenizer(job.model, trust_remote_code=job.trust_remote_code, **kwargs)
    if in_memory and job.lora_init != "loftq":
        from ..quant.bnb import quantize_linears

        quantize_linears(model, quantize, job.int8_modules or ())
    if quantize:
        from ..quant.bnb import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.gradient_checkpointing)
    if job.quantize_embeddings:
        from ..quant.int8_embedding import quantize_embeddings

        quantize_embeddings(model)
    return model, tokenizer


def wrap_model(job: TrainJob, model: torch.nn.Module):
    """Apply the method: a PeftModel for adapters, the model itself (all trainable) for ``full``."""
    from ..peft_model import get_peft_model

    config = adapter_config_for(job, model)
    if config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    peft_model = get_peft_model(model, config)
    if job.lora_init == "loftq":  # LoftQ quantized the adapted layers; the others are quantized plainly
        from ..quant.bnb import keep_trainable_layout, quantize_linears, release_checkpoint_mapping

        quantize_linears(peft_model.get_base_model(), job.quantize_kind, job.int8_modules or ())
        release_checkpoint_mapping(model)
        keep_trainable_layout(model)
    return peft_model


@torch.no_grad()
def init_prefix_from_text(peft_model: Any, token_ids: list[int]) -> None:
    """Start a prefix-tuning adapter as the keys/values the base model computes for real tokens.

    Li & Liang (2021, section 7.2) found random prefixes train far worse than prefixes initialised
    with the activations of real words. With the first ``num_virtual_tokens`` of ``token_ids`` (the
    first training example, repeated if short), the untrained adapter behaves exactly as if those
    tokens were in front of the input, instead of as N(0, 1) keys and values in every layer (which
    multiplied SmolLM2's validation perplexity by ten). Only a plain (unprojected) prefix is set.
    """
    config = peft_model.peft_config[peft_model.active_adapter]
    encoder = peft_model.prompt_encoder[peft_model.active_adapter]
    if getattr(config, "prefix_projection", True) or not token_ids:
        return
    nvt = config.num_virtual_tokens
    ids = (list(token_ids) * (nvt // len(token_ids) + 1))[:nvt]
    base = peft_model.get_base_model()
    weight = encoder.embedding.weight
    was_training = base.training
    base.eval()
    try:
        out = base(input_ids=torch.tensor([ids], device=weight.device), use_cache=True)
    finally:
        base.train(was_training)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    rows = []
    for layer in cache.layers[:config.num_layers]:  # each (1, kv_heads, nvt, head_dim)
        rows += [layer.keys[0].transpose(0, 1).reshape(nvt, -1), layer.values[0].transpose(0, 1).reshape(nvt, -1)]
    prefix = torch.cat(rows, dim=1)  # peft's row layout: per layer keys then values, heads x head_dim
    if prefix.shape != weight.shape:
        return  # a layout this function does not know (e.g. an encoder-decoder): keep peft's random init
    weight.copy_(prefix.to(weight.dtype))


def _say(text: str) -> None:
    print(text, flush=True)


def _model_card(job: TrainJob, result: dict) -> str:
    command = "adaptune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "adaptune train"
    return "\n".join([
        "---", "library_name: adaptune", f"base_model: {job.model or 'SmolLM2-135M-Instruct (embedded GGUF)'}",
        "tags: [peft, adaptune, " + job.method + "]", "---", "",
        f"# {job.method} adapter trained with adaptune", "",
        "Trained with:", "", "```", command, "```", "",
        f"Data: `{job.data or 'embedded Shakespeare'}`; {result.get('train_blocks')} training blocks of up to "
        f"{job.max_length} tokens; {result.get('steps')} steps.", "",
        f"Validation perplexity: {result.get('ppl_before', float('nan')):.2f} before, "
        f"{result.get('ppl_after', float('nan')):.2f} after.", "",
        "Load with `adaptune generate --adapter <this folder>`, or in Python with "
        "`adaptune.PeftModel.from_pretrained(base, folder)` (peft reads it too).", "",
        "Full settings:", "", "```json", json.dumps(dataclasses.asdict(job), indent=2, default=str), "```", "",
    ])


def _refuse_sharded_launch() -> None:
    """``adaptune train`` measures, samples and saves on the main process alone, which needs every
    weight whole there: under FSDP or DeepSpeed ZeRO-3 (``accelerate launch``, which turns them on
    only where there are accelerators) it would hang in a gather or save one process's shards."""
    from .trainer import _accelerator_type, launched_with

    fsdp = launched_with("ACCELERATE_USE_FSDP")
    zero3 = launched_with("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    if (fsdp or zero3) and _accelerator_type() is not None:
        raise ConfigError(f"adaptune train runs several processes as DDP (torchrun, or accelerate launch without "
                          f"{'--use_fsdp' if fsdp else 'ZeRO stage 3'}): it evaluates and saves on one process, which "
                          f"needs whole weights. To shard the model, train with adaptune.Trainer in a script "
                          f"(README, 'Several processes')")


def run_train(job: TrainJob, say: Callable[[str], None] = _say) -> dict:
    """Run the whole job; returns the numbers it printed (perplexities, time, samples)."""
    if job.objective != "sft":
        from .preference.run import run_preference

        return run_preference(job, say)
    from ..atomic import atomic_write_json, atomic_write_text, check_writable, remove_temporaries
    from ..data.examples import (
        DataCollator,
        build_datasets,
        check_data_file,
        default_data_path,
        pad_token_id_for,
        supports_packing,
    )
    from ..tools.evaluation import perplexity
    from ..tools.generation import generate_text
    from .trainer import Trainer, TrainingArguments

    started = time.time()
    _refuse_sharded_launch()
    out = Path(job.output)
    check_writable(out, need_bytes=50 * 2**20)
    if int(os.environ.get("RANK", "0")) == 0:  # temporary files of a killed earlier run
        for folder in [out, *sorted(out.glob("checkpoint-*"))]:
            remove_temporaries(folder)
    data_path = job.data or str(default_data_path())
    check_data_file(data_path)  # before the (slow) model load
    torch.manual_seed(job.seed)
    say(f"loading {job.model or 'SmolLM2-135M-Instruct (embedded)'} ...")
    model, tokenizer = load_base(job)
    if job.packing and job.method in PROMPT_METHODS:
        # the virtual tokens / prefix go in front of each row, not of each packed example: later
        # examples in a block would train without them (prefix tuning would also let them see each other)
        packing = False
        say(f"note: --method {job.method} puts its virtual tokens in front of each row, so examples are "
            f"not packed (one example a row, padded)")
    else:
        packing = job.packing and supports_packing(model)
        if job.packing and not packing:
            say("note: this model does not keep packed examples apart; training without packing")
    train, val, report = build_datasets(data_path, tokenizer, max_length=job.max_length, packing=packing,
                                        val_fraction=job.val_fraction, seed=job.seed, max_examples=job.max_examples,
                                        train_on_prompt=job.train_on_prompt)
    say(f"data: {report.summary()}")
    collator = DataCollator(pad_token_id_for(tokenizer), packing=packing)
    result: dict[str, Any] = {"train_blocks": len(train), "val_blocks": len(val)}
    is_main = int(os.environ.get("RANK", "0")) == 0

    if is_main and not job.resume:
        result["sample_before"] = generate_text(model, tokenizer, job.sample_prompt, max_new_tokens=job.sample_tokens,
                                                seed=job.seed)
        say(f"sample before: {result['sample_before']!r}")
    # the adapter's random init must not depend on what ran before it (no sample on --resume)
    torch.manual_seed(job.seed)
    peft_model = wrap_model(job, model)
    if job.method == "prefix-tuning" and train:
        init_prefix_from_text(peft_model, train[0]["input_ids"])
    if hasattr(peft_model, "get_nb_trainable_parameters"):
        trainable, total = peft_model.get_nb_trainable_parameters()
    else:  # full fine-tuning
        total = sum(p.numel() for p in peft_model.parameters())
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    result["trainable_params"], result["all_params"] = trainable, total
    say(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    if val and is_main:
        with _adapter_off(peft_model):
            result["ppl_before"] = perplexity(peft_model, val, collator, batch_size=job.batch_size)
        say(f"validation perplexity before: {result['ppl_before']:.2f}")

    args = TrainingArguments(
        output_dir=str(out), max_steps=job.max_steps if job.max_steps > 0 else -1, num_train_epochs=job.epochs,
        per_device_train_batch_size=job.batch_size, per_device_eval_batch_size=job.batch_size,
        gradient_accumulation_steps=job.grad_accum, learning_rate=job.lr, lr_scheduler_type="cosine",
        warmup_steps=min(10, max(job.max_steps // 10, 1)) if job.max_steps > 0 else 10,
        logging_steps=job.logging_steps, save_steps=job.save_every, save_total_limit=2,
        eval_strategy="steps" if job.eval_every and val else "no", eval_steps=job.eval_every or None,
        seed=job.seed, data_seed=job.seed, gradient_checkpointing=job.gradient_checkpointing,
        remove_unused_columns=False, report_to="none", dataloader_num_workers=0,
        disable_tqdm=False,  # transformers hides the bar when its log level is above WARN (the CLI's default)
    )
    trainer_class = _encoder_checkpoint_trainer() if _reparameterised(peft_model) else Trainer
    trainer = trainer_class(model=peft_model, args=args, train_dataset=train, eval_dataset=val or None,
                            data_collator=collator, processing_class=tokenizer)
    checkpoint = _last_checkpoint(out, say) if job.resume else None
    if job.resume and checkpoint is None:
        say(f"--resume: no complete checkpoint in {out}; training from the start")
    finished = _finished_state(checkpoint, job) if checkpoint else None
    if finished is not None:
        # transformers would train one step past max_steps when resumed from the last checkpoint
        # (a run killed after training, while evaluating or saving): load it and finish instead
        say(f"training had reached step {finished['global_step']} in {checkpoint}; finishing from there")
        trainer._load_from_checkpoint(checkpoint)
        result["steps"] = finished["global_step"]
        result["train_loss"] = _logged_train_loss(finished)
        if (out / "metrics.jsonl").is_file():
            from ..atomic import read_jsonl
            from .callbacks import plot_losses

            plot_losses(read_jsonl(out / "metrics.jsonl"), out / "loss.png")
    else:
        train_out = trainer.train(resume_from_checkpoint=checkpoint)
        result["steps"] = train_out.global_step
        result["train_loss"] = train_out.training_loss
        result["train_seconds"] = round(float(train_out.metrics.get("train_runtime", float("nan"))), 2)
        result["train_tokens"] = trainer.step_stats.tokens
    if is_main:
        _save_final(peft_model, tokenizer, out)
        if val:
            result["ppl_after"] = perplexity(peft_model, val, collator, batch_size=job.batch_size)
            say(f"validation perplexity after: {result['ppl_after']:.2f}"
                + (f" (before: {result['ppl_before']:.2f})" if "ppl_before" in result else ""))
        result["sample_after"] = generate_text(peft_model, tokenizer, job.sample_prompt,
                                               max_new_tokens=job.sample_tokens, seed=job.seed)
        say(f"sample after: {result['sample_after']!r}")
        result["seconds"] = round(time.time() - started, 1)
        atomic_write_text(out / "README.md", _model_card(job, result))
        atomic_write_json(out / "train_result.json", result)
        what = "adapter saved to" if hasattr(peft_model, "peft_config") else "model saved to"
        where = out if hasattr(peft_model, "peft_config") else out / "model"
        say(f"{what} {where} ({result['seconds']:.0f} s); loss plot: {out / 'loss.png'}")
    return result


def _last_checkpoint(out: Path, say: Callable[[str], None] = _say) -> str | None:
    """The newest checkpoint-N in ``out`` that was written completely (its trainer_state.json, which
    transformers writes last, reads whole) and whose files read back (safetensors headers, torch zip
    checksums; nothing is unpickled). A torn or corrupt checkpoint is skipped with a line saying why."""
    if not out.is_dir():
        return None
    steps = [(int(c.name.partition("-")[2]), c) for c in out.iterdir()
             if c.name.partition("-")[0] == "checkpoint" and c.name.partition("-")[2].isdigit() and c.is_dir()]
    for _, folder in sorted(steps, reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            say(f"--resume: skipping {folder}: it was not completely written")
            continue
        problem = _checkpoint_problem(folder)
        if problem is None:
            return str(folder)
        say(f"--resume: skipping {folder}: {problem}")
    return None


def _checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint's files cannot be resumed from, or None. Reads headers and zip checksums only."""
    import zipfile

    from safetensors import safe_open

    names = {p.name for p in folder.iterdir()}
    weights = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
    if not names & set(weights):  # e.g. a kill while transformers deleted an old checkpoint
        return "it holds no weights file (adapter_model.safetensors or model.safetensors)"
    for required in ("optimizer.pt", "scheduler.pt"):
        if required not in names:
            return f"it has no {required}"
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):  # a temporary file a kill left: not part of the checkpoint
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            elif path.suffix in (".pt", ".pth"):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    return f"{path.name} is corrupt (bad checksum in {bad})"
        except zipfile.BadZipFile as exc:
            return f"{path.name} is not a whole torch archive ({exc})"
        except Exception as exc:  # noqa: BLE001 - safetensors / OS errors: the file is unusable
            return f"{path.name} cannot be read ({(str(exc).splitlines() or [type(exc).__name__])[0]})"
    return None


def _finished_state(checkpoint: str, job: TrainJob) -> dict | None:
    """The checkpoint's trainer state if the job's training was complete there, else None."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if job.max_steps > 0:
        target = job.max_steps
    elif state.get("num_train_epochs") == job.epochs or state.get("num_train_epochs") == math.ceil(job.epochs):
        target = int(state.get("max_steps") or 0)
    else:
        return None
    return state if 0 < target <= step else None


def _logged_train_loss(state: dict) -> float | None:
    """The mean logged training loss of a finished run's trainer state."""
    history = state.get("log_history") or []
    for record in reversed(history):
        if isinstance(record.get("train_loss"), (int, float)):
            return float(record["train_loss"])
    losses = [r["loss"] for r in history if isinstance(r.get("loss"), (int, float))]
    return sum(losses) / len(losses) if losses else None


class _adapter_off:
    """Context: the base model's behaviour (adapter disabled), or nothing for full fine-tuning."""

    def __init__(self, model: Any) -> None:
        self.ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False


def _save_final(model: Any, tokenizer: Any, out: Path) -> None:
    """The adapter (or, for full fine-tuning, the whole model) and the tokenizer, each atomically."""
    from ..atomic import atomic_directory

    if hasattr(model, "peft_config"):
        model.save_pretrained(out)
        return
    with atomic_directory(out / "model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


# ---- P-tuning (and projected prefix tuning) checkpoints ------------------------------------------
ENCODER_STATE = "prompt_encoder_state.safetensors"


def _reparameterised(model: Any) -> bool:
    """Whether the adapter trains a network (P-tuning's MLP/LSTM) whose output alone is the peft file."""
    from ..config import PromptEncoderConfig

    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    return isinstance(config, PromptEncoderConfig) or bool(getattr(config, "prefix_projection", False))


def _encoder_checkpoint_trainer():
    from .trainer import Trainer

    class EncoderCheckpointTrainer(Trainer):
        """Checkpoints also hold the encoder network, and resume restores it.

        The peft file holds only the encoder's output; resuming from that alone would replace the
        MLP with a plain embedding, and the saved optimizer state (made for the MLP's parameters)
        would no longer fit it.
        """

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            super()._save(output_dir, state_dict)
            if self.args.should_save:
                from ..atomic import atomic_save_safetensors
                from ..tuners.lora.files import disk_tensors

                model = self.accelerator.unwrap_model(self.model)
                encoder = model.prompt_encoder[model.active_adapter]
                tensors = disk_tensors(encoder.state_dict())
                folder = Path(output_dir if output_dir is not None else self.args.output_dir)
                atomic_save_safetensors(tensors, folder / ENCODER_STATE)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            path = Path(resume_from_checkpoint) / ENCODER_STATE
            if not path.is_file():
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            from safetensors.torch import load_file

            model = self.accelerator.unwrap_model(model if model is not None else self.model)
            model.prompt_encoder[model.active_adapter].load_state_dict(load_file(str(path)), strict=True)

    return EncoderCheckpointTrainer
