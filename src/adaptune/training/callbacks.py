"""The callbacks adaptune's Trainer installs by default, each a small ``TrainerCallback``.

- :class:`ProgressCallback`: transformers' tqdm bar, plus loss, tokens/s and the share of tokens
  that are trained on (labels != -100); tqdm shows the ETA. Each logged record becomes one short
  line above the bar (``step 5/60  loss 4.2  grad norm 0.53  lr 0.001``), not a raw dict.
- :class:`MetricsLogger`: every log record appended to ``output_dir/metrics.jsonl``; at the end of
  training ``output_dir/loss.png`` (train and eval loss against step).
- :class:`DivergenceGuard`: a NaN/inf training loss stops training before another checkpoint is
  written, so the last checkpoint on disk is the last good one.
- :class:`ZeroGradientWarning`: says once when the logged gradient norm stays exactly 0, a run
  that changes no weight (saturated activations after a far too high learning rate, say).

The per-batch numbers (loss, tokens) come from :class:`StepStats`, which adaptune's Trainer fills
in ``training_step``; with a plain ``transformers.Trainer`` the callbacks still work from the
logged records alone (no tokens/s, and the guard only sees the logged, NaN-filtered loss).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback as _TransformersProgressCallback
from transformers.utils import logging as hf_logging

from ..atomic import append_jsonl, atomic_path, atomic_write_text, read_jsonl
from ..errors import AdaptuneError

logger = hf_logging.get_logger(__name__)

__all__ = ["DivergenceGuard", "LogPrinter", "MetricsLogger", "ProgressCallback", "StepStats", "TrainingDiverged",
           "ZeroGradientWarning", "format_log_record"]


class TrainingDiverged(AdaptuneError, RuntimeError):
    """The training loss became NaN or infinite; training stopped without saving after it."""


@dataclass
class StepStats:
    """Running totals over the micro-batches this process trained on in this run.

    ``loss_sum`` adds the losses exactly as ``Trainer.training_step`` returns them (already divided
    for gradient accumulation), so its growth over one optimizer step is that step's loss.
    """

    micro_batches: int = 0
    tokens: int = 0
    useful_tokens: int = 0
    loss_sum: float = 0.0
    last_loss: float | None = None

    def record(self, loss: float, tokens: int, useful_tokens: int) -> None:
        self.micro_batches += 1
        self.tokens += tokens
        self.useful_tokens += useful_tokens
        self.loss_sum += loss
        self.last_loss = loss


class ProgressCallback(_TransformersProgressCallback):
    """transformers' progress bar with ``loss``, ``tok/s`` and ``useful`` (trained-on share) added.

    A subclass, so ``trainer.remove_callback(transformers.ProgressCallback)`` still removes it.
    """

    def __init__(self, stats: StepStats | None = None, max_str_len: int = 100):
        super().__init__(max_str_len=max_str_len)
        self.stats = stats

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            # initial=global_step: a resumed run's bar (and so its ETA) starts where the run stands.
            self.training_bar = tqdm(total=state.max_steps, initial=state.global_step, dynamic_ncols=True,
                                     unit="step")
        self.current_step = state.global_step
        self._start = time.perf_counter()
        stats = self.stats or StepStats()
        self._tokens_at_start = stats.tokens
        self._loss_mark = stats.loss_sum

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None:
            return
        if self.stats is not None and self.stats.micro_batches:
            step_loss = self.stats.loss_sum - self._loss_mark
            self._loss_mark = self.stats.loss_sum
            seconds = max(time.perf_counter() - self._start, 1e-9)
            tokens = self.stats.tokens - self._tokens_at_start
            useful = self.stats.useful_tokens / max(self.stats.tokens, 1)
            self.training_bar.set_postfix_str(
                f"loss={step_loss:.4g}, tok/s={tokens / seconds:,.0f}, useful={useful:.0%}", refresh=False
            )
        self.training_bar.update(state.global_step - self.current_step)
        self.current_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_log_record(logs, state.global_step, state.max_steps))


class LogPrinter(TrainerCallback):
    """Without a progress bar (``disable_tqdm=True``): each log record as one line, as the bar
    would write it (transformers' own printer writes the raw dict)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            print(format_log_record(logs, state.global_step, state.max_steps), flush=True)


def format_log_record(logs: dict, step: int, max_steps: int) -> str:
    """One line for a log record: a training step, an evaluation, or the end of training."""
    if "train_runtime" in logs:
        loss = logs.get("train_loss")
        mean = f", mean loss {loss:.4g}" if isinstance(loss, (int, float)) else ""
        return f"training done: {step} steps in {float(logs['train_runtime']):.1f} s{mean}"
    names = {"loss": "loss", "eval_loss": "validation loss", "grad_norm": "grad norm", "learning_rate": "lr"}
    parts = [f"{label} {logs[key]:.4g}" for key, label in names.items()
             if isinstance(logs.get(key), (int, float))]
    parts += [f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
              for key, value in logs.items() if key not in names and key not in ("epoch", "total_flos")
              and not key.startswith("eval_") and isinstance(value, (int, float, str))]
    return f"step {step}/{max_steps}  " + "  ".join(parts)


def _jsonable(value):
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


class MetricsLogger(TrainerCallback):
    """Append every log record to ``metrics.jsonl``; draw ``loss.png`` when training ends.

    Each record is the ``logs`` dict transformers logs plus ``step``, ``epoch`` and ``time``. When
    training (re)starts, records from after the starting step are dropped: on a resume those steps
    are about to be trained again; on a fresh run in an old folder, none of the old run is kept.
    """

    def __init__(self, filename: str = "metrics.jsonl", plot_filename: str | None = "loss.png"):
        self.filename = filename
        self.plot_filename = plot_filename

    def _path(self, args) -> Path:
        return Path(args.output_dir) / self.filename

    def on_train_begin(self, args, state, control, **kwargs):
        path = self._path(args)
        if not state.is_world_process_zero or not path.exists():
            return
        records = read_jsonl(path)
        kept = [r for r in records if r.get("step", 0) <= state.global_step]
        if len(kept) != len(records):
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in logs.items()})
        append_jsonl(self._path(args), record)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.plot_filename and self._path(args).exists():
            plot_losses(read_jsonl(self._path(args)), Path(args.output_dir) / self.plot_filename)


def plot_losses(records: list[dict], path: str | Path) -> None:
    """Draw train ``loss`` and ``eval_loss`` against step from metrics records, as a PNG; preference
    runs (records with ``rewards/*``) get a second panel of rewards, margins and accuracies."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r and "step" in r]
    rewards = any(k.startswith(("rewards/", "eval_rewards/")) for r in records for k in r)
    fig = Figure(figsize=(7, 8 if rewards else 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if rewards else 1, 1, 1)
    if train:
        ax.plot(*zip(*train), marker="." if len(train) < 50 else None, label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    if train or evals:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss logged yet (fewer steps than logging_steps?)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if rewards:
        _plot_rewards(fig.add_subplot(2, 1, 2, sharex=ax), records)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _plot_rewards(ax, records: list[dict]) -> None:
    """Train (lines) and eval (dots) rewards of chosen and rejected answers and their margin; the
    share of pairs whose chosen reward is higher on a second axis."""
    few = sum("rewards/chosen" in r for r in records) < 50  # a line of one point would not show: mark them
    train_style = ".-" if few else "-"
    for i, name in enumerate(("chosen", "rejected", "margins")):
        for prefix, style in (("", train_style), ("eval_", "o")):
            points = [(r["step"], r[f"{prefix}rewards/{name}"]) for r in records
                      if f"{prefix}rewards/{name}" in r and "step" in r]
            if points:
                ax.plot(*zip(*points), style, color=f"C{i}", label=f"{prefix}{name}".replace("_", " "))
    accuracy = ax.twinx()
    for prefix, style in (("", train_style), ("eval_", "o")):
        points = [(r["step"], r[f"{prefix}rewards/accuracies"]) for r in records
                  if f"{prefix}rewards/accuracies" in r and "step" in r]
        if points:
            accuracy.plot(*zip(*points), style, color="C3", alpha=0.6, label=f"{prefix}accuracy".replace("_", " "))
    accuracy.set_ylim(-0.05, 1.05)
    accuracy.set_ylabel("reward accuracy")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = accuracy.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize="small", ncol=2)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(True, alpha=0.3)


def _trainable_finite(model) -> bool:
    import torch

    flags = [torch.isfinite(p).all() for p in model.parameters() if p.requires_grad]
    return bool(torch.stack(flags).all()) if flags else True


class DivergenceGuard(TrainerCallback):
    """Stop training at the first NaN/inf training loss, without writing a checkpoint after it.

    With :class:`StepStats` (adaptune's Trainer) every micro-batch loss is checked, before the
    optimizer step: the step's gradients are zeroed so the bad batch does not reach the weights,
    training stops, and saving and evaluation are switched off for the rest of the run. Without
    stats only the logged loss is seen. adaptune's ``Trainer.train`` then raises
    :class:`TrainingDiverged` with :attr:`message`.
    """

    def __init__(self, stats: StepStats | None = None):
        self.stats = stats
        self.bad_step: int | None = None
        self.bad_loss: float | None = None
        self.bad_weights = False  # the loss was finite but the update made weights NaN/inf
        self._learning_rate: float | None = None
        self._fp16 = False

    @property
    def diverged(self) -> bool:
        return self.bad_step is not None

    @property
    def message(self) -> str:
        if not self.diverged:
            return ""
        hint = "a lower learning rate" + (f" than {self._learning_rate:g}" if self._learning_rate else "")
        if self._fp16:
            hint += ", or bf16/fp32 instead of fp16"
        what = "the trained weights became NaN/inf" if self.bad_weights else f"the training loss became {self.bad_loss}"
        return (f"training diverged: {what} at step {self.bad_step}; "
                f"training stopped and no checkpoint was written after that step; try {hint}")

    def _found(self, args, loss: float, step: int) -> None:
        self.bad_step, self.bad_loss = step, loss
        self._learning_rate, self._fp16 = args.learning_rate, bool(args.fp16)
        logger.error(self.message)

    def _check(self, args, state, control) -> None:
        loss = self.stats.last_loss if self.stats is not None else None
        if not self.diverged and loss is not None and not math.isfinite(loss):
            self._found(args, loss, step=state.global_step + 1)  # the step being run
        if self.diverged:
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.bad_step = self.bad_loss = None
        self.bad_weights = False

    def on_substep_end(self, args, state, control, **kwargs):
        self._check(args, state, control)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._check(args, state, control)
        if self.diverged and model is not None:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.zero_()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # A finite loss can still give an update that overflows the weights (the loss is computed
        # before the update): look at the trainable weights before this step can be checkpointed.
        if not self.diverged and model is not None and not _trainable_finite(model):
            self.bad_weights = True
            self._found(args, float("nan"), step=state.global_step)
        self._check(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._check(args, state, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if self.stats is None and not self.diverged and isinstance(loss, float) and not math.isfinite(loss):
            self._found(args, loss, step=state.global_step)
        self._check(args, state, control)


class ZeroGradientWarning(TrainerCallback):
    """Warn once when the logged gradient norm is exactly 0 in ``patience`` records in a row.

    A run whose gradient is exactly zero changes no weight: its loss stays where it is while the
    steps go by. Seen when a far too high learning rate saturates the activations (the loss then
    stays finite, so the divergence guard says nothing).
    """

    def __init__(self, patience: int = 3):
        self.patience = patience
        self.zero_since: int | None = None
        self.zero_records = 0
        self.warned = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.zero_since, self.zero_records, self.warned = None, 0, False

    def on_log(self, args, state, control, logs=None, **kwargs):
        norm = (logs or {}).get("grad_norm")
        if not isinstance(norm, (int, float)):
            return
        if norm != 0:
            self.zero_since, self.zero_records = None, 0
            return
        self.zero_records += 1
        self.zero_since = self.zero_since if self.zero_since is not None else state.global_step
        if self.zero_records >= self.patience and not self.warned and state.is_world_process_zero:
            self.warned = True
            logger.warning(self.message(args.learning_rate))

    def message(self, learning_rate: float) -> str:
        return (f"the gradient norm has been exactly 0 since step {self.zero_since}: training is not changing "
                f"the weights (a learning rate far too high, {learning_rate:g} here, can saturate the "
                f"activations; try a lower one)")
