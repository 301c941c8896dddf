"""``adaptune train --objective ...``: which options each objective takes, and their defaults.

Light on purpose (no training stack): ``TrainJob`` checks its fields with :func:`check_objective`
when it is built, before any model is loaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ..methods import LORA_METHODS

OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "kto")
PREFERENCE_OBJECTIVES = OBJECTIVES[1:]
# beta when not given: TRL's 0.1; SimPO's paper trains with beta 2-2.5 (its rewards are mean log-probs)
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}
# --loss-type choices (the first is the default)
LOSS_TYPES = {"dpo": ("sigmoid", "hinge", "robust", "ipo"), "ipo": ("ipo",), "orpo": (), "simpo": ("simpo",),
              "kto": ("kto", "apo_zero_unpaired")}
# --lr when not given: a tenth of the method's SFT rate (preference steps move a trained model a little)
LR_SCALE = 0.1

__all__ = ["DEFAULT_BETA", "LOSS_TYPES", "OBJECTIVES", "PREFERENCE_OBJECTIVES", "check_objective"]


def _refuse_for_sft(job: Any) -> None:
    for name in ("beta", "loss_type", "ref_adapter"):
        if getattr(job, name) is not None:
            raise ConfigError(f"--{name.replace('_', '-')} is for preference objectives "
                              f"(--objective {', '.join(PREFERENCE_OBJECTIVES)}), not sft")
    if job.label_smoothing:
        raise ConfigError("--label-smoothing is for --objective dpo (--loss-type robust) and simpo, not sft")


def check_objective(job: Any, default_lr: dict[str, float]) -> None:
    """Check ``job.objective`` and its options; fill in beta, loss_type and lr defaults."""
    if job.objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {job.objective!r}")
    if job.objective == "sft":
        _refuse_for_sft(job)
        return
    if job.streaming:
        raise ConfigError(f"--objective {job.objective} reads its pairs into memory (reference log-probs are cached "
                          "per example): --streaming is for sft")
    if job.data_format is not None:
        raise ConfigError(f"--data-format is for sft; --objective {job.objective} reads "
                          + ("'prompt', 'completion', 'label' rows" if job.objective == "kto" else
                             "'prompt', 'chosen', 'rejected' pairs") + " (rename others with --columns)")
    if job.method not in (*LORA_METHODS, "full"):
        raise ConfigError(f"--objective {job.objective} trains LoRA-style adapters (lora, dora, qlora) or the whole "
                          f"model (--method full), not --method {job.method}")
    if job.beta is None:
        job.beta = DEFAULT_BETA[job.objective]
    if not (isinstance(job.beta, (int, float)) and job.beta > 0 and math.isfinite(job.beta)):
        raise ConfigError(f"--beta must be a positive number, got {job.beta!r}")
    choices = LOSS_TYPES[job.objective]
    if job.loss_type is None:
        job.loss_type = choices[0] if choices else None
    elif job.loss_type not in choices:
        allowed = f"one of {', '.join(choices)}" if choices else "not set (it has no variants)"
        raise ConfigError(f"--loss-type for --objective {job.objective} must be {allowed}, got {job.loss_type!r}")
    if not 0 <= job.label_smoothing < 0.5:
        raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {job.label_smoothing}")
    if job.label_smoothing and not (job.loss_type == "robust" or job.objective == "simpo"):
        raise ConfigError("--label-smoothing is used by --objective dpo --loss-type robust and by --objective simpo")
    if job.ref_adapter is not None:
        if job.method not in LORA_METHODS:
            raise ConfigError(f"--ref-adapter continues a LoRA-style adapter: use it with --method lora, dora or "
                              f"qlora, not {job.method}")
        if not (Path(job.ref_adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"--ref-adapter {job.ref_adapter}: not an adapter folder (no adapter_config.json)")
    if job.lr is None:
        job.lr = default_lr[job.method] * LR_SCALE
