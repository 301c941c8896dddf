"""Training checkpoints: adapters saved as peft's folder, resumed from, and chosen when resuming.

transformers recognises peft's own ``PeftModel`` by its type and writes any other model as one full
state dict (``model.safetensors``). For adaptune's ``PeftModel`` that would be the whole base model
in every checkpoint, in a folder ``PeftModel.from_pretrained`` cannot read. ``adaptune.Trainer``
overrides the three methods involved; a plain ``transformers.Trainer`` given an adaptune model gets
the same behaviour from :func:`install_transformers_trainer_hooks`, which wraps those methods once,
for adaptune models only (every other model goes to transformers' own code unchanged).

P-tuning's MLP/LSTM (and a projected prefix) is not part of peft's file, which holds only its
output; checkpoints also keep the encoder network (``prompt_encoder_state.safetensors``) so that
a resumed run continues the same network with its optimizer state.

:func:`last_complete_checkpoint` is the one place that decides which ``checkpoint-N`` a resume
starts from: the newest one whose files were written completely and read back.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers.utils import logging as hf_logging

from ..atomic import atomic_save_safetensors, atomic_write_text
from ..wrappers import active_adapter_name, active_config, adapter_base

logger = hf_logging.get_logger(__name__)

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ENCODER_STATE = "prompt_encoder_state.safetensors"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint"

__all__ = ["ENCODER_STATE", "adapter_folder", "finished_state", "install_transformers_trainer_hooks",
           "last_complete_checkpoint", "load_adapter_checkpoint", "logged_train_loss", "save_adapter_checkpoint"]


# ---- saving and loading adapters ------------------------------------------------------------------


def adapter_folder(checkpoint: str | os.PathLike, adapter_name: str) -> Path | None:
    """Where ``save_pretrained`` put ``adapter_name`` in a checkpoint (peft's layout), if it is there."""
    folder = Path(checkpoint) if adapter_name == "default" else Path(checkpoint) / adapter_name
    return folder if any((folder / f).is_file() for f in ADAPTER_FILES) else None


def _adapter_model(trainer: Any, model: Any = None) -> Any | None:
    """The adapter model inside ``model`` (default: the trainer's), or None."""
    model = trainer.accelerator.unwrap_model(model if model is not None else trainer.model)
    return model if adapter_base(model) is not None else None


def trains_encoder_network(model: Any) -> bool:
    """Whether the adapter trains a network (P-tuning's MLP/LSTM, a projected prefix) whose output
    alone is the peft file."""
    from ..config import PromptEncoderConfig

    config = active_config(model)
    return isinstance(config, PromptEncoderConfig) or bool(getattr(config, "prefix_projection", False))


def save_adapter_checkpoint(trainer: Any, output_dir: str | None, state_dict: dict | None) -> bool:
    """Write the trainer's adapter as peft's folder; False (nothing written) when the model is not an
    adapter model or its weights are sharded and were not gathered into ``state_dict``.

    Under FSDP (full state dict) and DeepSpeed ZeRO-3, transformers passes the weights gathered from
    all processes as ``state_dict``; the adapter's tensors are taken from it."""
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
    if trains_encoder_network(model):
        from ..tuners.files import disk_tensors

        encoder = model.prompt_encoder[active_adapter_name(model)]
        atomic_save_safetensors(disk_tensors(encoder.state_dict()), Path(output_dir) / ENCODER_STATE)
    return True


def load_adapter_checkpoint(trainer: Any, checkpoint: str | None, model: Any = None) -> bool:
    """Load the active adapter's weights from ``checkpoint`` into the model (trainable); False when
    there is no adapter model, its weights are sharded (transformers' loaders), or no adapter file."""
    if checkpoint is None or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return False
    model = _adapter_model(trainer, model)
    if model is None:
        return False
    name = active_adapter_name(model)
    encoder_state = Path(checkpoint) / ENCODER_STATE
    if trains_encoder_network(model) and encoder_state.is_file():
        from safetensors.torch import load_file

        model.prompt_encoder[name].load_state_dict(load_file(str(encoder_state)), strict=True)
        return True
    folder = adapter_folder(checkpoint, name)
    if folder is None:
        return False
    model.load_adapter(str(folder), adapter_name=name, is_trainable=True)
    return True


def install_transformers_trainer_hooks() -> None:
    """Make a plain ``transformers.Trainer`` save and load adaptune models as adapter folders (see
    the module docstring). Does nothing until transformers' trainer module is loaded; runs once."""
    module = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None or trainer_cls.__dict__.get("_adaptune_checkpoints"):
        return

    def ours(trainer: Any) -> bool:
        return bool(getattr(trainer.accelerator.unwrap_model(trainer.model), "_adaptune_adapter_model", False))

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


# ---- which checkpoint to resume from --------------------------------------------------------------


def last_complete_checkpoint(output_dir: str | os.PathLike, say: Callable[[str], None] | None = None,
                             require: tuple[str, ...] = ()) -> str | None:
    """The newest ``checkpoint-N`` in ``output_dir`` that was written completely and reads back.

    Complete: its ``trainer_state.json`` (which transformers writes last) reads whole, it holds a
    weights file, ``optimizer.pt`` and ``scheduler.pt``, and every file's header or checksum reads
    (safetensors headers, torch zip checksums; nothing is unpickled). transformers' own
    ``get_last_checkpoint`` takes the newest folder even if a kill interrupted its writing. Each
    checkpoint skipped is reported through ``say`` (default: a warning in the log).
    """
    say = say or logger.warning
    root = Path(output_dir)
    if not root.is_dir():
        return None
    steps = []
    for child in root.iterdir():
        prefix, _, number = child.name.partition("-")
        if prefix == CHECKPOINT_PREFIX and number.isdigit() and child.is_dir():
            steps.append((int(number), child))
    for _, folder in sorted(steps, reverse=True):
        try:
            json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            say(f"skipping {folder}: it was not completely written")
            continue
        problem = checkpoint_problem(folder, require)
        if problem is None:
            return str(folder)
        say(f"skipping {folder}: {problem}")
    return None


def checkpoint_problem(folder: Path, require: tuple[str, ...] = ()) -> str | None:
    """Why a checkpoint's files cannot be resumed from, or None. Reads headers and zip checksums only."""
    from safetensors import safe_open

    names = {p.name for p in folder.iterdir()}
    weights = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
    if not names & set(weights):  # e.g. a kill while transformers deleted an old checkpoint
        return "it holds no weights file (adapter_model.safetensors or model.safetensors)"
    for required in ("optimizer.pt", "scheduler.pt", *require):
        if required not in names:
            return f"it has no {required}"
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):  # a temporary file a kill left: not part of the checkpoint
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            elif path.suffix in (".pt", ".pth"):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    return f"{path.name} is corrupt (bad checksum in {bad})"
        except zipfile.BadZipFile as exc:
            return f"{path.name} is not a whole torch archive ({exc})"
        except Exception as exc:  # noqa: BLE001 - safetensors / OS errors: the file is unusable
            return f"{path.name} cannot be read ({(str(exc).splitlines() or [type(exc).__name__])[0]})"
    return None


def finished_state(checkpoint: str, max_steps: int, epochs: float) -> dict | None:
    """The checkpoint's trainer state if training (``max_steps``, or ``epochs`` when that is 0) was
    complete there, else None."""
    try:
        state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text(encoding="utf-8"))
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if max_steps > 0:
        target = max_steps
    elif state.get("num_train_epochs") in (epochs, math.ceil(epochs)):
        target = int(state.get("max_steps") or 0)
    else:
        return None
    return state if 0 < target <= step else None


def logged_train_loss(state: dict) -> float | None:
    """The mean logged training loss of a finished run's trainer state."""
    history = state.get("log_history") or []
    for record in reversed(history):
        if isinstance(record.get("train_loss"), (int, float)):
            return float(record["train_loss"])
    losses = [r["loss"] for r in history if isinstance(r.get("loss"), (int, float))]
    return sum(losses) / len(losses) if losses else None
