"""``DPOConfig``, ``ORPOConfig``, ``CPOConfig`` and ``KTOConfig``: adaptune's ``TrainingArguments``
with TRL's argument names and defaults for each objective (so a TRL script changes its import line).

Defaults that differ from TRL's: no bf16 and no gradient checkpointing unless asked (adaptune's
``TrainingArguments`` picks the precision the hardware has); ``packing`` (adaptune's: the pairs of
a batch go into one row with no padding); ``precompute_ref_log_probs=False`` still computes each
example's reference log-probabilities only once (on first use) and keeps them with the checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...errors import ConfigError
from ..arguments import TrainingArguments
from .losses import CPO_LOSS_TYPES, DPO_LOSS_TYPES, KTO_LOSS_TYPES

__all__ = ["CPOConfig", "DPOConfig", "KTOConfig", "ORPOConfig", "PreferenceConfig"]


@dataclass
class PreferenceConfig(TrainingArguments):
    """What all preference objectives share."""

    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW's learning rate (TRL's default)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps (TRL's default)."})
    beta: float = field(default=0.1, metadata={"help": "How far the policy may move from the reference "
                                                        "(DPO, KTO) or the weight of the preference term (ORPO)."})
    max_length: int | None = field(default=1024, metadata={"help": "Tokens of prompt + answer kept (the start)."})
    packing: bool = field(
        default=True,
        metadata={"help": "Put all sequences of a batch in one row, position_ids restarting at each, no padding "
                          "(needs a model that keeps packed sequences apart; checked, else padded rows)."})
    share_prompt: bool = field(
        default=True,
        metadata={"help": "With packing: each pair as prompt, chosen, rejected in the row, the prompt run once "
                          "(training.preference.attention; checked on the model, else packed as two sequences)."})
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute every example's reference log-probabilities in one pass before training. "
                          "Off: each example's are computed the first time it is seen. Either way they are "
                          "computed once and saved with each checkpoint."})
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of that pass (default: the train / eval batch size)."})
    disable_dropout: bool = field(default=True, metadata={"help": "Train with every nn.Dropout of the model at "
                                                                  "p=0 (each gets its p back after training)."})

    def __post_init__(self):
        if not (isinstance(self.beta, (int, float)) and self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"beta must be a positive number, got {self.beta!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ConfigError(f"max_length must be an integer >= 2 (or None), got {self.max_length!r}")
        super().__post_init__()


def _check_smoothing(value: float, allowed: bool, where: str) -> None:
    if not 0.0 <= value < 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5), got {value!r}")
    if value and not allowed:
        raise ConfigError(f"label_smoothing is used by {where}; the loss type chosen would ignore it")


@dataclass
class DPOConfig(PreferenceConfig):
    """Direct Preference Optimization (and IPO with ``loss_type="ipo"``)."""

    loss_type: list[str] | str = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"One of {', '.join(DPO_LOSS_TYPES)}, or a list of them (weighted by loss_weights)."})
    loss_weights: list[float] | None = field(default=None, metadata={"help": "One weight per loss type."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "robust loss: the probability that a pair's preference is flipped."})

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        for kind in self.loss_type:
            if kind not in DPO_LOSS_TYPES:
                raise ConfigError(f"DPO loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {kind!r}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(f"loss_weights needs one weight per loss type ({len(self.loss_type)}), "
                              f"got {len(self.loss_weights)}")
        _check_smoothing(self.label_smoothing, "robust" in self.loss_type, "loss_type='robust'")
        super().__post_init__()


@dataclass
class ORPOConfig(PreferenceConfig):
    """Odds Ratio Preference Optimization: SFT on the chosen answers plus an odds-ratio term; no reference."""


@dataclass
class CPOConfig(PreferenceConfig):
    """Contrastive Preference Optimization; ``loss_type="simpo"`` with ``cpo_alpha=0`` is SimPO."""

    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {', '.join(CPO_LOSS_TYPES)}."})
    label_smoothing: float = field(default=0.0, metadata={"help": "sigmoid / simpo: conservative loss."})
    cpo_alpha: float = field(default=1.0, metadata={"help": "Weight of the NLL of the chosen answers."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin."})

    def __post_init__(self):
        if self.loss_type not in CPO_LOSS_TYPES:
            raise ConfigError(f"CPO loss_type must be one of {', '.join(CPO_LOSS_TYPES)}, got {self.loss_type!r}")
        _check_smoothing(self.label_smoothing, self.loss_type in ("sigmoid", "simpo"),
                         "loss_type 'sigmoid' and 'simpo'")
        if self.cpo_alpha < 0:
            raise ConfigError(f"cpo_alpha must be >= 0, got {self.cpo_alpha}")
        super().__post_init__()


@dataclass
class KTOConfig(PreferenceConfig):
    """Kahneman-Tversky Optimization: answers labelled desirable or not, no pairs needed."""

    loss_type: str = field(default="kto", metadata={"help": f"One of {', '.join(KTO_LOSS_TYPES)}."})
    desirable_weight: float = field(default=1.0, metadata={"help": "Weight of the desirable examples' losses."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "Weight of the undesirable ones'."})
    train_sampling_strategy: str = field(
        default="sequential",
        metadata={"help": "The KL term pairs each example with its neighbour's answer in a fixed-order batch, "
                          "so 'kto' needs 'sequential' (TRL's rule)."})

    def __post_init__(self):
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ConfigError(f"KTO loss_type must be one of {', '.join(KTO_LOSS_TYPES)}, got {self.loss_type!r}")
        if self.loss_type == "kto" and self.train_sampling_strategy != "sequential":
            raise ConfigError("KTO's KL term needs train_sampling_strategy='sequential' (each example is paired "
                              "with its neighbour's answer); got " + repr(self.train_sampling_strategy))
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        super().__post_init__()
