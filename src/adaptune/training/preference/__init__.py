"""Preference tuning (DPO, IPO, ORPO, CPO/SimPO, KTO) on adaptune's Trainer, with TRL's names.

See ``docs/preference.md``. Importing this package imports transformers' training stack.
"""

from .config import CPOConfig, DPOConfig, KTOConfig, ORPOConfig, PreferenceConfig
from .trainer import CPOTrainer, DPOTrainer, KTOTrainer, ORPOTrainer

__all__ = ["CPOConfig", "CPOTrainer", "DPOConfig", "DPOTrainer", "KTOConfig", "KTOTrainer", "ORPOConfig",
           "ORPOTrainer", "PreferenceConfig"]
