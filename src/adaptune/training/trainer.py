"""``Trainer`` and ``TrainingArguments``: transformers' own, with adaptune's fallbacks and callbacks.

Not a new training loop: the subclasses keep transformers' loop, optimizer, scheduler, logging
and resume machinery, and change only what makes a classic script break or waste work:

- ``TrainingArguments(fp16=True)`` / ``bf16=True`` on hardware without it trains in the best
  precision there is (bf16 where supported, else fp16 on a GPU, else fp32), said once.
  (transformers 5 raises for bf16 on a CPU and silently ignores fp16 there.)
- ``Trainer(tokenizer=...)``, renamed ``processing_class=`` in transformers 5, is accepted.
- Rows that are tuples (``TensorDataset(input_ids, attention_mask[, labels])``) become dicts, and
  a causal LM batch without labels gets ``labels = input_ids`` with padding masked to -100.
- An adapter model (adaptune's ``PeftModel``, or peft's) is checkpointed as an adapter folder,
  and resume / ``load_best_model_at_end`` load the adapter back.
- Default callbacks: a progress bar with loss and tokens/s, ``metrics.jsonl`` + ``loss.png``,
  and a NaN/inf guard (see :mod:`adaptune.callbacks`).
- The output folder is checked for write access and free space before anything else.
- Causal LMs train without the full logits tensor: ``chunked_loss`` (on by default) runs the output
  head and the loss only at labelled positions, a chunk of rows at a time (:mod:`adaptune.loss`),
  for the same loss and gradients. ``micro_batch_tokens`` runs each batch in row groups (same
  gradients, less activation memory); ``compile_layers`` compiles each decoder layer.
- Gated-SiLU MLPs keep two intermediate tensors for backward instead of three
  (``fused_mlp_activation``), and fp32 Llama-style RMSNorms run in one buffer (``fused_rms_norm``):
  fewer short-lived tensors, a smaller resident peak on a CPU (:mod:`adaptune.fused`).
- Packed rows attend one example at a time (``packed_attention``, :mod:`adaptune.attention`):
  a row's attention costs what its examples' do, so rows can be as wide as a batch, unpadded.
- Under fp16/bf16 autocast, frozen ``nn.Linear`` layers keep no 16-bit copy of their weight for
  backward (``lean_autocast``, :mod:`adaptune.autocast_linear`): a model's worth of 16-bit weights
  less per step, the same products.
- ``cpu_keep_freed_memory`` (off by default) lets glibc keep freed memory for the next step on a
  CPU (:mod:`adaptune.allocator`): far fewer page faults, but no measured speed gain here.

Defaults that differ from transformers: ``report_to="none"``; ``remove_unused_columns`` is off when
you pass your own ``data_collator`` (it may need columns the model's forward does not take) and on
otherwise; ``dataloader_pin_memory`` is on only with a GPU.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, unwrap_peft_model
from transformers.utils import logging as hf_logging
from transformers.utils.generic import can_return_loss, find_labels

from ..atomic import check_writable
from ..errors import ConfigError, DataError
from .callbacks import DivergenceGuard, MetricsLogger, ProgressCallback, StepStats, TrainingDiverged
from .checkpoints import active_adapter as _active_adapter
from .checkpoints import adapter_base as _adapter_base
from .checkpoints import load_adapter_checkpoint, save_adapter_checkpoint

logger = hf_logging.get_logger(__name__)

__all__ = ["AdaptuneWarning", "LabelsAndTuplesCollator", "Trainer", "TrainingArguments", "TrainingDiverged",
           "last_complete_checkpoint"]



class AdaptuneWarning(UserWarning):
    """adaptune changed something you asked for so that the run can go on; the text says what."""


def _warn(message: str, stacklevel: int = 3) -> None:
    warnings.warn(message, AdaptuneWarning, stacklevel=stacklevel)


# ---- precision --------------------------------------------------------------------------------


def launched_with(flag: str) -> bool:
    """Whether ``accelerate launch`` turned ``flag`` on (it passes its choices as environment variables)."""
    return os.environ.get(flag, "false").lower() in ("1", "true")


def _accelerator_type() -> str | None:
    """'cuda', 'xpu', 'mps', ... for the accelerator torch sees, or None on a CPU-only machine."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None:
        return acc.current_accelerator().type if acc.is_available() else None
    return "cuda" if torch.cuda.is_available() else None


def _native_bf16(device: str) -> bool:
    if device == "cuda":
        try:  # emulated bf16 on pre-Ampere GPUs works but is slow: fp16 is the better choice there
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            return torch.cuda.is_bf16_supported()
    from transformers.utils import is_torch_bf16_gpu_available

    return is_torch_bf16_gpu_available()


def _best_precision(use_cpu: bool) -> tuple[str, str]:
    """(best of 'bf16' / 'fp16' / 'fp32', device name) for this machine."""
    device = None if use_cpu else _accelerator_type()
    if device is None:
        return "fp32", "CPU"
    if _native_bf16(device):
        return "bf16", device
    return "fp16", device


# ---- arguments ---------------------------------------------------------------------------------


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' ``TrainingArguments`` with adaptune's defaults and precision fallback."""

    report_to: None | str | list[str] = field(
        default="none",
        metadata={"help": "Integrations to report to ('all', 'none', or names); adaptune defaults to 'none'."},
    )
    remove_unused_columns: bool | None = field(
        default=None,
        metadata={"help": "Drop dataset columns the model's forward does not take. None (default): drop them "
                          "only when the Trainer uses its own collator, not with a data_collator you pass."},
    )
    dataloader_pin_memory: bool | None = field(
        default=None, metadata={"help": "Pin dataloader memory; None (default): only when a GPU is used."}
    )
    chunked_loss: bool = field(
        default=True,
        metadata={"help": "Causal LMs: run the output head and the loss only at positions that have a label, "
                          "loss_chunk_rows at a time, never holding all tokens x vocabulary logits "
                          "(adaptune.loss). Same loss and gradients; models where that cannot be checked "
                          "use their own loss."},
    )
    loss_chunk_rows: int = field(
        default=256, metadata={"help": "Rows of logits made at a time by chunked_loss."}
    )
    micro_batch_tokens: int | None = field(
        default=None,
        metadata={"help": "Run each batch as forward+backward passes over row groups of at most this many "
                          "tokens (at least one row). The gradients are the batch's own (the loss is "
                          "normalised over the whole batch); peak activation memory shrinks with the group. "
                          "None: the whole batch at once."},
    )
    fused_mlp_activation: bool = field(
        default=True,
        metadata={"help": "Gated-SiLU MLPs (Llama, Mistral, Qwen, SmolLM...): compute silu(gate) * up with one "
                          "autograd function that keeps gate and up for backward, not also silu(gate) "
                          "(adaptune.fused.swiglu): about a fifth less activation memory, same numbers."},
    )
    fused_rms_norm: bool = field(
        default=True,
        metadata={"help": "fp32 Llama-style RMSNorms: one autograd function that writes into one buffer and keeps "
                          "x and a scalar a row for backward (adaptune.fused.rms_norm): fewer short-lived "
                          "tensors between the kept ones, so a smaller resident peak on a CPU; same outputs."},
    )
    packed_attention: bool = field(
        default=True,
        metadata={"help": "While training, run models whose attention is sdpa with adaptune.attention: packed "
                          "rows (position_ids restarting at each example) attend one example at a time, so "
                          "no block-diagonal mask over the whole row and no padding is needed. Batches with a "
                          "padding mask run transformers' sdpa as before."},
    )
    lean_autocast: bool = field(
        default=True,
        metadata={"help": "With fp16/bf16 autocast: frozen nn.Linear layers keep their fp32 weight, not its "
                          "16-bit cast, for backward and cast it again there (adaptune.autocast_linear): no "
                          "16-bit copy of every weight held through each step; the same products."},
    )
    cpu_keep_freed_memory: bool = field(
        default=False,
        metadata={"help": "Training on a CPU with glibc: let malloc keep freed blocks (below 1 GiB) for reuse "
                          "instead of unmapping them, so each step's activations do not pay page faults "
                          "again (adaptune.allocator). Process-wide. bench/step_profile.py measured 83-95% "
                          "fewer page faults but no speed gain on a 2-core VM, so it is off by default."},
    )
    compile_layers: bool = field(
        default=False,
        metadata={"help": "torch.compile each decoder layer (regional compilation: one compile serves all "
                          "layers), keeping chunked_loss. transformers' own torch_compile compiles the whole "
                          "model instead and turns chunked_loss off."},
    )

    def __post_init__(self):
        self._cpu_distributed_defaults()
        self._fall_back_precision()
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = not self.use_cpu and _accelerator_type() is not None
        super().__post_init__()

    def _cpu_distributed_defaults(self) -> None:
        """Under torchrun / accelerate launch on a machine without an accelerator, transformers
        runs each process alone (no DDP) unless told ``use_cpu``; adaptune says it, with gloo."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _accelerator_type() is None:
            self.use_cpu = True
            if self.ddp_backend is None:
                self.ddp_backend = "gloo"
            asked = self.fsdp or launched_with("ACCELERATE_USE_FSDP")
            if asked and os.environ.get("RANK", "0") == "0":
                _warn("FSDP was asked for, but accelerate runs FSDP only on accelerators (GPUs): on this CPU "
                      "the processes train with DDP instead, each holding the whole model", stacklevel=5)

    def _fall_back_precision(self) -> None:
        """fp16/bf16 asked for on hardware that lacks it -> the best precision it has, said once."""
        for suffix in ("", "_full_eval"):
            asked = "bf16" if getattr(self, "bf16" + suffix) else "fp16" if getattr(self, "fp16" + suffix) else None
            if asked is None or (asked == "bf16" and self.use_cpu):  # bf16 on use_cpu=True: transformers' CPU amp
                continue
            best, device = _best_precision(self.use_cpu)
            if asked == best or (asked == "fp16" and best == "bf16"):  # fp16 works wherever bf16 does
                continue
            setattr(self, "fp16" + suffix, best == "fp16")
            setattr(self, "bf16" + suffix, best == "bf16")
            _warn(f"{asked}{suffix}=True was asked for, but this machine ({device}) cannot train in {asked}; "
                  f"adaptune uses {best} instead", stacklevel=5)


# ---- data --------------------------------------------------------------------------------------

_ROW_KEYS = ("input_ids", "attention_mask", "labels")


class LabelsAndTuplesCollator:
    """Wrap a data collator so tuple rows and label-less causal LM batches work.

    - ``rows_to_dicts``: rows that are tuples/lists (``TensorDataset(input_ids, attention_mask
      [, labels])``) become dicts before ``inner`` sees them; transformers' collators want dicts.
    - ``causal_lm``: a batch without ``labels`` gets ``labels = input_ids`` with padding
      (``attention_mask == 0``) set to -100, which is what a causal LM is trained on.

    Each fallback is announced once per collator (with an :class:`AdaptuneWarning`).
    """

    def __init__(self, inner: Callable, rows_to_dicts: bool = True, causal_lm: bool = True):
        self.inner = inner
        self.rows_to_dicts = rows_to_dicts
        self.causal_lm = causal_lm
        self._said: set[str] = set()

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            _warn(message)

    def __call__(self, features: list) -> dict:
        if self.rows_to_dicts and features and isinstance(features[0], (tuple, list)):
            size = len(features[0])
            if not 1 <= size <= len(_ROW_KEYS):
                raise DataError(f"dataset rows are tuples of {size} items; adaptune reads tuples as "
                                f"({', '.join(_ROW_KEYS)}), so give rows of 1-3 items or dicts")
            self._say_once("rows", f"the dataset yields tuples, not dicts; adaptune reads each row as "
                                   f"({', '.join(_ROW_KEYS[:size])}), the order TensorDataset(...) was given")
            features = [dict(zip(_ROW_KEYS, row)) for row in features]
        batch = self.inner(features)
        if self.causal_lm and "labels" not in batch and isinstance(batch.get("input_ids"), torch.Tensor):
            self._say_once("labels", "the batches have no labels; adaptune trains the causal LM on input_ids "
                                     "(labels = input_ids, with padding set to -100)")
            labels = batch["input_ids"].clone()
            mask = batch.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                labels[mask == 0] = -100
            batch["labels"] = labels
        return batch


# ---- models ------------------------------------------------------------------------------------


def _is_causal_lm(model: Any) -> bool:
    base = _adapter_base(model)
    if base is not None:
        config = model.peft_config.get(_active_adapter(model)) if isinstance(model.peft_config, dict) else None
        task = getattr(config, "task_type", None)
        if task is not None:
            return str(getattr(task, "value", task)) == "CAUSAL_LM"
    else:
        base = unwrap_peft_model(model)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    config = getattr(base, "config", None)
    return type(base).__name__ in names and not getattr(config, "is_encoder_decoder", False)


def _checkpoint_bytes(model: torch.nn.Module | None) -> int:
    """Disk for one checkpoint: the saved weights plus two fp32 Adam moments, plus 16 MiB of small files."""
    if model is None:
        return 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    saved = trainable if _adapter_base(model) is not None else list(model.parameters())
    return (sum(p.numel() * p.element_size() for p in saved) + 8 * sum(p.numel() for p in trainable)
            + (16 << 20))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` whose ``trainer_state.json`` (written last) reads back whole.

    transformers' own ``get_last_checkpoint`` takes the newest folder even if a kill interrupted
    its writing; resuming from that fails or, worse, loads half a state.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    steps = []
    for child in root.iterdir():
        prefix, _, number = child.name.partition("-")
        if prefix == PREFIX_CHECKPOINT_DIR and number.isdigit() and child.is_dir():
            steps.append((int(number), child))
    for _, child in sorted(steps, reverse=True):
        try:
            json.loads((child / TRAINER_STATE_NAME).read_text())
        except (OSError, ValueError):
            logger.warning(f"skipping {child}: it was not completely written")
            continue
        return str(child)
    return None


# ---- trainer -----------------------------------------------------------------------------------

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
            _warn("Trainer(tokenizer=...) is called processing_class= since transformers 5; "
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
        super().__init__(**params)

        self.data_collator = LabelsAndTuplesCollator(self.data_collator, rows_to_dicts=user_collator is None,
                                                     causal_lm=_is_causal_lm(self.model))
        self._see_through_adapter_wrapper()
        if self.pop_callback(transformers.trainer_callback.ProgressCallback) is not None:
            self.add_callback(ProgressCallback(self.step_stats))
        self.add_callback(MetricsLogger())
        self.divergence_guard = DivergenceGuard(self.step_stats)
        self.add_callback(self.divergence_guard)

    def _see_through_adapter_wrapper(self) -> None:
        """Take label names from the base model, as transformers does for peft's own PeftModel.

        transformers recognises only ``peft.PeftModel``; for another wrapper whose forward is
        ``(*args, **kwargs)`` it would find no label names and report no eval loss.
        """
        base = _adapter_base(self.model)
        if base is None or unwrap_peft_model(self.model) is not self.model:
            return
        if self.args.label_names is None:
            self.label_names = find_labels(type(base))
        self.can_return_loss = can_return_loss(type(base))

    def _set_signature_columns_if_needed(self) -> None:
        base = _adapter_base(self.model)
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
        if getattr(self.args, "fused_mlp_activation", False) and self.model is not None:
            from ..speedups.fused import fuse_gated_mlps

            fuse_gated_mlps(self.model)
        if getattr(self.args, "fused_rms_norm", False) and self.model is not None:
            from ..speedups.fused import fuse_rms_norms

            fuse_rms_norms(self.model)
        if getattr(self.args, "lean_autocast", False) and (self.args.bf16 or self.args.fp16) and self.model is not None:
            from ..speedups.autocast import lean_autocast_linears

            lean_autocast_linears(self.model)
        self._compile_layers()
        if getattr(self.args, "cpu_keep_freed_memory", False) and self.args.device.type == "cpu":
            from ..speedups.allocator import keep_freed_memory

            keep_freed_memory()
        with self._packed_attention():
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                   ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        guard = self.divergence_guard
        if guard.diverged and guard in self.callback_handler.callbacks:
            last = last_complete_checkpoint(self.args.output_dir)
            raise TrainingDiverged(guard.message + f"; last good checkpoint: {last or 'none was saved'}")
        return output

    def _packed_attention(self) -> contextlib.AbstractContextManager[int]:
        """``args.packed_attention``: the model's sdpa attention switched to adaptune.attention's for
        the run (yields how many configs were switched)."""
        if not getattr(self.args, "packed_attention", False) or self.model is None:
            return contextlib.nullcontext(0)
        from ..speedups.attention import packed_attention

        return packed_attention(self.model)

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
        """Whether adaptune.loss computes exactly the loss transformers would for this batch."""
        from ..speedups.loss import BODY_KEYS, supports_chunked_loss

        if not getattr(self.args, "chunked_loss", False) or "labels" not in inputs:
            return False
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return False
        if not set(inputs) <= BODY_KEYS | {"labels", "shift_labels"}:
            return False
        if self.accelerator.unwrap_model(model, keep_torch_compile=False) is not model:
            return False  # DDP / a whole-model compile wrapper: run it, not around it
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return False  # sharded weights are gathered by hooks on the model's forward, which this goes around
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and (getattr(pc, "sp_enabled", False) or getattr(pc, "cp_enabled", False)):
            return False
        return supports_chunked_loss(model)

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        """transformers' loss; for causal LMs (``args.chunked_loss``) computed without full logits."""
        if return_outputs or not self._chunked_loss_applies(model, inputs):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from ..speedups.loss import causal_lm_loss

        # As transformers: the model sees num_items_in_batch only when its forward takes loss kwargs.
        num = num_items_in_batch if self.model_accepts_loss_kwargs else None
        # accelerate applies fp16/bf16 autocast by wrapping model.forward, which this path goes around
        # (body, then head): without this context, bf16=True would silently train in fp32.
        with self.accelerator.autocast():
            loss, _ = causal_lm_loss(model, inputs, num, chunk_rows=self.args.loss_chunk_rows)
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

    def _compile_layers(self) -> None:
        """``args.compile_layers``: torch.compile each decoder layer once (all share one graph)."""
        if not getattr(self.args, "compile_layers", False) or getattr(self, "_layers_compiled", False):
            return
        from ..speedups.loss import causal_lm_parts

        parts = causal_lm_parts(self.model)
        layers = getattr(parts[1], "layers", None) if parts is not None else None
        if not isinstance(layers, torch.nn.ModuleList):
            _warn("compile_layers: no decoder layer list found in this model; running it uncompiled")
            return
        for layer in layers:
            layer.compile()
        self._layers_compiled = True

    # ---- saving and loading adapters ---------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """An adapter model (adaptune's or peft's) as peft's adapter folder (see
        :mod:`adaptune.trainer_checkpoints`); anything else as transformers saves it."""
        if not save_adapter_checkpoint(self, output_dir, state_dict):
            super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not load_adapter_checkpoint(self, resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not load_adapter_checkpoint(self, self.state.best_model_checkpoint):
            super()._load_best_model()
