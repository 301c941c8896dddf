"""The one call from a data file to training and validation features: load, split (before packing,
so validation never shares a row with training), pack."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .collate import as_feature
from .formats import load_examples
from .packing import pack_examples
from .records import DataReport


def split_validation(examples: Sequence, val_fraction: float = 0.05, seed: int = 0,
                     min_val: int = 1) -> tuple[list, list]:
    """Deterministic disjoint (train, val) split; both keep the input order.

    At least ``min_val`` examples go to validation when ``val_fraction > 0``, and at least one
    stays for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(examples)
    if val_fraction == 0.0 or n < 2:
        return list(examples), []
    n_val = min(max(min_val, round(n * val_fraction)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    chosen = set(order[:n_val])
    train = [e for i, e in enumerate(examples) if i not in chosen]
    val = [examples[i] for i in sorted(chosen)]
    return train, val


def build_datasets(path: str | Path, tokenizer: Any, max_length: int = 256, packing: bool = True,
                   val_fraction: float = 0.05, seed: int = 0, fmt: str | None = None,
                   train_on_prompt: bool = False, max_examples: int | None = None,
                   overlong: str = "truncate") -> tuple[list[dict], list[dict], DataReport]:
    """Load, split train/val (before packing: val never shares a block with train), pack each
    side if asked, and return feature lists for ``DataCollator(packing=packing)``.

    ``max_examples`` keeps the first N examples (file order) before the split.
    """
    examples, report = load_examples(path, tokenizer, max_length, fmt=fmt,
                                     train_on_prompt=train_on_prompt, overlong=overlong)
    if max_examples is not None and max_examples < len(examples):
        examples = examples[:max(int(max_examples), 1)]
        report.limited_to = len(examples)
    train, val = split_validation(examples, val_fraction=val_fraction, seed=seed)
    if packing:
        train_features, val_features = (pack_examples(part, max_length) for part in (train, val))
    else:
        train_features, val_features = ([as_feature(e) for e in part] for part in (train, val))
    report.train_examples, report.val_examples = len(train), len(val)
    report.train_blocks = len(train_features)
    return train_features, val_features, report
