"""The fine-tuning run behind ``adaptune train``: model -> adapter -> data -> Trainer -> adapter folder.

Each step is its own function, in the order :func:`run_train` calls them: check the output folder
and the data file (before the slow model load), load the base, build the datasets, sample and
measure before training, wrap the model with the method, train (or resume, or finish a run that
had already trained), then save, measure, sample and write the model card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import device
from ..errors import ConfigError
from ..hub import describe_model
from .job import TrainJob
from .methods import PROMPT_METHODS, load_base, wrap_model
from .tracking import check_trackers, parse_report_to, tracking_env

Say = Callable[[str], None]

__all__ = ["checked_sources", "prepare_output", "publish", "run_train", "save_final", "trainer_arguments"]


def _say(text: str) -> None:
    print(text, flush=True)


@dataclass
class _Data:
    """The run's datasets and how they are batched."""

    train: list[dict] | Any  # a StreamedDataset with --streaming
    val: list[dict]
    collator: Any
    packing: bool
    sources: list = dataclasses.field(default_factory=list)


def run_train(job: TrainJob, say: Say = _say) -> dict:
    """Run the whole job; returns the numbers it printed (perplexities, time, samples)."""
    if job.objective != "sft":
        from .preference.run import run_preference

        return run_preference(job, say)
    started = time.time()
    out = prepare_output(job)
    sources = checked_sources(job, say)
    torch.manual_seed(job.seed)
    say(f"loading {describe_model(job.model)} ...")
    model, tokenizer = load_base(job)
    data = _datasets(job, model, tokenizer, sources, say)
    blocks = "streamed" if job.streaming else len(data.train)
    result: dict[str, Any] = {"train_blocks": blocks, "val_blocks": len(data.val)}
    if device.is_main_process() and not job.resume:
        result["sample_before"] = _sample(job, model, tokenizer, say, "before")
    # the adapter's random init must not depend on what ran before it (no sample on --resume)
    torch.manual_seed(job.seed)
    model = _wrapped(job, model, data, result, say)
    trackers = parse_report_to(job.report_to)
    with tracking_env(trackers, out):
        trainer = _trainer(job, model, tokenizer, data, out, say)
        _train(job, trainer, data, out, result, say)
    if device.is_main_process():
        _finish(job, model, tokenizer, data, out, result, say)
        result["seconds"] = round(time.time() - started, 1)
        publish(job, model, out, result, say)
    return result


def prepare_output(job: TrainJob) -> Path:
    """Refuse what cannot work, before anything slow: a sharded launch, an unwritable output, a
    tracker that is not installed; remove the temporary files a killed earlier run left."""
    from ..atomic import check_writable, remove_temporaries

    _refuse_sharded_launch()
    out = Path(job.output)
    check_writable(out, need_bytes=50 * 2**20)
    if device.is_main_process():
        for folder in [out, *sorted(out.glob("checkpoint-*"))]:
            remove_temporaries(folder)
    check_trackers(parse_report_to(job.report_to))
    return out


def checked_sources(job: TrainJob, say: Say) -> list:
    """The data sources, checked before the slow model load (a missing file, a hub dataset that
    cannot be had offline)."""
    from ..data.sources import check_available, parse_sources

    sources = parse_sources(job.data, job.data_format, job.columns, job.data_split, job.data_config)
    for source in sources:
        check_available(source)
    if job.push_to_hub:
        from .push import offline_note

        note = offline_note(job.push_to_hub)
        if note:
            say(note)
    return sources


def _refuse_sharded_launch() -> None:
    """``adaptune train`` measures, samples and saves on the main process alone, which needs every
    weight whole there: under FSDP or DeepSpeed ZeRO-3 (``accelerate launch``, which turns them on
    only where there are accelerators) it would hang in a gather or save one process's shards."""
    import os

    fsdp = device.launched_with("ACCELERATE_USE_FSDP")
    zero3 = (device.launched_with("ACCELERATE_USE_DEEPSPEED")
             and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")
    if (fsdp or zero3) and device.accelerator_type() is not None:
        raise ConfigError(f"adaptune train runs several processes as DDP (torchrun, or accelerate launch without "
                          f"{'--use_fsdp' if fsdp else 'ZeRO stage 3'}): it evaluates and saves on one process, which "
                          f"needs whole weights. To shard the model, train with adaptune.Trainer in a script "
                          f"(docs/distributed.md)")


def _datasets(job: TrainJob, model: torch.nn.Module, tokenizer: Any, sources: list, say: Say) -> _Data:
    """Read, tokenize, split and (where the method and model allow it) pack the data, or set up
    the stream that does so on the fly (``--streaming``)."""
    from ..data import DataCollator, build_datasets, pad_token_id_for, supports_packing

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
    collator = DataCollator(pad_token_id_for(tokenizer), packing=packing)
    if job.streaming:
        from ..data.streaming import build_streaming

        stream, val, line = build_streaming(sources, tokenizer, job.max_length, packing, job.seed, job.val_fraction,
                                            job.stream_window, job.train_on_prompt)
        say(f"data: {line}")
        return _Data(stream, val, collator, packing, sources)
    train, val, report = build_datasets(sources, tokenizer, max_length=job.max_length, packing=packing,
                                        val_fraction=job.val_fraction, seed=job.seed, max_examples=job.max_examples,
                                        train_on_prompt=job.train_on_prompt, cache=job.token_cache,
                                        cache_dir=job.token_cache_dir)
    say(f"data: {report.summary()}")
    return _Data(train, val, collator, packing, sources)


def _sample(job: TrainJob, model: torch.nn.Module, tokenizer: Any, say: Say, when: str) -> str:
    from ..tools.generation import generate_text

    text = generate_text(model, tokenizer, job.sample_prompt, max_new_tokens=job.sample_tokens, seed=job.seed)
    say(f"sample {when}: {text!r}")
    return text


def _wrapped(job: TrainJob, model: torch.nn.Module, data: _Data, result: dict, say: Say) -> torch.nn.Module:
    """The model with the method applied, its parameter counts said, and the perplexity before."""
    from ..tools.evaluation import perplexity

    peft_model = wrap_model(job, model)
    if job.method == "prefix-tuning" and data.train:
        from ..tuners.prompt.init import init_prefix_from_text

        first = data.train[0] if isinstance(data.train, list) else next(iter(data.train))
        init_prefix_from_text(peft_model, first["input_ids"])
    if hasattr(peft_model, "get_nb_trainable_parameters"):
        trainable, total = peft_model.get_nb_trainable_parameters()
    else:  # full fine-tuning
        total = sum(p.numel() for p in peft_model.parameters())
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    result["trainable_params"], result["all_params"] = trainable, total
    say(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    if data.val and device.is_main_process():
        with _adapter_off(peft_model):
            result["ppl_before"] = perplexity(peft_model, data.val, data.collator, batch_size=job.batch_size)
        say(f"validation perplexity before: {result['ppl_before']:.2f}")
    return peft_model


def _trainer(job: TrainJob, model: torch.nn.Module, tokenizer: Any, data: _Data, out: Path, say: Say):
    from .arguments import TrainingArguments
    from .trainer import Trainer

    args = TrainingArguments(**trainer_arguments(job, out, bool(data.val), say), remove_unused_columns=False,
                             ignore_data_skip=job.streaming)  # a stream resumes at its saved position
    trainer = Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.val or None,
                      data_collator=data.collator, processing_class=tokenizer)
    if job.streaming:
        from .stream_state import StreamPositionSaver

        trainer.add_callback(StreamPositionSaver(data.train))
    return trainer


def trainer_arguments(job: TrainJob, out: Path, has_val: bool, say: Say) -> dict[str, Any]:
    """The TrainingArguments every objective takes from the job (precision said with its reason)."""
    precision = device.training_precision(job.precision)
    say(f"precision: {precision.name} ({precision.reason})")
    return dict(
        bf16=precision.bf16, fp16=precision.fp16, use_cpu=device.accelerator_type() is None,
        output_dir=str(out), max_steps=job.max_steps if job.max_steps > 0 else -1, num_train_epochs=job.epochs,
        per_device_train_batch_size=job.batch_size, per_device_eval_batch_size=job.batch_size,
        gradient_accumulation_steps=job.grad_accum, learning_rate=job.lr, lr_scheduler_type="cosine",
        warmup_steps=min(10, max(job.max_steps // 10, 1)) if job.max_steps > 0 else 10,
        logging_steps=job.logging_steps, save_steps=job.save_every, save_total_limit=2,
        eval_strategy="steps" if job.eval_every and has_val else "no", eval_steps=job.eval_every or None,
        seed=job.seed, data_seed=job.seed, gradient_checkpointing=job.gradient_checkpointing,
        report_to=parse_report_to(job.report_to) or "none", run_name=job.run_name, dataloader_num_workers=0,
        disable_tqdm=False,  # transformers hides the bar when its log level is above WARN (the CLI's default)
    )


def _train(job: TrainJob, trainer: Any, data: _Data, out: Path, result: dict, say: Say) -> None:
    """Train from the start or from the last complete checkpoint (``--resume``; a stream goes on at
    the position saved with it); a run killed after its last step (while evaluating or saving) is
    finished from its checkpoint instead."""
    from .checkpoints import finished_state, last_complete_checkpoint, logged_train_loss
    from .stream_state import STREAM_STATE, resume_stream

    need = (STREAM_STATE,) if job.streaming else ()
    checkpoint = (last_complete_checkpoint(out, say=lambda line: say(f"--resume: {line}"), require=need)
                  if job.resume else None)
    if job.resume and checkpoint is None:
        say(f"--resume: no complete checkpoint in {out}; training from the start")
    finished = finished_state(checkpoint, job.max_steps, job.epochs) if checkpoint else None
    if finished is None:
        if job.streaming and checkpoint:
            resume_stream(data.train, checkpoint, say)
        train_out = trainer.train(resume_from_checkpoint=checkpoint)
        if job.streaming:
            say(f"streamed: {data.train.summary()}")
        result["steps"] = train_out.global_step
        result["train_loss"] = train_out.training_loss
        result["train_seconds"] = round(float(train_out.metrics.get("train_runtime", float("nan"))), 2)
        result["train_tokens"] = trainer.step_stats.tokens
        return
    # transformers would train one step past max_steps when resumed from the last checkpoint
    say(f"training had reached step {finished['global_step']} in {checkpoint}; finishing from there")
    trainer.load_checkpoint(checkpoint)
    result["steps"] = finished["global_step"]
    result["train_loss"] = logged_train_loss(finished)
    if (out / "metrics.jsonl").is_file():
        from ..atomic import read_jsonl
        from .callbacks import plot_losses

        plot_losses(read_jsonl(out / "metrics.jsonl"), out / "loss.png")


def _finish(job: TrainJob, model: torch.nn.Module, tokenizer: Any, data: _Data, out: Path, result: dict,
            say: Say) -> None:
    """Save the adapter (or model), then measure and sample what training made."""
    from ..tools.evaluation import perplexity

    save_final(model, tokenizer, out)
    if data.val:
        result["ppl_after"] = perplexity(model, data.val, data.collator, batch_size=job.batch_size)
        say(f"validation perplexity after: {result['ppl_after']:.2f}"
            + (f" (before: {result['ppl_before']:.2f})" if "ppl_before" in result else ""))
    result["sample_after"] = _sample(job, model, tokenizer, say, "after")


def publish(job: TrainJob, model: torch.nn.Module, out: Path, result: dict, say: Say) -> None:
    """Write the model card and ``train_result.json`` beside the saved adapter, then upload the
    folder when ``--push-to-hub`` asks (the local copy is complete first either way)."""
    from ..atomic import atomic_write_json, atomic_write_text
    from .card import model_card

    atomic_write_text(out / "README.md", model_card(job, result))
    atomic_write_json(out / "train_result.json", result)
    adapter = hasattr(model, "peft_config")
    what, where = ("adapter saved to", out) if adapter else ("model saved to", out / "model")
    say(f"{what} {where} ({result['seconds']:.0f} s); loss plot: {out / 'loss.png'}")
    if job.push_to_hub:
        from .push import push_adapter

        result["pushed_to"] = push_adapter(out, job.push_to_hub, say)


def _adapter_off(model: Any) -> contextlib.AbstractContextManager:
    """The base model's behaviour (adapter disabled), or nothing to do for full fine-tuning."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def save_final(model: Any, tokenizer: Any, out: Path) -> None:
    """The adapter (or, for full fine-tuning, the whole model) and the tokenizer, each atomically."""
    from ..atomic import atomic_directory

    if hasattr(model, "peft_config"):
        model.save_pretrained(out)
        return
    with atomic_directory(out / "model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
