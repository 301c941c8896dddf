"""Prompt-learning adapters as peft's files hold them.

File format (peft's): one tensor ``prompt_embeddings`` holding the encoder's *output*, shape
(num_virtual_tokens * num_transformer_submodules, token_dim), or for prefix tuning
(num_virtual_tokens, num_layers * 2 * token_dim); P-tuning's MLP/LSTM and prefix tuning's
projection are not saved. A loaded adapter therefore always becomes a plain embedding that holds
the saved output and is used as is, which reproduces the saved prompt exactly. Heads a task trains
in full (the classifier of SEQ_CLS) are saved as ``base_model.<path>.<param>``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ...config import PromptEncoderConfig
from ...errors import AdapterFileError
from ..base import save_wrappers
from ..files import check_values, clean_path, disk_tensors, tensor_reader
from .encoders import PromptEmbedding, output_shape

if TYPE_CHECKING:
    from .model import PromptLearning

DISK_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."

__all__ = ["DISK_KEY", "load_state_dict_from_disk", "state_dict_for_disk"]


def state_dict_for_disk(tuner: PromptLearning, adapter_name: str,
                        state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """peft's tensors: ``prompt_embeddings`` (the encoder output) and any trained heads, from
    the modules or from ``state_dict``, the PeftModel's full one (``tuners.files.tensor_reader``)."""
    read = tensor_reader(state_dict)
    encoder = tuner.encoders[adapter_name]
    weights = {pname: read(f"prompt_encoder.{adapter_name}.{pname}", p)
               for pname, p in encoder.named_parameters()}
    with torch.no_grad():
        out = {DISK_KEY: torch.func.functional_call(encoder, weights, ())}
    for path, wrapper in save_wrappers(tuner.model):
        path = clean_path(path)
        if adapter_name in wrapper.modules_to_save:
            for pname, p in wrapper.modules_to_save[adapter_name].named_parameters():
                pname = clean_path(pname)
                out[f"{HEAD_PREFIX}{path}.{pname}"] = read(
                    f"{HEAD_PREFIX}{path}.modules_to_save.{adapter_name}.{pname}", p)
    return disk_tensors(out)

def load_state_dict_from_disk(tuner: PromptLearning, adapter_name: str, tensors: dict[str, torch.Tensor], source: str,
                              trainable: bool | None = None) -> None:
    """Load peft's tensors into ``adapter_name``; the prompt becomes a plain embedding of them.

    ``trainable`` (default: the config's ``not inference_mode``) makes the loaded rows train.
    P-tuning's MLP/LSTM and prefix tuning's projection are not in the file, so training goes on
    from the saved rows directly (said once).
    """
    config = tuner.peft_config[adapter_name]
    if DISK_KEY not in tensors:
        raise AdapterFileError(f"{source}: no {DISK_KEY!r} tensor (is this a {config.peft_type.value} "
                               f"adapter? keys: {sorted(tensors)[:5]})")
    value = tensors[DISK_KEY]
    expected = output_shape(config)
    if tuple(value.shape) != expected:
        raise AdapterFileError(f"{source}: {DISK_KEY} has shape {tuple(value.shape)} but this base model needs "
                               f"{expected} (was the adapter made for another base model?)")
    heads = {f"{HEAD_PREFIX}{path}.{pname}": p for path, w in save_wrappers(tuner.model)
             if adapter_name in w.modules_to_save
             for pname, p in w.modules_to_save[adapter_name].named_parameters()}
    unexpected = sorted(set(tensors) - set(heads) - {DISK_KEY})
    if unexpected:
        raise AdapterFileError(f"{source}: {len(unexpected)} tensors belong to no part of this adapter, e.g. "
                               f"{unexpected[0]}")
    missing = sorted(set(heads) - set(tensors))
    if missing:
        raise AdapterFileError(f"{source}: the trained head tensor {missing[0]} is missing")
    check_values(tensors, source)
    if trainable is None:
        trainable = not config.inference_mode
    reparameterised = isinstance(config, PromptEncoderConfig) or getattr(config, "prefix_projection", False)
    if trainable and reparameterised:
        warnings.warn(f"{source}: the file holds the {config.peft_type.value} encoder's output only (as in "
                      f"peft); training continues on those rows directly", stacklevel=3)
    encoder = PromptEmbedding(*expected).to(tuner.device)
    with torch.no_grad():
        encoder.embedding.weight.copy_(value.to(encoder.embedding.weight.dtype))
        for key, p in heads.items():
            p.copy_(tensors[key].to(p.dtype))
    tuner.encoders[adapter_name] = encoder
    config.inference_mode = not trainable
    tuner.refresh_trainable()
