"""adaptune: parameter-efficient fine-tuning with peft's API and files, and the tools peft leaves out.

A peft user changes only the import line::

    from adaptune import LoraConfig, get_peft_model, TaskType, PeftModel
"""

from __future__ import annotations

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import (
    LoftQConfig,
    LoraConfig,
    PeftConfig,
    PeftType,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
)
from .errors import AdaptuneError
from .peft_model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)

__version__ = "0.1.0"

__all__ = [
    "AdaptuneError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "LoftQConfig",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "get_peft_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
]


_PREFERENCE = ("DPOConfig", "DPOTrainer", "ORPOConfig", "ORPOTrainer", "CPOConfig", "CPOTrainer", "KTOConfig",
               "KTOTrainer")


def __getattr__(name: str):
    """Trainer and friends import transformers' training stack; load them only when asked."""
    if name == "Trainer":
        from .training.trainer import Trainer

        return Trainer
    if name == "TrainingArguments":
        from .training.arguments import TrainingArguments

        return TrainingArguments
    if name in _PREFERENCE:
        from .training import preference

        return getattr(preference, name)
    if name == "prepare_model_for_kbit_training":
        from .quant.kbit import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training
    if name in ("load_model", "load_tokenizer", "load_model_and_tokenizer"):
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'adaptune' has no attribute {name!r}")
