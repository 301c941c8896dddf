"""``adaptune train --objective dpo|ipo|orpo|simpo|kto``: model -> adapter -> preference data -> trainer.

The same job options as SFT (``TrainJob``) where they mean the same thing: ``--batch-size`` counts
pairs (or KTO rows), ``--max-length`` the tokens of prompt + answer, ``--packing`` packs all
sequences of a batch into one row. Held-out pairs (``--val-fraction``) are evaluated before and
after training: the objective's loss, reward accuracy and margin.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError

__all__ = ["run_preference"]

_EVAL_KEYS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
              "eval_rewards/rejected", "eval_logps/chosen", "eval_logps/rejected")


def _policy(job: Any, model: torch.nn.Module, say: Callable[[str], None]) -> tuple[torch.nn.Module, str]:
    """The model to train and what its reference is (see ``reference.Reference``)."""
    from ..job import wrap_model  # moves with job.py's split

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


def _config(job: Any, out: Path, has_val: bool):
    from .config import CPOConfig, DPOConfig, KTOConfig, ORPOConfig

    common = dict(
        output_dir=str(out), max_steps=job.max_steps if job.max_steps > 0 else -1, num_train_epochs=job.epochs,
        per_device_train_batch_size=job.batch_size, per_device_eval_batch_size=job.batch_size,
        gradient_accumulation_steps=job.grad_accum, learning_rate=job.lr, lr_scheduler_type="cosine",
        warmup_steps=min(10, max(job.max_steps // 10, 1)) if job.max_steps > 0 else 10,
        logging_steps=job.logging_steps, save_steps=job.save_every, save_total_limit=2,
        eval_strategy="steps" if job.eval_every and has_val else "no", eval_steps=job.eval_every or None,
        seed=job.seed, data_seed=job.seed, gradient_checkpointing=job.gradient_checkpointing, report_to="none",
        dataloader_num_workers=0, disable_tqdm=False, beta=job.beta, max_length=job.max_length, packing=job.packing)
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


def _save_final(model: Any, tokenizer: Any, out: Path) -> None:
    from ...atomic import atomic_directory

    if hasattr(model, "peft_config"):
        model.save_pretrained(out)
        return
    with atomic_directory(out / "model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _data(job: Any, tokenizer: Any, say: Callable[[str], None]) -> tuple[list[dict], list[dict]]:
    from ...data.examples import split_validation
    from ...data.preference import load_preference_data

    kind = "kto" if job.objective == "kto" else "pairs"
    features, report = load_preference_data(job.data, tokenizer, kind, job.max_length)
    if job.max_examples is not None and job.max_examples < len(features):
        features = features[:job.max_examples]
        report.limited_to = len(features)
    train, val = split_validation(features, val_fraction=job.val_fraction, seed=job.seed)
    report.train_examples, report.val_examples = len(train), len(val)
    say(f"data: {report.summary()}")
    return train, val


def _finished_step(checkpoint: str | None, job: Any) -> int | None:
    """The checkpoint's step if it already reached ``--max-steps`` (a run killed after training)."""
    if checkpoint is None or job.max_steps <= 0:
        return None
    try:
        step = int(json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if step >= job.max_steps else None


def run_preference(job: Any, say: Callable[[str], None]) -> dict:
    """Run a preference job; returns what it printed (held-out metrics before/after, loss, time)."""
    from ...atomic import atomic_write_json, check_writable, remove_temporaries
    from ...data.examples import check_data_file
    from ..job import load_base  # moves with job.py's split
    from ..trainer import last_complete_checkpoint

    started = time.time()
    if job.data is None:
        raise ConfigError(f"--objective {job.objective} needs --data: a JSON lines file of "
                          + ("'prompt', 'completion', 'label' rows (or pairs)" if job.objective == "kto"
                             else "'prompt', 'chosen', 'rejected' pairs") + " (docs/preference.md)")
    out = Path(job.output)
    check_writable(out, need_bytes=50 * 2**20)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        for folder in [out, *sorted(out.glob("checkpoint-*"))]:
            remove_temporaries(folder)
    check_data_file(job.data)
    torch.manual_seed(job.seed)
    say(f"loading {job.model or 'SmolLM2-135M-Instruct (embedded)'} ...")
    model, tokenizer = load_base(job)
    train, val = _data(job, tokenizer, say)
    torch.manual_seed(job.seed)  # the adapter's init does not depend on what ran before it
    model, reference = _policy(job, model, say)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
    trainer = _trainer_class(job.objective)(model=model, args=_config(job, out, bool(val)), train_dataset=train,
                                            eval_dataset=val or None, processing_class=tokenizer,
                                            reference=reference)
    objective = job.objective + (f" ({job.loss_type})" if job.loss_type else "")
    say(f"objective: {objective}, beta {job.beta:g}; reference: "
        + (trainer.reference.describe() if trainer.reference else "none (the objective needs none)")
        + {"shared": "; each batch in one row, each prompt once", "packed": "; each batch in one row",
           "padded": "; padded rows"}[trainer.layout])
    result: dict[str, Any] = {"objective": job.objective, "loss_type": job.loss_type, "beta": job.beta,
                              "train_examples": len(train), "val_examples": len(val), "trainable_params": trainable}
    checkpoint = last_complete_checkpoint(out) if job.resume else None
    if job.resume and checkpoint is None:
        say(f"--resume: no complete checkpoint in {out}; training from the start")
    if val and is_main and checkpoint is None:
        result["eval_before"] = _evaluate(trainer, "before", say)
    done = _finished_step(checkpoint, job)
    if done is not None:  # transformers would train a step past max_steps from the last checkpoint
        say(f"training had reached step {done} in {checkpoint}; finishing from there")
        trainer._load_from_checkpoint(checkpoint)
        result["steps"] = done
    else:
        train_out = trainer.train(resume_from_checkpoint=checkpoint)
        result.update(steps=train_out.global_step, train_loss=train_out.training_loss,
                      train_seconds=round(float(train_out.metrics.get("train_runtime", float("nan"))), 2))
    if is_main:
        if val:
            result["eval_after"] = _evaluate(trainer, "after", say)
        _save_final(trainer.model, tokenizer, out)
        result["seconds"] = round(time.time() - started, 1)
        atomic_write_json(out / "train_result.json", result)
        where = out if hasattr(trainer.model, "peft_config") else out / "model"
        say(f"saved to {where} ({result['seconds']:.0f} s); loss and reward plot: {out / 'loss.png'}")
    return result
