"""``adaptune train --objective dpo|ipo|orpo|simpo|kto``: model -> adapter -> preference data -> trainer.

The same job options as SFT (``TrainJob``) where they mean the same thing: ``--batch-size`` counts
pairs (or KTO rows), ``--max-length`` the tokens of prompt + answer, ``--packing`` packs all
sequences of a batch into one row. Held-out pairs (``--val-fraction``) are evaluated before and
after training: the objective's loss, reward accuracy and margin.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError
from ...hub import describe_model

__all__ = ["run_preference"]

_EVAL_KEYS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
              "eval_rewards/rejected", "eval_logps/chosen", "eval_logps/rejected")


def _policy(job: Any, model: torch.nn.Module, say: Callable[[str], None]) -> tuple[torch.nn.Module, str]:
    """The model to train and what its reference is (see ``reference.Reference``)."""
    from ..methods import wrap_model

    if job.ref_adapter is not None:
        from ...peft_model import PeftModel

        say(f"continuing the adapter in {job.ref_adapter} (its rank, alpha and targets); a frozen copy of it "
            f"is the reference")
        return PeftModel.from_pretrained(model, job.ref_adapter, is_trainable=True), "adapter"
    wrapped = wrap_model(job, model)
    if not hasattr(wrapped, "peft_config"):
        return wrapped, "initial"
    # LoftQ starts the adapter away from zero: the starting point, not the quantized base, is the reference
    return wrapped, "adapter" if job.lora_init == "loftq" else "base"


def _config(job: Any, out: Path, has_val: bool, say: Callable[[str], None]):
    from ..run import trainer_arguments
    from .config import CPOConfig, DPOConfig, KTOConfig, ORPOConfig

    common = dict(trainer_arguments(job, out, has_val, say), beta=job.beta, max_length=job.max_length,
                  packing=job.packing)
    if job.objective in ("dpo", "ipo"):
        return DPOConfig(loss_type=job.loss_type, label_smoothing=job.label_smoothing, **common)
    if job.objective == "orpo":
        return ORPOConfig(**common)
    if job.objective == "simpo":
        return CPOConfig(loss_type="simpo", cpo_alpha=0.0, label_smoothing=job.label_smoothing, **common)
    return KTOConfig(loss_type=job.loss_type, **common)


def _trainer_class(objective: str):
    from .trainer import CPOTrainer, DPOTrainer, KTOTrainer, ORPOTrainer

    return {"dpo": DPOTrainer, "ipo": DPOTrainer, "orpo": ORPOTrainer, "simpo": CPOTrainer,
            "kto": KTOTrainer}[objective]


def _evaluate(trainer: Any, when: str, say: Callable[[str], None]) -> dict[str, float]:
    metrics = {k.removeprefix("eval_"): round(float(v), 4) for k, v in trainer.evaluate().items() if k in _EVAL_KEYS}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "rewards/accuracies",
                                                                           "rewards/margins"))
    say(f"held-out pairs {when}: {shown}")
    return metrics


def _data(job: Any, source: Any, tokenizer: Any, say: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    from ...data.datasets import split_validation
    from ...data.preference import load_preference_data

    kind = "kto" if job.objective == "kto" else "pairs"
    features, report = load_preference_data(source, tokenizer, kind, job.max_length)
    if job.max_examples is not None and job.max_examples < len(features):
        features = features[:job.max_examples]
        report.limited_to = len(features)
    train, val = split_validation(features, val_fraction=job.val_fraction, seed=job.seed)
    report.train_examples, report.val_examples = len(train), len(val)
    say(f"data: {report.summary()}")
    return train, val


def _source(job: Any, say: Callable[[str], None]) -> Any:
    """The one data source of a preference run, checked before the model loads."""
    from ..run import checked_sources

    if job.data is None:
        raise ConfigError(f"--objective {job.objective} needs --data: JSON lines (or a table, a saved dataset, a hub "
                          "id) of " + ("'prompt', 'completion', 'label' rows (or pairs)" if job.objective == "kto"
                                       else "'prompt', 'chosen', 'rejected' pairs") + " (docs/preference.md)")
    sources = checked_sources(job, say)
    if len(sources) != 1:
        raise ConfigError(f"--objective {job.objective} reads one data source, not a mixture of {len(sources)}")
    return sources[0]


def run_preference(job: Any, say: Callable[[str], None]) -> dict:
    """Run a preference job; returns what it printed (held-out metrics before/after, loss, time)."""
    from ... import device
    from ..methods import load_base
    from ..run import prepare_output, publish, save_final
    from ..tracking import parse_report_to, tracking_env

    started = time.time()
    out = prepare_output(job)
    source = _source(job, say)
    torch.manual_seed(job.seed)
    say(f"loading {describe_model(job.model)} ...")
    model, tokenizer = load_base(job)
    train, val = _data(job, source, tokenizer, say)
    torch.manual_seed(job.seed)  # the adapter's init does not depend on what ran before it
    model, reference = _policy(job, model, say)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    result: dict[str, Any] = {"objective": job.objective, "loss_type": job.loss_type, "beta": job.beta,
                              "train_examples": len(train), "val_examples": len(val), "trainable_params": trainable}
    with tracking_env(parse_report_to(job.report_to), out):
        trainer = _trainer_class(job.objective)(model=model, args=_config(job, out, bool(val), say),
                                                train_dataset=train, eval_dataset=val or None,
                                                processing_class=tokenizer, reference=reference)
        say(_describe(job, trainer))
        _train(job, trainer, out, bool(val), result, say)
    if device.is_main_process():
        if val:
            result["eval_after"] = _evaluate(trainer, "after", say)
        save_final(trainer.model, tokenizer, out)
        result["seconds"] = round(time.time() - started, 1)
        publish(job, trainer.model, out, result, say)
    return result


def _describe(job: Any, trainer: Any) -> str:
    objective = job.objective + (f" ({job.loss_type})" if job.loss_type else "")
    return (f"objective: {objective}, beta {job.beta:g}; reference: "
            + (trainer.reference.describe() if trainer.reference else "none (the objective needs none)")
            + {"shared": "; each batch in one row, each prompt once", "packed": "; each batch in one row",
               "padded": "; padded rows"}[trainer.layout])


def _train(job: Any, trainer: Any, out: Path, has_val: bool, result: dict, say: Callable[[str], None]) -> None:
    """Measure the held-out pairs, then train from the start or the last complete checkpoint; a run
    killed after its last step is finished from its checkpoint instead."""
    from ... import device
    from ..checkpoints import finished_state, last_complete_checkpoint

    checkpoint = (last_complete_checkpoint(out, say=lambda line: say(f"--resume: {line}"))
                  if job.resume else None)
    if job.resume and checkpoint is None:
        say(f"--resume: no complete checkpoint in {out}; training from the start")
    if has_val and device.is_main_process() and checkpoint is None:
        result["eval_before"] = _evaluate(trainer, "before", say)
    finished = finished_state(checkpoint, job.max_steps, job.epochs) if checkpoint else None
    if finished is not None:  # transformers would train a step past max_steps from the last checkpoint
        say(f"training had reached step {finished['global_step']} in {checkpoint}; finishing from there")
        trainer.load_checkpoint(checkpoint)
        result["steps"] = finished["global_step"]
        return
    train_out = trainer.train(resume_from_checkpoint=checkpoint)
    result.update(steps=train_out.global_step, train_loss=train_out.training_loss,
                  train_seconds=round(float(train_out.metrics.get("train_runtime", float("nan"))), 2))
