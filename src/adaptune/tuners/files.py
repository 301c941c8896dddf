"""Adapter folders on disk, whatever the method: where one is, its tensors read and written safely,
and the checks every loaded tensor passes.

Loading never runs code from a file: ``.bin`` (pickle) adapters are read only when the caller opts
in, and then with ``torch.load(weights_only=True)``. Writing goes through :mod:`adaptune.atomic`.
The tensor names inside a file are each method's own business (``tuners/lora/files.py``,
``tuners/prompt/files.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..atomic import atomic_save_safetensors, atomic_write_text
from ..config import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, PeftConfig
from ..errors import AdapterFileError

TensorReader = Callable[[str, torch.Tensor], torch.Tensor]

# Module wrappers that nn.Module paths go through but state-dict names leave out: FSDP1's, activation
# checkpointing's, torch.compile's.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_path(path: str) -> str:
    """``path`` as a state dict names it: without the segments that module wrappers add."""
    for segment in _WRAPPER_SEGMENTS:
        path = path.replace(segment, "")
    return path


def tensor_reader(state_dict: Mapping[str, torch.Tensor] | None, prefix: str = "") -> TensorReader:
    """``read(path, own)``: a module's tensor ``own`` at ``path``, or, when ``state_dict`` is given,
    its entry ``prefix + path`` there.

    Under FSDP or DeepSpeed ZeRO-3 a module holds only this process's shard of each weight; the
    full tensors are in the state dict those engines gather (transformers' Trainer passes it to
    ``_save``). A name missing from it is an error, never a silent fall back to the shard.
    """
    if state_dict is None:
        return lambda path, own: own

    def read(path: str, own: torch.Tensor) -> torch.Tensor:
        key = prefix + clean_path(path)
        if key not in state_dict:
            raise AdapterFileError(f"the state_dict passed has no {key!r} (its first names: {list(state_dict)[:3]}); "
                                   f"pass the PeftModel's own state_dict, gathered whole")
        return state_dict[key]

    return read


def disk_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies to write. A sharded tensor (FSDP2's DTensor) holds only this
    process's part: it is refused with what to pass instead, never written as if it were whole."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        DTensor = ()
    sharded = [k for k, v in tensors.items() if isinstance(v, DTensor)]
    if sharded:
        raise AdapterFileError(
            f"{sharded[0]} is sharded over processes (FSDP2): save with state_dict=<the full state dict, "
            f"gathered on every process>, e.g. torch.distributed.checkpoint.state_dict.get_model_state_dict("
            f"model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))")
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def read_adapter_tensors(directory: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of an adapter folder; safetensors only unless ``allow_pickle``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st_path = directory / WEIGHTS_NAME
    bin_path = directory / PICKLE_WEIGHTS_NAME
    if st_path.is_file():
        try:
            return load_file(str(st_path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterFileError(f"{st_path}: not a readable safetensors file ({exc})") from None
    if bin_path.is_file():
        if not allow_pickle:
            raise AdapterFileError(
                f"{bin_path}: pickled adapter weights are not loaded by default, since unpickling can run "
                f"code. Convert it to safetensors, or pass allow_pickle=True (CLI: --allow-pickle), which reads it "
                f"with torch.load(weights_only=True)")
        try:
            data = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
            raise AdapterFileError(f"{bin_path}: cannot be read safely ({_unpickling_problem(exc)})") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise AdapterFileError(f"{bin_path}: expected a dict of tensors")
        return data
    raise AdapterFileError(f"{directory}: no {WEIGHTS_NAME} in this folder")


def _unpickling_problem(exc: Exception) -> str:
    """One line from torch.load's error. Its weights_only refusal is a page of text that ends by
    suggesting weights_only=False, which is exactly what must not be done with this file."""
    text = str(exc).strip()
    if text.startswith("Weights only load failed"):
        lines = [line.strip() for line in text.splitlines()[1:]
                 if line.strip() and not line.strip().startswith("Check the documentation")]
        detail = " ".join(lines).split("WeightsUnpickler error:", 1)[-1].strip()
        return f"torch.load(weights_only=True) refused it: {detail or 'it is not plain tensors'}"
    return (text.splitlines() or [type(exc).__name__])[0]


def write_adapter_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: (v.clone() if _shares_storage(v, tensors) else v) for k, v in tensors.items()}
    atomic_save_safetensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})


def _shares_storage(t: torch.Tensor, all_tensors: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for v in all_tensors.values() if v.untyped_storage().data_ptr() == ptr) > 1


def check_shape(module_name: str, key: str, expected: torch.Size, got: torch.Size) -> None:
    """AdapterFileError when a tensor read from a file has another shape than the model needs."""
    if tuple(expected) != tuple(got):
        raise AdapterFileError(
            f"{module_name}: adapter tensor {key} has shape {tuple(got)} but this base model needs "
            f"{tuple(expected)} (was the adapter trained on another base model or rank?)"
        )


def check_values(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """AdapterFileError for a tensor that is not floating point or holds NaN/inf: a file like that
    would load and then give garbage."""
    for key, value in tensors.items():
        if not value.dtype.is_floating_point:
            raise AdapterFileError(f"{source}: tensor {key} has dtype {value.dtype}, expected a float dtype")
        if not torch.isfinite(value).all():
            raise AdapterFileError(f"{source}: tensor {key} holds NaN or inf values")


def resolve_adapter_folder(model_id: str | Path, subfolder: str | None = None) -> Path:
    """A local adapter folder, or a hub id downloaded for users who have the internet."""
    path = Path(model_id)
    if path.is_dir():
        return path / subfolder if subfolder else path
    if path.exists() or str(model_id).startswith((".", "/", "~")) or str(model_id).count("/") > 1:
        raise AdapterFileError(f"{model_id}: no such adapter folder")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(model_id), allow_patterns=["*.json", "*.safetensors", "*.md"])
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, auth: all mean "not found"
        raise AdapterFileError(f"{model_id}: not a local folder and not downloadable ({type(exc).__name__})") from None
    return Path(local) / subfolder if subfolder else Path(local)


def write_model_card(folder: Path, config: PeftConfig) -> None:
    """A short README.md naming the base and how to load the adapter (kept if one is there)."""
    card = folder / "README.md"
    if card.exists():
        return  # the trainer writes a richer card (with the command); keep it
    lines = [
        "---", "library_name: adaptune", f"base_model: {config.base_model_name_or_path}", "tags: [peft, adaptune]",
        "---", "", f"# {config.peft_type} adapter", "",
        f"Base model: `{config.base_model_name_or_path}`. Task: `{config.task_type}`.",
        "", "Load with adaptune or peft:", "", "```python",
        "from adaptune import PeftModel  # or: from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, \"<this folder>\")", "```", "",
    ]
    atomic_write_text(card, "\n".join(lines))
