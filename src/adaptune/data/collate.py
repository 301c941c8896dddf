"""Batches for the Trainer: rows padded or packed into tensors, and the wrapper that makes tuple rows
and label-less causal-LM batches work with transformers' collators."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import ConfigError, DataError, warn_user
from .records import IGNORE_INDEX, Example


def as_feature(item: Example | dict) -> dict[str, list[int]]:
    """A feature dict of int lists from an Example or a dict (tensors allowed)."""
    if isinstance(item, Example):
        return {"input_ids": list(item.input_ids), "labels": list(item.labels)}
    out = {k: (v.tolist() if isinstance(v, torch.Tensor) else list(v)) for k, v in item.items()
           if k in ("input_ids", "labels", "position_ids")}
    out.setdefault("labels", list(out["input_ids"]))
    return out


def pad_token_id_for(tokenizer: Any) -> int:
    """The id to pad with: the pad token, else EOS (safe: padding labels are -100 and the
    collator never infers labels from the pad id, so real EOS tokens keep their loss)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ConfigError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")


class DataCollator:
    """Batches feature dicts (or Examples) into tensors for a causal LM.

    ``packing=True``: input_ids, labels, position_ids and *no* attention_mask, so transformers
    masks each packed example off from the others; rows are padded with ``pad_token_id``, labels
    -100 and position ids restarting at 0 (the padding is a sequence of its own). The model must
    run with ``use_cache=False`` for this (transformers.Trainer does).
    ``packing=False``: right padding to the longest row, attention_mask, labels -100 on padding.
    Pass ``pad_token_id_for(tokenizer)`` as the pad id (EOS when the tokenizer has no pad token).
    """

    def __init__(self, pad_token_id: int, packing: bool = True,
                 pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ConfigError("DataCollator needs a pad_token_id (use the EOS id if the tokenizer "
                              "has no pad token: data.pad_token_id_for(tokenizer))")
        self.pad_token_id = int(pad_token_id)
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of

    def _width(self, longest: int) -> int:
        m = self.pad_to_multiple_of
        return longest if not m else -(-longest // m) * m

    def __call__(self, features: Sequence[Example | dict]) -> dict[str, torch.Tensor]:
        rows = [as_feature(f) for f in features]
        width = self._width(max(len(r["input_ids"]) for r in rows))
        return self._packed(rows, width) if self.packing else self._padded(rows, width)

    def _packed(self, rows: list[dict], width: int) -> dict[str, torch.Tensor]:
        ids, labels, positions = [], [], []
        for r in rows:
            n, pad = len(r["input_ids"]), width - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad_token_id] * pad)
            labels.append(r["labels"] + [IGNORE_INDEX] * pad)
            positions.append(r.get("position_ids", list(range(n))) + list(range(pad)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "position_ids": torch.tensor(positions)}

    def _padded(self, rows: list[dict], width: int) -> dict[str, torch.Tensor]:
        if any("position_ids" in r for r in rows):
            raise ValueError("packed features need DataCollator(packing=True): an attention_mask "
                             "would let packed examples attend to each other")
        ids, labels, mask = [], [], []
        for r in rows:
            n, pad = len(r["input_ids"]), width - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad_token_id] * pad)
            labels.append(r["labels"] + [IGNORE_INDEX] * pad)
            mask.append([1] * n + [0] * pad)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(mask)}


_ROW_KEYS = ("input_ids", "attention_mask", "labels")


class LabelsAndTuplesCollator:
    """Wrap a data collator so tuple rows and label-less causal LM batches work.

    - ``rows_to_dicts``: rows that are tuples/lists (``TensorDataset(input_ids, attention_mask
      [, labels])``) become dicts before ``inner`` sees them; transformers' collators want dicts.
    - ``causal_lm``: a batch without ``labels`` gets ``labels = input_ids`` with padding
      (``attention_mask == 0``) set to -100, which is what a causal LM is trained on.

    Each fallback is announced once per collator (with an :class:`AdaptuneWarning`).
    """

    def __init__(self, inner: Callable, rows_to_dicts: bool = True, causal_lm: bool = True):
        self.inner = inner
        self.rows_to_dicts = rows_to_dicts
        self.causal_lm = causal_lm
        self._said: set[str] = set()

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            warn_user(message)

    def __call__(self, features: list) -> dict:
        if self.rows_to_dicts and features and isinstance(features[0], (tuple, list)):
            size = len(features[0])
            if not 1 <= size <= len(_ROW_KEYS):
                raise DataError(f"dataset rows are tuples of {size} items; adaptune reads tuples as "
                                f"({', '.join(_ROW_KEYS)}), so give rows of 1-3 items or dicts")
            self._say_once("rows", f"the dataset yields tuples, not dicts; adaptune reads each row as "
                                   f"({', '.join(_ROW_KEYS[:size])}), the order TensorDataset(...) was given")
            features = [dict(zip(_ROW_KEYS, row)) for row in features]
        batch = self.inner(features)
        if self.causal_lm and "labels" not in batch and isinstance(batch.get("input_ids"), torch.Tensor):
            self._say_once("labels", "the batches have no labels; adaptune trains the causal LM on input_ids "
                                     "(labels = input_ids, with padding set to -100)")
            labels = batch["input_ids"].clone()
            mask = batch.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                labels[mask == 0] = IGNORE_INDEX
            batch["labels"] = labels
        return batch
