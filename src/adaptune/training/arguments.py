"""``TrainingArguments``: transformers' own, with adaptune's defaults, speed-up switches and precision
fallback.

Defaults that differ from transformers: ``report_to="none"``; ``remove_unused_columns`` is off when
you pass your own ``data_collator`` (it may need columns the model's forward does not take) and on
otherwise; ``dataloader_pin_memory`` is on only with a GPU. ``fp16=True`` / ``bf16=True`` on
hardware without it trains in the best precision there is (bf16 where supported, else fp16 on a
GPU, else fp32), said once: transformers 5 raises for bf16 on a CPU and silently ignores fp16
there. Under torchrun on a CPU-only machine the processes run DDP over gloo.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import transformers

from .. import device
from ..errors import warn_user

__all__ = ["TrainingArguments"]


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
                          "(adaptune.speedups.loss). Same loss and gradients; models where that cannot be checked "
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
                          "(adaptune.speedups.swiglu): about a fifth less activation memory, same numbers."},
    )
    fused_rms_norm: bool = field(
        default=True,
        metadata={"help": "fp32 Llama-style RMSNorms: one autograd function that writes into one buffer and keeps "
                          "x and a scalar a row for backward (adaptune.speedups.rms_norm): fewer short-lived "
                          "tensors between the kept ones, so a smaller resident peak on a CPU; same outputs."},
    )
    packed_attention: bool = field(
        default=True,
        metadata={"help": "While training, run models whose attention is sdpa with adaptune.speedups.attention: packed "
                          "rows (position_ids restarting at each example) attend one example at a time, so "
                          "no block-diagonal mask over the whole row and no padding is needed. Batches with a "
                          "padding mask run transformers' sdpa as before."},
    )
    lean_autocast: bool = field(
        default=True,
        metadata={"help": "With fp16/bf16 autocast: frozen nn.Linear layers keep their fp32 weight, not its "
                          "16-bit cast, for backward and cast it again there (adaptune.speedups.autocast): no "
                          "16-bit copy of every weight held through each step; the same products."},
    )
    cpu_keep_freed_memory: bool = field(
        default=False,
        metadata={"help": "Training on a CPU with glibc: let malloc keep freed blocks (below 1 GiB) for reuse "
                          "instead of unmapping them, so each step's activations do not pay page faults "
                          "again (adaptune.speedups.allocator). Process-wide; off by default: far fewer page faults "
                          "but no measured speed gain (docs/benchmarks.md)."},
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
            self.dataloader_pin_memory = not self.use_cpu and device.accelerator_type() is not None
        super().__post_init__()

    def _cpu_distributed_defaults(self) -> None:
        """Under torchrun / accelerate launch on a machine without an accelerator, transformers
        runs each process alone (no DDP) unless told ``use_cpu``; adaptune says it, with gloo."""
        if device.world_size() > 1 and device.accelerator_type() is None:
            self.use_cpu = True
            if self.ddp_backend is None:
                self.ddp_backend = "gloo"
            asked = self.fsdp or device.launched_with("ACCELERATE_USE_FSDP")
            if asked and device.is_main_process():
                warn_user("FSDP was asked for, but accelerate runs FSDP only on accelerators (GPUs): on this CPU "
                      "the processes train with DDP instead, each holding the whole model", stacklevel=5)

    def _fall_back_precision(self) -> None:
        """fp16/bf16 asked for on hardware that lacks it -> the best precision it has, said once."""
        for suffix in ("", "_full_eval"):
            asked = "bf16" if getattr(self, "bf16" + suffix) else "fp16" if getattr(self, "fp16" + suffix) else None
            if asked is None or (asked == "bf16" and self.use_cpu):  # bf16 on use_cpu=True: transformers' CPU amp
                continue
            best, where = device.best_precision(self.use_cpu)
            if asked == best or (asked == "fp16" and best == "bf16"):  # fp16 works wherever bf16 does
                continue
            setattr(self, "fp16" + suffix, best == "fp16")
            setattr(self, "bf16" + suffix, best == "bf16")
            warn_user(f"{asked}{suffix}=True was asked for, but this machine ({where}) cannot train in {asked}; "
                  f"adaptune uses {best} instead", stacklevel=5)
