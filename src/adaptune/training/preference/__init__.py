"""Preference tuning (DPO, IPO, ORPO, CPO/SimPO, KTO) on adaptune's Trainer, with TRL's names.

See ``docs/preference.md``. The trainers and configs load transformers' training stack, so they are
imported on first use (``options``, which ``TrainJob`` checks its fields with, stays light).
"""

from __future__ import annotations

__all__ = ["CPOConfig", "CPOTrainer", "DPOConfig", "DPOTrainer", "KTOConfig", "KTOTrainer", "ORPOConfig",
           "ORPOTrainer", "PreferenceConfig"]


def __getattr__(name: str):
    if name in ("CPOConfig", "DPOConfig", "KTOConfig", "ORPOConfig", "PreferenceConfig"):
        from . import config

        return getattr(config, name)
    if name in ("CPOTrainer", "DPOTrainer", "KTOTrainer", "ORPOTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
