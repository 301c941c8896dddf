"""The training methods of ``adaptune train``: what each one loads, wraps and trains.

``lora``, ``dora`` and ``qlora`` train LoRA adapters (``qlora`` on a 4-bit base), the three prompt
methods train virtual tokens or a prefix, ``full`` trains every weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .job import TrainJob

METHODS = ("lora", "dora", "qlora", "prompt-tuning", "p-tuning", "prefix-tuning", "full")
LORA_METHODS = ("lora", "dora", "qlora")
PROMPT_METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning")
# --lr when not given: what each method trains well with on SmolLM2-135M (bench/methods.py)
DEFAULT_LR = {"lora": 1e-3, "dora": 1e-3, "qlora": 1e-3, "prompt-tuning": 3e-2, "p-tuning": 1e-3,
              "prefix-tuning": 1e-2, "full": 5e-5}

__all__ = ["DEFAULT_LR", "LORA_METHODS", "METHODS", "PROMPT_METHODS", "adapter_config_for", "load_base",
           "wrap_model"]


def adapter_config_for(job: TrainJob, model: torch.nn.Module):
    """The peft-style config the method asks for (None for full fine-tuning)."""
    from ..config import LoftQConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    if job.method in LORA_METHODS:
        loftq: dict[str, Any] = {}
        if job.lora_init == "loftq":
            loftq = {"init_lora_weights": "loftq", "loftq_config": LoftQConfig(
                loftq_bits=8 if job.quantize_kind == "int8" else 4, loftq_iter=job.loftq_iter,
                loftq_bits_pattern={m: 8 for m in job.int8_modules or ()})}
        return LoraConfig(r=job.r, lora_alpha=job.alpha, lora_dropout=job.dropout, target_modules=job.targets,
                          use_dora=job.method == "dora", task_type=TaskType.CAUSAL_LM, **loftq)
    if job.method == "prompt-tuning":
        # start from embeddings of real tokens (sampled from the vocabulary), not N(0, 1) rows far
        # larger than the model's own embeddings (Lester et al.: a vocabulary init trains better)
        return PromptTuningConfig(num_virtual_tokens=job.virtual_tokens, task_type=TaskType.CAUSAL_LM,
                                  prompt_tuning_init="SAMPLE_VOCAB")
    if job.method == "p-tuning":
        # encoder_hidden_size None = the model's hidden size (peft's default): the MLP is as wide as the
        # embeddings it makes. Only its output (virtual_tokens x hidden) is saved.
        return PromptEncoderConfig(num_virtual_tokens=job.virtual_tokens, task_type=TaskType.CAUSAL_LM,
                                   encoder_hidden_size=None)
    if job.method == "prefix-tuning":
        return PrefixTuningConfig(num_virtual_tokens=job.virtual_tokens, task_type=TaskType.CAUSAL_LM)
    return None


def load_base(job: TrainJob):
    """Base model + tokenizer, quantized when the method or --quantize asks for it.

    transformers quantizes while loading, unless layers are to be mixed (``--int8-modules``), LoftQ
    is to choose what each adapted layer stores, or the base is a GGUF file (transformers cannot
    quantize while it reads one): then the full-precision model is loaded and quantized in memory
    (``quant.bnb.quantize_linears``; with LoftQ by ``wrap_model``).
    """
    from ..hub import load_model_and_tokenizer, resolve_model_source

    quantize = job.quantize_kind
    from_gguf = bool(quantize) and "gguf_file" in resolve_model_source(job.model)[1]
    in_memory = bool(quantize and (job.int8_modules or job.lora_init == "loftq" or from_gguf))
    kwargs: dict[str, Any] = {"dtype": job.dtype}
    if quantize and not in_memory:
        from ..quant.bnb import bnb_config

        kwargs["quantization_config"] = bnb_config(quantize)
    model, tokenizer = load_model_and_tokenizer(job.model, trust_remote_code=job.trust_remote_code, **kwargs)
    if in_memory and job.lora_init != "loftq":
        from ..quant.bnb import quantize_linears

        quantize_linears(model, quantize, job.int8_modules or ())
    if quantize:
        from ..quant.kbit import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.gradient_checkpointing)
    if job.quantize_embeddings:
        from ..quant.int8_embedding import quantize_embeddings

        quantize_embeddings(model)
    return model, tokenizer


def wrap_model(job: TrainJob, model: torch.nn.Module):
    """Apply the method: a PeftModel for adapters, the model itself (all trainable) for ``full``."""
    from ..peft_model import get_peft_model

    config = adapter_config_for(job, model)
    if config is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    peft_model = get_peft_model(model, config)
    if job.lora_init == "loftq":  # LoftQ quantized the adapted layers; the others are quantized plainly
        from ..quant.bnb import quantize_linears
        from ..quant.kbit import keep_trainable_layout, release_checkpoint_mapping

        quantize_linears(peft_model.get_base_model(), job.quantize_kind, job.int8_modules or ())
        release_checkpoint_mapping(model)
        keep_trainable_layout(model)
    return peft_model
