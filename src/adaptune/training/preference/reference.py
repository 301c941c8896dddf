"""The reference model without a second model, and its log-probabilities computed once.

The reference is one of:

- ``"base"``: the model with its adapter disabled (a new adapter: the policy starts as the base);
- ``"adapter"``: a frozen copy of the adapter's starting weights, swapped in while the reference
  runs (continuing an SFT adapter: the adapter is the starting point). Only the adapter's tensors
  are copied, never the base;
- ``"model"``: a separate reference model the caller passed (TRL's ``ref_model``);
- ``"initial"``: the model itself before its first step (full fine-tuning): every reference value
  must then be computed before training starts.

Reference log-probabilities are fixed, so each example's are computed once, on first use or in one
pass before training, and kept in a :class:`ReferenceCache` keyed by example index. The cache is
written into every checkpoint (``reference_logps.safetensors``, with a fingerprint of the data and
the reference), so a resumed run reads the numbers the interrupted one used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ...errors import ConfigError

REFERENCE_FILE = "reference_logps.safetensors"
KINDS = ("base", "adapter", "model", "initial")

__all__ = ["KINDS", "REFERENCE_FILE", "Reference", "ReferenceCache", "fingerprint"]


class Reference:
    """How to run the reference (module docstring); ``active()`` yields the module to call."""

    def __init__(self, model: torch.nn.Module, kind: str, ref_model: torch.nn.Module | None = None) -> None:
        if kind not in KINDS:
            raise ConfigError(f"reference must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind == "base" and not hasattr(model, "disable_adapter"):
            raise ConfigError("reference='base' disables the adapter, but this model has none")
        if kind == "model" and ref_model is None:
            raise ConfigError("reference='model' needs ref_model")
        self.kind = kind
        self.ref_model = ref_model
        self.snapshot: dict[str, torch.Tensor] = {}
        if kind == "adapter":
            self.snapshot = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            if not self.snapshot:
                raise ConfigError("reference='adapter' copies the trainable adapter, but nothing is trainable")

    @property
    def fixed_at_start(self) -> bool:
        """Whether the reference only exists before training (every value must be computed first)."""
        return self.kind == "initial"

    def describe(self) -> str:
        return {"base": "the base model (adapter disabled)", "adapter": "a frozen copy of the starting adapter",
                "model": "the reference model given", "initial": "the model before training"}[self.kind]

    @contextmanager
    def active(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Within the block, the module to call is the reference (in eval mode: it is deterministic)."""
        target = self.ref_model if self.kind == "model" else model
        was_training = target.training
        target.eval()
        try:
            if self.kind == "base":
                with model.disable_adapter():
                    yield model
            elif self.kind == "adapter":
                with self._swapped(model):
                    yield model
            else:
                yield target
        finally:
            target.train(was_training)

    @contextmanager
    def _swapped(self, model: torch.nn.Module) -> Iterator[None]:
        params = dict(model.named_parameters())
        current = {n: params[n].detach().clone() for n in self.snapshot}
        with torch.no_grad():
            for n, value in self.snapshot.items():
                params[n].copy_(value)
            try:
                yield
            finally:
                for n, value in current.items():
                    params[n].copy_(value)


class ReferenceCache:
    """Reference values (``width`` per example, NaN = not computed yet) by example index."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.values = torch.full((0, width), float("nan"))

    def _grow(self, size: int) -> None:
        if size > self.values.shape[0]:
            more = torch.full((size - self.values.shape[0], self.width), float("nan"))
            self.values = torch.cat([self.values, more])

    def has(self, index: torch.Tensor) -> bool:
        index = index.cpu()
        if index.numel() == 0:
            return True
        if int(index.max()) >= self.values.shape[0]:
            return False
        return not bool(self.values[index].isnan().all(dim=1).any())

    def get(self, index: torch.Tensor) -> torch.Tensor:
        return self.values[index.cpu()]

    def put(self, index: torch.Tensor, values: torch.Tensor) -> None:
        index = index.cpu()
        self._grow(int(index.max()) + 1)
        self.values[index] = values.detach().float().cpu().reshape(len(index), self.width)

    def known(self) -> int:
        return int((~self.values.isnan().all(dim=1)).sum())

    def save(self, folder: str | Path, fingerprint: str) -> None:
        from ...atomic import atomic_save_safetensors

        atomic_save_safetensors({"values": self.values.contiguous()}, Path(folder) / REFERENCE_FILE,
                                metadata={"fingerprint": fingerprint})

    def load(self, folder: str | Path, fingerprint: str) -> str | None:
        """Take the values saved in ``folder``; returns why not (None when loaded)."""
        from safetensors import safe_open

        path = Path(folder) / REFERENCE_FILE
        if not path.is_file():
            return f"{path.name} is not in {folder}"
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return "it was made for other data or another reference"
            values = f.get_tensor("values")
        if values.dim() != 2 or values.shape[1] != self.width:
            return f"it holds {tuple(values.shape)} values, not {self.width} per example"
        self.values = values.float()
        return None


def fingerprint(features: Iterable[dict], reference: str, objective: str) -> str:
    """A hash of the examples' token ids (in index order), the objective and the reference."""
    digest = hashlib.sha256(f"{objective}|{reference}".encode())
    for f in features:
        for key in ("index", "prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "KL_completion_ids"):
            if key in f:
                digest.update(f"{key}:{f[key]}".encode())
    return digest.hexdigest()
