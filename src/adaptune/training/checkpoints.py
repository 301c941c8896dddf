"""Adapter checkpoints through transformers' ``Trainer``: saved as peft's adapter folder, loaded back
on resume and by ``load_best_model_at_end``.

transformers recognises peft's own ``PeftModel`` by its type and writes any other model as one
full state dict (``model.safetensors``). For adaptune's ``PeftModel`` that would be the whole base
model in every checkpoint, in a folder ``PeftModel.from_pretrained`` cannot read: a peft script
that only changed its import line would lose its adapter files. ``adaptune.Trainer`` overrides the
three methods involved; a plain ``transformers.Trainer`` given an adaptune model gets the same
behaviour from :func:`teach_transformers_trainer`, which wraps those three methods once, for
adaptune models only, when an adaptune model is built or put in train mode while transformers'
trainer module is loaded (it is by then in any script that imports ``Trainer``). Every other
model goes to transformers' own code unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers.utils.peft_utils import ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME

__all__ = ["active_adapter", "adapter_base", "adapter_folder", "load_adapter_checkpoint",
           "save_adapter_checkpoint", "teach_transformers_trainer"]


def adapter_base(model: Any) -> torch.nn.Module | None:
    """The transformers model inside an adapter wrapper (adaptune's or peft's PeftModel), else None.

    Duck-typed (``peft_config`` + ``save_pretrained`` + ``get_base_model``) so that peft is never
    imported; a transformers model with adapters loaded through transformers' own integration is
    not a wrapper and is left to transformers.
    """
    import transformers

    if isinstance(model, transformers.PreTrainedModel):
        return None
    if hasattr(model, "peft_config") and callable(getattr(model, "save_pretrained", None)) \
            and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return None


def active_adapter(model: Any) -> str:
    name = getattr(model, "active_adapter", "default")
    return name[0] if isinstance(name, (list, tuple)) else name


def adapter_folder(checkpoint: str | os.PathLike, adapter_name: str) -> Path | None:
    """Where ``save_pretrained`` put ``adapter_name`` in a checkpoint (peft's layout), if it is there."""
    folder = Path(checkpoint) if adapter_name == "default" else Path(checkpoint) / adapter_name
    return folder if any((folder / f).is_file() for f in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)) else None


def _adapter_model(trainer: Any, model: Any = None) -> Any | None:
    """The adapter model inside ``model`` (default: the trainer's), or None."""
    model = trainer.accelerator.unwrap_model(model if model is not None else trainer.model)
    return model if adapter_base(model) is not None else None


def save_adapter_checkpoint(trainer: Any, output_dir: str | None, state_dict: dict | None) -> bool:
    """Write the trainer's adapter as peft's folder; False (nothing written) when the model is not an
    adapter model or its weights are sharded and were not gathered into ``state_dict``.

    Under FSDP (full state dict) and DeepSpeed ZeRO-3, transformers passes the weights gathered from
    all processes as ``state_dict``; the adapter's tensors are taken from it."""
    from ..atomic import atomic_write_text

    model = _adapter_model(trainer)
    if model is None or (not state_dict and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)):
        return False
    output_dir = output_dir if output_dir is not None else trainer.args.output_dir
    if not trainer.args.should_save:
        return True
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, state_dict=state_dict or None)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(output_dir)
    # JSON, not transformers' pickled training_args.bin: adaptune never unpickles.
    atomic_write_text(Path(output_dir) / "training_args.json", trainer.args.to_json_string())
    return True


def load_adapter_checkpoint(trainer: Any, checkpoint: str | None, model: Any = None) -> bool:
    """Load the active adapter's weights from ``checkpoint`` into the model (trainable); False when
    there is no adapter model, its weights are sharded (transformers' loaders), or no adapter file."""
    if checkpoint is None or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return False
    model = _adapter_model(trainer, model)
    if model is None:
        return False
    name = active_adapter(model)
    folder = adapter_folder(checkpoint, name)
    if folder is None:
        return False
    model.load_adapter(str(folder), adapter_name=name, is_trainable=True)
    return True


def teach_transformers_trainer() -> None:
    """Make a plain ``transformers.Trainer`` save and load adaptune models as adapter folders (see
    the module docstring). Does nothing until transformers' trainer module is loaded; runs once."""
    module = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None or trainer_cls.__dict__.get("_adaptune_checkpoints"):
        return
    from ..peft_model import PeftModel

    def ours(trainer: Any) -> bool:
        return isinstance(trainer.accelerator.unwrap_model(trainer.model), PeftModel)

    save, load, load_best = trainer_cls._save, trainer_cls._load_from_checkpoint, trainer_cls._load_best_model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not (ours(self) and save_adapter_checkpoint(self, output_dir, state_dict)):
            save(self, output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not (ours(self) and load_adapter_checkpoint(self, resume_from_checkpoint, model)):
            load(self, resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not (ours(self) and load_adapter_checkpoint(self, self.state.best_model_checkpoint)):
            load_best(self)

    trainer_cls._save, trainer_cls._load_from_checkpoint = _save, _load_from_checkpoint
    trainer_cls._load_best_model = _load_best_model
    trainer_cls._adaptune_checkpoints = True
