"""peft's ``AutoPeftModel`` classes: load the base model an adapter names, then the adapter.

``AutoPeftModelForCausalLM.from_pretrained("runs/adapter")`` reads ``base_model_name_or_path`` from
the adapter's config, loads that base with transformers' ``AutoModelFor...`` class for the task
(keyword arguments such as ``dtype`` or ``device_map`` go to it, as in peft), and returns
``PeftModel.from_pretrained(base, adapter)``. An adapter trained on adaptune's embedded default
model names that model, which is loaded from its GGUF file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import PeftConfig
from .errors import AdapterFileError, ConfigError
from .peft_model import PeftModel
from .tuners.files import resolve_adapter_folder

__all__ = ["AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
           "AutoPeftModelForQuestionAnswering", "AutoPeftModelForSeq2SeqLM",
           "AutoPeftModelForSequenceClassification", "AutoPeftModelForTokenClassification"]


class AutoPeftModel:
    """Base and adapter from the adapter folder alone; the task is the adapter's own."""

    task: str | None = None  # the subclasses' fixed task (TaskType value)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        revision: str | None = None, **kwargs: Any) -> PeftModel:
        from .hub import auto_class_for_task, load_model, names_embedded_default, task_key

        folder = resolve_adapter_folder(pretrained_model_name_or_path)
        peft_config = config or PeftConfig.from_pretrained(folder)
        saved_task = getattr(peft_config.task_type, "value", peft_config.task_type)
        task = cls.task or saved_task or "CAUSAL_LM"
        if cls.task and saved_task and task_key(saved_task) != task_key(cls.task):
            raise ConfigError(f"{folder} is a {saved_task} adapter; load it with the AutoPeftModel class for "
                              f"that task (or AutoPeftModel), not {cls.__name__}")
        base_name = peft_config.base_model_name_or_path
        if not base_name:
            raise AdapterFileError(f"{folder}: the adapter config names no base model "
                                   "(base_model_name_or_path); load the base yourself and call "
                                   "PeftModel.from_pretrained(base, adapter)")
        if names_embedded_default(base_name):
            base = load_model(None, task=task, dtype=kwargs.get("dtype", kwargs.get("torch_dtype")))
        else:
            if revision is not None:
                kwargs["revision"] = revision
            base = auto_class_for_task(task).from_pretrained(base_name, **kwargs)
        return PeftModel.from_pretrained(base, folder, adapter_name=adapter_name, is_trainable=is_trainable,
                                         config=config)


class AutoPeftModelForCausalLM(AutoPeftModel):
    task = "CAUSAL_LM"


class AutoPeftModelForSeq2SeqLM(AutoPeftModel):
    task = "SEQ_2_SEQ_LM"


class AutoPeftModelForSequenceClassification(AutoPeftModel):
    task = "SEQ_CLS"


class AutoPeftModelForTokenClassification(AutoPeftModel):
    task = "TOKEN_CLS"


class AutoPeftModelForQuestionAnswering(AutoPeftModel):
    task = "QUESTION_ANS"


class AutoPeftModelForFeatureExtraction(AutoPeftModel):
    task = "FEATURE_EXTRACTION"
