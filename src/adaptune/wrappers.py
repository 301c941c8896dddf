"""What is inside an adapter wrapper (adaptune's ``PeftModel``, or peft's), found by duck typing.

The Trainer, the chunked loss and the checkpoint code all need the transformers model under a
wrapper and the wrapper's active adapter config. They ask here, so peft is never imported and a
wrapper is recognised the same way everywhere: it has ``peft_config``, ``save_pretrained`` and
``get_base_model``. A transformers model with adapters loaded through transformers' own
integration is not a wrapper.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def adapter_base(model: Any) -> nn.Module | None:
    """The transformers model inside an adapter wrapper, else None."""
    import transformers

    if isinstance(model, transformers.PreTrainedModel):
        return None
    if hasattr(model, "peft_config") and callable(getattr(model, "save_pretrained", None)) \
            and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return None


def active_adapter_name(model: Any) -> str:
    """The wrapper's active adapter (the first one when several are active)."""
    name = getattr(model, "active_adapter", "default")
    return name[0] if isinstance(name, (list, tuple)) else name


def active_config(model: Any) -> Any | None:
    """The active adapter's config of a wrapper, or None."""
    config = getattr(model, "active_peft_config", None)
    peft_config = getattr(model, "peft_config", None)
    if config is None and isinstance(peft_config, dict):
        config = peft_config.get(active_adapter_name(model))
    return config


def is_causal_lm_class(model: nn.Module) -> bool:
    """Whether ``model`` is one of transformers' decoder-only ``...ForCausalLM`` classes."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    config = getattr(model, "config", None)
    return type(model).__name__ in names and not getattr(config, "is_encoder_decoder", False)
