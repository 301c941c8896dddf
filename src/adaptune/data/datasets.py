"""The one call from data to training and validation features: load (through the tokenization cache
if asked), split (before packing, so validation never shares a row with training), mix, pack."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .cache import cached_examples
from .collate import as_feature
from .formats import check_options, load_examples
from .mixture import mix
from .packing import pack_examples
from .records import DataReport, Example, MixtureReport
from .sources import DataSource, parse_sources


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


def _source_examples(source: DataSource, tokenizer: Any, max_length: int, train_on_prompt: bool, overlong: str,
                     cache_dir: str | Path | None, cache: bool) -> tuple[list[Example], DataReport]:
    if cache:
        return cached_examples(source, tokenizer, max_length, train_on_prompt, overlong, cache_dir)
    return load_examples(source, tokenizer, max_length, train_on_prompt=train_on_prompt, overlong=overlong)


def build_datasets(path: Any, tokenizer: Any, max_length: int = 256, packing: bool = True,
                   val_fraction: float = 0.05, seed: int = 0, fmt: str | None = None,
                   train_on_prompt: bool = False, max_examples: int | None = None,
                   overlong: str = "truncate", columns: str | dict | None = None, split: str | None = None,
                   config: str | None = None, cache: bool = False, cache_dir: str | Path | None = None,
                   ) -> tuple[list[dict], list[dict], DataReport | MixtureReport]:
    """Load, split train/val (before packing: val never shares a block with train), pack each
    side if asked, and return feature lists for ``DataCollator(packing=packing)``.

    ``path`` is one source (a file, ``save_to_disk`` folder or hub id; ``fmt``, ``columns``,
    ``split`` and ``config`` say how to read it) or a list of sources (paths, :class:`DataSource`
    or mappings with ``path``, ``weight``, ``format``, ``columns``, ``split``, ``config``) to mix:
    each source is split on its own, and the training parts are mixed by weight (:mod:`.mixture`);
    the report is then a :class:`MixtureReport`. ``max_examples`` keeps the first N examples of
    each source before the split. ``cache=True`` reads and writes tokens through the
    tokenization cache (:mod:`.cache`) in ``cache_dir``.
    """
    sources = path if isinstance(path, DataSource) else parse_sources(path, fmt, columns, split, config)
    sources = [sources] if isinstance(sources, DataSource) else sources
    trains, vals, reports = [], [], []
    for source in sources:
        check_options(max_length, source.fmt, overlong)
        examples, report = _source_examples(source, tokenizer, max_length, train_on_prompt, overlong, cache_dir, cache)
        if max_examples is not None and max_examples < len(examples):
            examples = examples[:max(int(max_examples), 1)]
            report.limited_to = len(examples)
        train, val = split_validation(examples, val_fraction=val_fraction, seed=seed)
        report.train_examples, report.val_examples = len(train), len(val)
        trains.append(train)
        vals.append(val)
        reports.append(report)
    if len(sources) == 1:
        train, val, report = trains[0], vals[0], reports[0]
    else:
        weights = [s.weight for s in sources] if sources[0].weight is not None else None
        train, gave = mix(trains, weights, seed)
        val = [e for part in vals for e in part]
        report = MixtureReport(reports, [len(t) for t in trains], gave, weights)
    if packing:
        train_features, val_features = (pack_examples(part, max_length) for part in (train, val))
    else:
        train_features, val_features = ([as_feature(e) for e in part] for part in (train, val))
    report.train_examples, report.val_examples = len(train), len(val)
    report.train_blocks = len(train_features)
    return train_features, val_features, report
