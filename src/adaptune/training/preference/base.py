"""What every preference trainer shares: data preparation, the reference, metrics, checkpoints.

The objectives (:mod:`.trainer`) only say how a batch's per-sequence log-probabilities become a
loss. Differences from TRL's trainers, all to do less work for the same loss and gradients:

- one forward per step: reference log-probabilities are computed once per example (on first use,
  or before training) and cached, never recomputed each step;
- no reference model: the adapter is disabled, or its starting weights are swapped in;
- the batch's sequences are packed into one row (no padding), and the output head runs only on
  answer positions, a chunk at a time (no full logits tensor).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ...errors import AdaptuneWarning, ConfigError, DataError
from ..checkpoints import last_complete_checkpoint
from ..trainer import Trainer
from .config import PreferenceConfig
from .reference import Reference, ReferenceCache, fingerprint

__all__ = ["PreferenceTrainer"]

_FEATURE_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "KL_completion_ids", "label")


def _rows(dataset: Any) -> list[dict]:
    if dataset is None:
        return []
    if isinstance(dataset, dict):
        raise ConfigError("pass one eval_dataset (a dict of several is not supported by adaptune's preference "
                          "trainers)")
    return [dict(dataset[i]) for i in range(len(dataset))]


@contextlib.contextmanager
def _dropout_off(model: torch.nn.Module, enabled: bool):
    """Every ``nn.Dropout`` of the model at p=0 within the block (TRL's ``disable_dropout``), as it was after."""
    changed = [(m, m.p) for m in model.modules() if enabled and isinstance(m, torch.nn.Dropout) and m.p]
    for module, _ in changed:
        module.p = 0.0
    try:
        yield
    finally:
        for module, p in changed:
            module.p = p


class PreferenceTrainer(Trainer):
    """adaptune's Trainer with a preference objective (subclasses: DPO, ORPO, CPO, KTO)."""

    config_class: type[PreferenceConfig] = PreferenceConfig
    kind = "pairs"        # the data rows: "pairs" or "kto"
    uses_reference = True
    ref_width = 2         # cached reference values per example
    loss_is_scaled_for_ga = False  # the loss is a batch mean: transformers divides it for accumulation

    def __init__(self, model: Any, ref_model: torch.nn.Module | None = None, args: PreferenceConfig | None = None,
                 data_collator: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, compute_metrics: Any = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None), peft_config: Any = None, reference: str | None = None):
        from ...data.collate import pad_token_id_for
        from ...data.preference import PreferenceCollator
        from ...speedups.loss import causal_lm_parts

        if args is None:
            args = self.config_class(output_dir=f"{type(self).__name__.replace('Trainer', '').lower()}-output")
        if not isinstance(args, PreferenceConfig):
            raise ConfigError(f"args must be a {self.config_class.__name__} (adaptune's), got {type(args).__name__}")
        if train_dataset is None:
            raise ConfigError("train_dataset is required")
        if compute_metrics is not None:
            raise ConfigError("compute_metrics is not supported: the trainer logs rewards/* and logps/* itself")
        model, processing_class = self._model_and_tokenizer(model, processing_class, args)
        if peft_config is not None:
            from ...peft_model import get_peft_model

            if hasattr(model, "peft_config"):
                raise ConfigError("pass either a model with an adapter or a peft_config, not both")
            model = get_peft_model(model, peft_config)
        if getattr(model, "_is_prompt_learning", False) or (hasattr(model, "peft_config")
                                                            and causal_lm_parts(model) is None):
            raise ConfigError("preference training works with LoRA-style adapters (LoRA, DoRA, QLoRA) or the "
                              "whole model; prompt, P- and prefix tuning are not supported")
        if self.uses_reference:
            self.reference = self._reference(model, ref_model, reference, fresh_adapter=peft_config is not None)
        else:
            self.reference = None
        self._features: list[list[dict]] = []
        train = self._prepare(train_dataset, processing_class, args, args.per_device_train_batch_size)
        val = self._prepare(eval_dataset, processing_class, args, args.per_device_eval_batch_size) \
            if eval_dataset is not None else None
        self.layout = self._layout(model, args)
        collator = data_collator or PreferenceCollator(pad_token_id_for(processing_class), self.layout,
                                                       args.max_length)
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train, eval_dataset=val,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers)
        self.ref_cache = ReferenceCache(self.ref_width)
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    # ---- set-up ------------------------------------------------------------------------------

    @staticmethod
    def _model_and_tokenizer(model: Any, tokenizer: Any, args: PreferenceConfig) -> tuple[Any, Any]:
        if isinstance(model, str):
            from ...hub import load_model_and_tokenizer

            model, loaded = load_model_and_tokenizer(model)
            tokenizer = tokenizer if tokenizer is not None else loaded
        if tokenizer is None:
            raise ConfigError("processing_class (the tokenizer) is required")
        return model, tokenizer

    @staticmethod
    def _reference(model: Any, ref_model: Any, kind: str | None, fresh_adapter: bool) -> Reference:
        """TRL's rule unless told: a given ref_model; else a new adapter's base; else an adapter the
        model came with (a copy of it, as TRL's 'ref' adapter); else the model before training."""
        if kind is None:
            if ref_model is not None:
                kind = "model"
            elif fresh_adapter:
                kind = "base"
            elif hasattr(model, "peft_config"):
                kind = "adapter"
            else:
                kind = "initial"
        return Reference(model, kind, ref_model)

    def _layout(self, model: Any, args: PreferenceConfig) -> str:
        """'shared' (pairs' prompts once), 'packed' or 'padded': the leanest the model computes exactly."""
        from ...data.packing import supports_packing
        from .attention import supports_shared_prompts

        if not args.packing:
            return "padded"
        if self.kind == "pairs" and args.share_prompt and supports_shared_prompts(model):
            return "shared"
        if supports_packing(model):
            return "packed"
        warnings.warn("this model does not keep packed sequences apart; training on padded rows",
                      AdaptuneWarning, stacklevel=4)
        return "padded"

    @property
    def packing(self) -> bool:
        return self.layout != "padded"

    def batch_attention(self) -> contextlib.AbstractContextManager[int]:
        """The attention this layout's rows need outside ``train`` (which switches it for the whole
        run): packed rows read where each sequence starts from position_ids; shared-prompt rows
        switch theirs on each call; padded rows need nothing."""
        if self.layout != "packed" or self.model is None:
            return contextlib.nullcontext(0)
        from ...speedups.attention import packed_attention

        return packed_attention(self.model)

    def _speedups(self):
        """The Trainer's speed-ups, but shared-prompt rows switch their attention themselves."""
        choice = super()._speedups()
        return dataclasses.replace(choice, packed_attention=False) if self.layout == "shared" else choice

    def _attention(self):
        """Within the block, rows of pairs sharing their prompt are attended as such."""
        from .attention import shared_prompt_attention

        return shared_prompt_attention(self.model) if self.layout == "shared" else contextlib.nullcontext(0)

    def _prepare(self, dataset: Any, tokenizer: Any, args: PreferenceConfig, batch_size: int) -> list[dict]:
        """Rows (strings, chat messages, or TRL's tokenized ``*_ids``) -> feature dicts with a global index."""
        from ...data.preference import add_kl_completions, kto_feature, pair_feature
        from ...data.records import BadRow, DataReport

        build = pair_feature if self.kind == "pairs" else kto_feature
        ids_key = "chosen_ids" if self.kind == "pairs" else "completion_ids"
        report = DataReport("dataset", fmt=self.kind, line_unit="row")
        features = []
        for number, row in enumerate(_rows(dataset), start=1):
            try:
                if ids_key in row and "prompt_ids" in row:  # tokenized already (e.g. by TRL)
                    feature = {k: list(row[k]) if k.endswith("_ids") else row[k] for k in _FEATURE_KEYS if k in row}
                else:
                    feature = build(row, tokenizer, args.max_length)[0].as_dict()
            except BadRow as bad:
                report.skip(str(bad), number)
                continue
            features.append(feature)
        if report.skipped:
            warnings.warn(f"skipped {report.n_skipped} rows: {report.skipped_text()}", AdaptuneWarning, stacklevel=4)
        if not features:
            raise DataError("the dataset has no usable rows" + (f": {report.skipped_text()}" if report.skipped else ""))
        if self.kind == "kto" and getattr(args, "loss_type", "") == "kto" and "KL_completion_ids" not in features[0]:
            features = add_kl_completions(features, batch_size)
        start = sum(len(f) for f in self._features)
        features = [{**f, "index": start + i} for i, f in enumerate(features)]
        self._features.append(features)
        return features

    # ---- the reference ------------------------------------------------------------------------

    def _fingerprint(self) -> str:
        return fingerprint((f for part in self._features for f in part), self.reference.kind if self.reference
                           else "none", type(self).__name__)

    def reference_values(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """(batch, ref_width) reference values of a batch; run under no_grad by the caller."""
        raise NotImplementedError

    def _reference_logps(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The batch's cached reference values, computing the missing ones. Call it before the policy's
        forward: an adapter reference is copied into the weights while it runs, which would invalidate
        a graph that saved them."""
        index = inputs["index"]
        if not self.ref_cache.has(index):
            if self.reference.fixed_at_start and self.state.global_step > 0:
                raise ConfigError("the reference is the model before training, but these examples' reference "
                                  "log-probabilities were not computed before it started")
            self._compute_reference(model, inputs)
        return self.ref_cache.get(index).to(inputs["input_ids"].device)

    def _compute_reference(self, model: torch.nn.Module, inputs: dict[str, Any]) -> None:
        with torch.no_grad(), self._attention(), self.reference.active(self.accelerator.unwrap_model(model)) as ref:
            self.ref_cache.put(inputs["index"], self.reference_values(ref, inputs))

    def precompute_reference(self, datasets: list[list[dict]] | None = None) -> int:
        """Compute every missing reference value of the given (default: all prepared) datasets in one
        pass; returns how many examples were computed."""
        from torch.utils.data import DataLoader

        if self.reference is None:
            return 0
        size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        done = 0
        with self.batch_attention(), self.accelerator.autocast():
            for features in datasets if datasets is not None else self._features:
                missing = [f for f in features if not self.ref_cache.has(torch.tensor([f["index"]]))]
                for batch in DataLoader(missing, batch_size=size, collate_fn=self.data_collator, shuffle=False):
                    batch = self._prepare_inputs(batch)
                    self._compute_reference(self.model, batch)
                    done += len(batch["index"])
        return done

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any):
        """transformers' ``train``; on resume the reference values come from the checkpoint, and a
        reference that only exists before training (or ``precompute_ref_log_probs``) is computed first."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir) or True
        if isinstance(resume_from_checkpoint, (str, Path)) and self.reference is not None:
            why = self.ref_cache.load(resume_from_checkpoint, self._fingerprint())
            if why is not None and self.reference.fixed_at_start:
                raise ConfigError(f"cannot resume from {resume_from_checkpoint}: its reference log-probabilities "
                                  f"cannot be read ({why}) and the reference, the model before training, is gone")
        if self.reference is not None and (self.args.precompute_ref_log_probs or self.reference.fixed_at_start):
            self.precompute_reference()
        with _dropout_off(self.model, self.args.disable_dropout):
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.reference is not None and self.args.should_save and self.ref_cache.known():
            folder = Path(output_dir if output_dir is not None else self.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.ref_cache.save(folder, self._fingerprint())

    # ---- loss and metrics ---------------------------------------------------------------------

    def get_batch_loss_metrics(self, model: torch.nn.Module, inputs: dict[str, Any]
                               ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        with self.accelerator.autocast(), self._attention():
            loss, metrics = self.get_batch_loss_metrics(model, inputs)
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            if value is not None and math.isfinite(value):
                self._metrics[mode][key].append(value)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each metric since the last log (``rewards/*``, ``logps/*``...), as TRL."""
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                   rejected_logps: torch.Tensor) -> dict[str, float]:
    """TRL's logged numbers for a batch of pairs."""
    return {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": chosen_logps.detach().mean().item(),
            "logps/rejected": rejected_logps.detach().mean().item()}
