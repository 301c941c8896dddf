"""``Trainer``: transformers' own, with adaptune's fallbacks, adapter checkpoints, callbacks and speed-ups.

Not a new training loop: the subclass keeps transformers' loop, optimizer, scheduler, logging and
resume machinery, and changes only what makes a classic script break or waste work:

- ``Trainer(tokenizer=...)``, renamed ``processing_class=`` in transformers 5, is accepted.
- Rows that are tuples (``TensorDataset(input_ids, attention_mask[, labels])``) become dicts, and
  a causal LM batch without labels gets ``labels = input_ids`` with padding masked to -100
  (:class:`adaptune.data.LabelsAndTuplesCollator`).
- An adapter model (adaptune's ``PeftModel``, or peft's) is checkpointed as an adapter folder,
  and resume / ``load_best_model_at_end`` load the adapter back (:mod:`.checkpoints`);
  ``resume_from_checkpoint=True`` skips a half-written last checkpoint.
- Default callbacks: a progress bar with loss and tokens/s, ``metrics.jsonl`` + ``loss.png``, a
  NaN/inf guard and a warning when the gradient stays exactly zero (:mod:`.callbacks`).
- The output folder is checked for write access and free space before anything else.
- Causal LMs train without the full logits tensor (``chunked_loss``, :mod:`adaptune.speedups.loss`),
  ``micro_batch_tokens`` runs each batch in row groups (same gradients, less activation memory),
  and the module-level speed-ups (:mod:`adaptune.speedups`) are switched on for the length of
  ``train()`` only: the model comes back as it was.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import transformers
from transformers.trainer_utils import unwrap_peft_model
from transformers.utils import logging as hf_logging
from transformers.utils.generic import can_return_loss, find_labels

from .. import speedups
from ..atomic import check_writable
from ..data.collate import LabelsAndTuplesCollator
from ..errors import ConfigError, warn_user
from ..speedups import loss as chunked
from ..wrappers import active_config, adapter_base, is_causal_lm_class
from .arguments import TrainingArguments
from .callbacks import (
    DivergenceGuard,
    LogPrinter,
    MetricsLogger,
    ProgressCallback,
    StepStats,
    TrainingDiverged,
    ZeroGradientWarning,
)
from .checkpoints import last_complete_checkpoint, load_adapter_checkpoint, save_adapter_checkpoint

logger = hf_logging.get_logger(__name__)

__all__ = ["Trainer"]


def _is_causal_lm(model: Any) -> bool:
    """Whether ``model`` (or the model inside an adapter wrapper) trains as a causal LM."""
    base = adapter_base(model)
    if base is not None:
        task = getattr(active_config(model), "task_type", None)
        if task is not None:
            return str(getattr(task, "value", task)) == "CAUSAL_LM"
    else:
        base = unwrap_peft_model(model)
    return is_causal_lm_class(base)


def _checkpoint_bytes(model: torch.nn.Module | None) -> int:
    """Disk for one checkpoint: the saved weights plus two fp32 Adam moments, plus 16 MiB of small files."""
    if model is None:
        return 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = trainable if adapter_base(model) is not None else list(model.parameters())
    return (sum(p.numel() * p.element_size() for p in saved) + 8 * sum(p.numel() for p in trainable)
            + (16 << 20))


_TRAINER_INIT = inspect.signature(transformers.Trainer.__init__)


class Trainer(transformers.Trainer):
    """transformers' ``Trainer`` with adaptune's fallbacks, adapter checkpoints and callbacks."""

    def __init__(self, *args: Any, tokenizer: Any = None, **kwargs: Any):
        params = dict(_TRAINER_INIT.bind_partial(self, *args, **kwargs).arguments)
        params.pop("self")
        for name, p in _TRAINER_INIT.parameters.items():  # a **kwargs catch-all, should transformers add one
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                params.update(params.pop(name, {}))
        if tokenizer is not None:
            if params.get("processing_class") is not None:
                raise ConfigError("pass the tokenizer once: as processing_class= (or the old name tokenizer=)")
            warn_user("Trainer(tokenizer=...) is called processing_class= since transformers 5; "
                  "adaptune passes your tokenizer as processing_class")
            params["processing_class"] = tokenizer
        train_args = params.get("args")
        if train_args is None:
            train_args = params["args"] = TrainingArguments(output_dir="tmp_trainer")
        user_collator = params.get("data_collator")
        if isinstance(train_args, TrainingArguments) and train_args.remove_unused_columns is None:
            train_args.remove_unused_columns = user_collator is None
        if train_args.should_save:
            check_writable(train_args.output_dir, need_bytes=_checkpoint_bytes(params.get("model")))

        self.step_stats = StepStats()
        self.speedups_applied: dict[str, int] = {}  # what the last train() switched on: name -> modules
        super().__init__(**params)

        self.data_collator = LabelsAndTuplesCollator(self.data_collator, rows_to_dicts=user_collator is None,
                                                     causal_lm=_is_causal_lm(self.model))
        self._see_through_adapter_wrapper()
        if self.pop_callback(transformers.trainer_callback.ProgressCallback) is not None:
            self.add_callback(ProgressCallback(self.step_stats))
        if self.pop_callback(transformers.trainer_callback.PrinterCallback) is not None:
            self.add_callback(LogPrinter())
        self.add_callback(MetricsLogger())
        self.divergence_guard = DivergenceGuard(self.step_stats)
        self.add_callback(self.divergence_guard)
        self.add_callback(ZeroGradientWarning())

    def _see_through_adapter_wrapper(self) -> None:
        """Take label names from the base model, as transformers does for peft's own PeftModel.

        transformers recognises only ``peft.PeftModel``; for another wrapper whose forward is
        ``(*args, **kwargs)`` it would find no label names and report no eval loss.
        """
        base = adapter_base(self.model)
        if base is None or unwrap_peft_model(self.model) is not self.model:
            return
        if self.args.label_names is None:
            self.label_names = find_labels(type(base))
        self.can_return_loss = can_return_loss(type(base))

    def _set_signature_columns_if_needed(self) -> None:
        base = adapter_base(self.model)
        if self._signature_columns is None and base is not None:
            self._signature_columns = list(inspect.signature(base.forward).parameters)
            self._signature_columns += list({"label", "label_ids", *self.label_names})
        super()._set_signature_columns_if_needed()

    # ---- training ---------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any):
        """transformers' ``train``; ``resume_from_checkpoint=True`` skips a half-written last checkpoint.

        Raises :class:`TrainingDiverged` if the loss became NaN/inf (after the metrics are written).
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or True
        with speedups.applied(self.model, self._speedups()) as self.speedups_applied:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                   ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        guard = self.divergence_guard
        if guard.diverged and guard in self.callback_handler.callbacks:
            last = last_complete_checkpoint(self.args.output_dir)
            raise TrainingDiverged(guard.message + f"; last good checkpoint: {last or 'none was saved'}")
        return output

    def _speedups(self) -> speedups.Speedups:
        """The speed-ups ``args`` asks for (plain ``transformers.TrainingArguments``: the defaults)."""
        args = self.args
        sixteen_bit = bool(args.bf16 or args.fp16)
        return speedups.Speedups(
            fused_mlp_activation=getattr(args, "fused_mlp_activation", True),
            fused_rms_norm=getattr(args, "fused_rms_norm", True),
            lean_autocast=getattr(args, "lean_autocast", True) and sixteen_bit,
            packed_attention=getattr(args, "packed_attention", True),
            compile_layers=getattr(args, "compile_layers", False),
            cpu_keep_freed_memory=getattr(args, "cpu_keep_freed_memory", False),
            on_cpu=args.device.type == "cpu")

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        ids, labels = inputs.get("input_ids"), inputs.get("labels")
        tokens = ids.numel() if isinstance(ids, torch.Tensor) else 0
        useful = int((labels != -100).sum()) if isinstance(labels, torch.Tensor) else tokens
        pieces = self._micro_batches(inputs, num_items_in_batch)
        if pieces is None:
            loss = super().training_step(model, inputs, num_items_in_batch)
        else:  # each piece's loss is its CE sum / the whole batch's label count: the pieces add up
            loss = sum(super(Trainer, self).training_step(model, piece, num_items_in_batch) for piece in pieces)
        self.step_stats.record(float(loss), tokens, useful)
        return loss

    def _micro_batches(self, inputs: dict[str, Any], num_items_in_batch: Any) -> list[dict[str, Any]] | None:
        """``inputs`` cut into row groups of at most ``args.micro_batch_tokens`` tokens, or None to run
        the batch whole (no limit, a batch within it, or a loss that would not add up over pieces)."""
        limit = getattr(self.args, "micro_batch_tokens", None)
        ids = inputs.get("input_ids")
        if not limit or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        n = ids.shape[0]
        rows = max(1, int(limit) // max(ids.shape[1], 1))
        if rows >= n:
            return None
        # Only when each piece's loss is a sum over the *whole batch's* label count (num_items_in_batch);
        # a per-piece mean would weigh the pieces wrongly.
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
        if num_items_in_batch is None or not scaled or self.args.world_size > 1 or self.args.n_gpu > 1 \
                or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return None
        if any(not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != n for v in inputs.values()):
            return None
        rows = -(-n // -(-n // rows))  # as many pieces as needed, of even size: 6 rows -> 3 + 3, not 5 + 1
        return [{k: v[start:start + rows] for k, v in inputs.items()} for start in range(0, n, rows)]

    # ---- loss ----------------------------------------------------------------------------------

    def _chunked_loss_applies(self, model: torch.nn.Module, inputs: dict[str, Any]) -> bool:
        """Whether the chunked loss computes exactly the loss transformers would for this batch."""
        if not getattr(self.args, "chunked_loss", False) or "labels" not in inputs:
            return False
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return False
        if not set(inputs) <= chunked.BODY_KEYS | {"labels", "shift_labels"}:
            return False
        if self.accelerator.unwrap_model(model, keep_torch_compile=False) is not model:
            return False  # DDP / a whole-model compile wrapper: run it, not around it
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return False  # sharded weights are gathered by hooks on the model's forward, which this goes around
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and (getattr(pc, "sp_enabled", False) or getattr(pc, "cp_enabled", False)):
            return False
        return chunked.supports_chunked_loss(model)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        """transformers' loss; for causal LMs (``args.chunked_loss``) computed without full logits."""
        if return_outputs or not self._chunked_loss_applies(model, inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # As transformers: the model sees num_items_in_batch only when its forward takes loss kwargs.
        num = num_items_in_batch if self.model_accepts_loss_kwargs else None
        # accelerate applies fp16/bf16 autocast by wrapping model.forward, which this path goes around
        # (body, then head): without this context, bf16=True would silently train in fp32.
        with self.accelerator.autocast():
            loss, _ = chunked.causal_lm_loss(model, inputs, num, chunk_rows=self.args.loss_chunk_rows)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num is not None:
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Evaluation without compute_metrics needs only the loss: the chunked one, no logits kept."""
        if not (prediction_loss_only and self._chunked_loss_applies(model, inputs)):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            num = self._get_num_items_in_batch([inputs], self.args.device)
            loss = self.compute_loss(model, inputs, num_items_in_batch=num)
        return loss.detach().mean(), None, None

    # ---- saving and loading adapters ---------------------------------------------------------

    def load_checkpoint(self, checkpoint: str) -> None:
        """Load a checkpoint's weights into the model (the adapter's, for an adapter model), as
        resuming would, without training."""
        self._load_from_checkpoint(checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """An adapter model (adaptune's or peft's) as peft's adapter folder (see
        :mod:`adaptune.training.checkpoints`); anything else as transformers saves it."""
        if not save_adapter_checkpoint(self, output_dir, state_dict):
            super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not load_adapter_checkpoint(self, resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not load_adapter_checkpoint(self, self.state.best_model_checkpoint):
            super()._load_best_model()
