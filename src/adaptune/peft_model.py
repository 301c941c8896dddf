"""PeftModel and its task classes: peft's user-facing API over adaptune's tuners.

``get_peft_model(model, config)`` returns the task class for ``config.task_type``; everything a
peft user calls (``save_pretrained``, ``from_pretrained``, ``merge_and_unload``, adapters by name,
``disable_adapter``...) lives here, and each call goes to the model's tuner
(:class:`adaptune.tuners.base.Tuner`): ``LoraModel`` for LoRA, ``PromptLearning`` for prompt
tuning, P-tuning and prefix tuning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LoraConfig, PeftConfig, TaskType
from .errors import AdapterFileError, ConfigError
from .tuners.base import Tuner
from .tuners.files import read_adapter_tensors, resolve_adapter_folder, write_adapter_tensors, write_model_card
from .tuners.lora.model import LoraModel

__all__ = ["MODEL_TYPE_TO_PEFT_MODEL_MAPPING", "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
           "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
           "PeftModelForTokenClassification", "get_peft_model", "get_peft_model_state_dict",
           "set_peft_model_state_dict"]


def _check_task_fits(model: nn.Module, task_type: TaskType | None) -> None:
    """A task type that the model cannot serve is a config mistake, said before any change."""
    if task_type is None:
        return
    config = getattr(model, "config", None)
    is_enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    cls = type(model).__name__
    problem = None
    if task_type == TaskType.CAUSAL_LM and (is_enc_dec or not hasattr(model, "generate")
                                            or model.get_output_embeddings() is None):
        problem = "a decoder-only model with a language-model head (e.g. AutoModelForCausalLM)"
    elif task_type == TaskType.SEQ_2_SEQ_LM and not is_enc_dec:
        problem = "an encoder-decoder model (e.g. AutoModelForSeq2SeqLM)"
    elif task_type in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS) and not names & {"classifier", "score"}:
        problem = "a model with a classification head (classifier or score)"
    elif task_type == TaskType.QUESTION_ANS and "qa_outputs" not in names:
        problem = "a model with a qa_outputs head (AutoModelForQuestionAnswering)"
    if problem:
        raise ConfigError(f"task_type={task_type.value} needs {problem}, but got {cls}")


def _name_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def _memory_id(tensor: torch.Tensor) -> int:
    """What identifies ``tensor``'s memory: its storage's address, else (meta tensors, and tensor
    subclasses without one of their own, such as FSDP2's sharded DTensor parameters) the object."""
    if tensor.device.type == "meta":
        return id(tensor)
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(tensor)


def _tuner_class(config: PeftConfig) -> type:
    """The tuner that implements ``config``'s adapter kind."""
    if config.is_prompt_learning:
        from .tuners.prompt.model import PromptLearning

        return PromptLearning
    if isinstance(config, LoraConfig):
        return LoraModel
    raise ConfigError(f"unsupported config type {type(config).__name__}")


class PeftModel(nn.Module):
    """A transformers model with named adapters. Construct with ``get_peft_model``."""

    # transformers' Trainer refuses quantized models unless it sees adapters attached; this is the
    # flag it reads for that (peft's own class is recognised by type, ours by this attribute).
    _hf_peft_config_loaded = True
    # what adaptune's hooks on transformers' Trainer look for (training.checkpoints)
    _adaptune_adapter_model = True

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        _check_task_fits(model, peft_config.task_type)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _name_of(model)
        self.peft_type = peft_config.peft_type
        tuner_cls = _tuner_class(peft_config)
        if tuner_cls is LoraModel:
            self.base_model = LoraModel(model, peft_config, adapter_name, autocast_adapter_dtype)
        else:  # peft's names: base_model is the transformers model, the encoders live on this module
            self.base_model = model
            self._prompt = tuner_cls(self, peft_config, adapter_name)
        if getattr(model, "is_activation_checkpointing", False):
            self._make_inputs_require_grad()
        _install_trainer_hooks()

    def train(self, mode: bool = True) -> PeftModel:
        _install_trainer_hooks()  # a transformers.Trainer imported after the model was built
        return super().train(mode)

    # ---- the tuner --------------------------------------------------------------------------
    @property
    def _tuner(self) -> Tuner:
        prompt = self.__dict__.get("_prompt")
        return prompt if prompt is not None else self.base_model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_prompt"):
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self._tuner.peft_config

    @property
    def active_adapter(self) -> str:
        return self._tuner.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return list(self._tuner.active_adapters)

    def get_base_model(self) -> nn.Module:
        """The transformers model inside (with adapter layers in place)."""
        return self._tuner.base_transformer()

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any):
        """``adapter_names`` (LoRA): each batch row's adapter, ``__base__`` for none, as in peft."""
        return self._tuner.forward(*args, adapter_names=adapter_names, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any):
        return self._tuner.generate(*args, adapter_names=adapter_names, **kwargs)

    # ---- parameters ------------------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any):
        """nn.Module's, with tied weights (GPT-2's wte/lm_head) as separate copies.

        transformers' own Trainer checkpoints a model it does not recognise by writing its state
        dict with safetensors, which refuses tensors that share memory; copies make that work and
        load back the same (the tie lives in the model, not in the dict).
        """
        state = super().state_dict(*args, **kwargs)
        if kwargs.get("keep_vars"):
            return state
        seen: set[int] = set()
        for key, value in state.items():
            ptr = _memory_id(value)
            if ptr in seen:
                state[key] = value.clone()
            seen.add(ptr)
        return state

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; 4-bit weights count two per stored byte, as peft does."""
        trainable, total = 0, 0
        for p in self.parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":
                n *= 2 * (p.quant_storage.itemsize if hasattr(p, "quant_storage") else 1)
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ---- gradient checkpointing ------------------------------------------------------------
    def _make_inputs_require_grad(self) -> None:
        """With frozen embeddings and reentrant checkpointing, no grad would reach the adapters."""
        base = self.get_base_model()
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        base = self.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        self._make_inputs_require_grad()
    # ---- adapters --------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, autocast_adapter_dtype: bool = True) -> None:
        """Add an adapter; it is not activated (call ``set_adapter``)."""
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _name_of(self.get_base_model())
        self._tuner.add_adapter(adapter_name, peft_config, autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate an adapter. As in peft, a LoRA adapter activated this way trains (its weights
        require grad) unless ``inference_mode=True``; the others are frozen."""
        self._tuner.set_adapter(adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self._tuner.delete_adapter(adapter_name)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model is exactly the base model; merges are restored after."""
        with self._tuner.disabled():
            yield

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        self._lora_only("merge_adapter").merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self._lora_only("unmerge_adapter").unmerge_adapter()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Fold the active adapter(s) into the weights and return the plain transformers model."""
        return self._lora_only("merge_and_unload").merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove the adapter layers (unmerging first) and return the base transformers model."""
        return self._lora_only("unload").unload()

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None) -> None:
        self._lora_only("add_weighted_adapter").add_weighted_adapter(
            adapters, weights, adapter_name, combination_type=combination_type, svd_rank=svd_rank)

    def _lora_only(self, what: str) -> LoraModel:
        if not isinstance(self._tuner, LoraModel):
            raise ConfigError(f"{what} is for LoRA adapters; this model has a {self.peft_type} adapter")
        return self._tuner

    # ---- files -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True,
                        selected_adapters: Sequence[str] | None = None, is_main_process: bool = True,
                        state_dict: Mapping[str, torch.Tensor] | None = None, **_: Any) -> None:
        """Write each adapter in peft's layout: ``default`` at the root, others in sub-folders.

        ``state_dict`` (as peft's): this model's full state dict to take the adapter's tensors
        from instead of its modules, as FSDP and DeepSpeed ZeRO-3 gather it from their shards.
        """
        if not is_main_process:
            return
        if not safe_serialization:
            warnings.warn("adaptune writes safetensors only; safe_serialization=False is ignored", stacklevel=2)
        root = Path(save_directory)
        if root.exists() and not root.is_dir():
            raise AdapterFileError(f"{root}: exists and is not a folder")
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        for name in names:
            if name not in self.peft_config:
                raise ConfigError(f"no adapter named {name!r}; adapters: {list(self.peft_config)}")
            folder = root if name == "default" else root / name
            folder.mkdir(parents=True, exist_ok=True)
            tensors, config = self._tuner.adapter_state_for_disk(name, state_dict)
            write_adapter_tensors(folder, tensors)
            config.save_pretrained(folder)
            write_model_card(folder, config)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        allow_pickle: bool = False, subfolder: str | None = None,
                        autocast_adapter_dtype: bool = True, **_: Any) -> PeftModel:
        """Load a saved adapter onto ``model``: eval mode and frozen unless ``is_trainable``."""
        folder = resolve_adapter_folder(model_id, subfolder)
        config = config or PeftConfig.from_pretrained(folder)
        config = _tuner_class(config).prepare_loaded_config(config, is_trainable)
        _warn_if_other_base(model, config, folder)
        target_cls = cls if cls is not PeftModel else MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
        peft_model = target_cls(model, config, adapter_name, autocast_adapter_dtype)
        peft_model._load_weights(folder, adapter_name, allow_pickle, is_trainable)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | Path, adapter_name: str, is_trainable: bool = False,
                     allow_pickle: bool = False, subfolder: str | None = None,
                     autocast_adapter_dtype: bool = True, **_: Any) -> None:
        """Add a saved adapter under ``adapter_name`` (not activated), or reload an existing one."""
        folder = resolve_adapter_folder(model_id, subfolder)
        config = PeftConfig.from_pretrained(folder)
        config = _tuner_class(config).prepare_loaded_config(config, is_trainable)
        _warn_if_other_base(self.get_base_model(), config, folder)
        if adapter_name not in self.peft_config:
            self.add_adapter(adapter_name, config, autocast_adapter_dtype)
        self._load_weights(folder, adapter_name, allow_pickle, is_trainable)

    def _load_weights(self, folder: Path, adapter_name: str, allow_pickle: bool, is_trainable: bool = False) -> None:
        tensors = read_adapter_tensors(folder, allow_pickle=allow_pickle)
        self._tuner.load_adapter_state(adapter_name, tensors, str(folder), is_trainable)


def _install_trainer_hooks() -> None:
    """Let a plain ``transformers.Trainer`` checkpoint adaptune models as adapter folders
    (:mod:`adaptune.training.checkpoints`); nothing happens until transformers' trainer is loaded."""
    import sys

    if "transformers.trainer" in sys.modules:
        from .training.checkpoints import install_transformers_trainer_hooks

        install_transformers_trainer_hooks()


def _warn_if_other_base(model: nn.Module, config: PeftConfig, folder: Path) -> None:
    saved, current = config.base_model_name_or_path, _name_of(model)
    if saved and current and Path(str(saved)).name != Path(str(current)).name:
        warnings.warn(f"{folder}: adapter was trained on {saved!r} but is being loaded onto {current!r}",
                      stacklevel=3)


class PeftModelForCausalLM(PeftModel):
    """Causal language modelling (``AutoModelForCausalLM`` bases)."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                adapter_names: Sequence[str] | None = None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, adapter_names=adapter_names, **kwargs)


class PeftModelForSequenceClassification(PeftModel):
    """Sequence classification; the classifier head trains in full and is saved with the adapter."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                adapter_names: Sequence[str] | None = None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, adapter_names=adapter_names, **kwargs)


class PeftModelForTokenClassification(PeftModelForSequenceClassification):
    """Token classification; the classifier head trains in full and is saved with the adapter."""


class PeftModelForSeq2SeqLM(PeftModel):
    """Encoder-decoder generation (``AutoModelForSeq2SeqLM`` bases)."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, labels=None, adapter_names: Sequence[str] | None = None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                               labels=labels, adapter_names=adapter_names, **kwargs)


class PeftModelForQuestionAnswering(PeftModel):
    """Extractive QA; the qa_outputs head trains in full and is saved with the adapter."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, start_positions=None,
                end_positions=None, adapter_names: Sequence[str] | None = None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               start_positions=start_positions, end_positions=end_positions,
                               adapter_names=adapter_names, **kwargs)


class PeftModelForFeatureExtraction(PeftModel):
    """Embeddings / hidden states (``AutoModel`` bases)."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None,
                adapter_names: Sequence[str] | None = None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               adapter_names=adapter_names, **kwargs)


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[TaskType | None, type[PeftModel]] = {
    TaskType.CAUSAL_LM: PeftModelForCausalLM,
    TaskType.SEQ_CLS: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS: PeftModelForTokenClassification,
    TaskType.SEQ_2_SEQ_LM: PeftModelForSeq2SeqLM,
    TaskType.QUESTION_ANS: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION: PeftModelForFeatureExtraction,
}


def get_peft_model_state_dict(model: PeftModel, state_dict: Mapping[str, torch.Tensor] | None = None,
                              adapter_name: str = "default", **_: Any) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors under the keys its file holds (peft's function of this name)."""
    return model._tuner.adapter_state_for_disk(adapter_name, state_dict)[0]


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: Mapping[str, torch.Tensor],
                              adapter_name: str = "default", **_: Any) -> None:
    """Load tensors keyed as :func:`get_peft_model_state_dict` returns them into adapter ``adapter_name``
    (which must exist); a missing or misshapen tensor raises ``AdapterFileError``."""
    if adapter_name not in model.peft_config:
        raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {list(model.peft_config)}")
    model._tuner.load_adapter_state(adapter_name, peft_model_state_dict, "the given state dict")


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True, **_: Any) -> PeftModel:
    """Wrap ``model`` with a new adapter; only the adapter (and heads to save) will train.
    ``autocast_adapter_dtype`` (peft's): fp32 adapter weights on an fp16/bf16 model."""
    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(peft_config.task_type, PeftModel)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype)
