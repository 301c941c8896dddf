"""Quantized base models: bitsandbytes 4/8-bit layers (QLoRA) and int8 embedding tables."""

from .bnb import bnb_config, prepare_model_for_kbit_training

__all__ = ["bnb_config", "prepare_model_for_kbit_training"]
