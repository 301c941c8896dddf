"""Data larger than memory: rows read, tokenized and packed on the fly, one window at a time.

The stream is cut into windows of ``window`` rows (lines of a text file). Window ``w`` takes its
rows from the sources in the shares of their weights (drawn with ``seed`` and ``w``), tokenizes
them, packs them, and shuffles the blocks with ``seed`` and ``w``. A source that ends starts
again (its next pass); the stream never ends, so a run is as long as ``max_steps`` says.

Everything about window ``w`` follows from the seed and where each source stood when it began, so
a :class:`StreamPosition` (window, blocks of it already given, each source's row and pass) is
enough to give the same blocks again from any point: a resumed run reads the rows before that
point without tokenizing them, rebuilds the window it stopped in, and goes on at the exact block.

The first rows of each source are held out for validation and never trained on, in any pass.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError
from .collate import as_feature
from .files import json_rows, read_text
from .formats import (
    DETECT_ROWS,
    Ctx,
    check_chat_tokenizer,
    check_options,
    detect_rows,
    examples_from_rows,
    make_ctx,
    text_examples,
)
from .packing import pack_examples
from .records import IGNORE_INDEX, DataReport, Example
from .sources import JSON, TEXT, DataSource, check_columns, dataset_rows, jsonl_rows, rename_columns, text_lines

STREAM_WINDOW = 1000
KEPT_WINDOW_STARTS = 256  # window starts remembered for positions (the trainer reads a batch or two ahead)


@dataclass
class StreamPosition:
    """Where a stream stands: at block ``offset`` of window ``window`` (block ``block`` of the
    stream); each source had read ``rows[i]`` rows of its pass ``passes[i]`` when the window began."""

    window: int = 0
    offset: int = 0
    block: int = 0
    rows: list[int] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)


def source_rows(source: DataSource, start: int = 0) -> Iterator[tuple[int, Any]]:
    """(number, row) of a source from its ``start``-th row on, read lazily (a ``.json`` array file
    is parsed whole: use JSON lines for data larger than memory)."""
    if source.kind == TEXT:
        return text_lines(source, start)
    if source.kind == JSON and Path(source.path).suffix.lower() != ".json":
        return jsonl_rows(source, start)
    if source.kind == JSON:
        path = Path(source.path).expanduser()
        rows = json_rows(path, read_text(path), DataReport(source.path))
        return iter([(n, rename_columns(r, source.columns)) for n, r in rows[start:]])
    return dataset_rows(source, start, streaming=True)


class _SourceStream:
    """One source's training rows, pass after pass, skipping the held-out rows in each pass."""

    def __init__(self, source: DataSource, held_out: int, row: int, passes: int):
        self.source, self.held_out, self.row, self.passes = source, held_out, row, passes
        self.rows_in_pass: int | None = None  # known once a pass has been read to its end
        self.rows_since_kept = 0
        self._it = source_rows(source, held_out + row)

    def take(self, n: int) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        while len(out) < n:
            item = next(self._it, None)
            if item is None:
                if self.row == 0:
                    raise DataError(f"{self.source.path}: no rows left to train on after the {self.held_out} "
                                    "held out for validation")
                self.rows_in_pass, self.row, self.passes = self.row, 0, self.passes + 1
                self._it = source_rows(self.source, self.held_out)
                continue
            out.append(item)
            self.row += 1
        return out


class StreamedDataset(torch.utils.data.IterableDataset):
    """Training blocks read, tokenized and packed on the fly (see the module docstring); a torch
    ``IterableDataset`` that ``transformers.Trainer`` takes with ``max_steps``.

    :meth:`position_at` gives the position of any block the trainer may have consumed (the
    trainer reads ahead); :meth:`resume` makes the next iteration start there.
    """

    def __init__(self, sources: list[DataSource], formats: list[str], tokenizer: Any, max_length: int,
                 packing: bool, seed: int, window: int = STREAM_WINDOW, train_on_prompt: bool = False,
                 overlong: str = "truncate", held_out: int = 0):
        super().__init__()
        self.sources, self.formats, self.seed, self.window = sources, formats, seed, window
        self.max_length, self.packing, self.held_out = max_length, packing, held_out
        weights = [s.weight for s in sources]
        self.weights = None if weights[0] is None else weights
        self.reports = [DataReport(s.path, fmt=f, name=s.name, line_unit=s.line_unit)
                        for s, f in zip(sources, formats)]
        self.ctxs = [make_ctx(tokenizer, max_length, train_on_prompt, overlong, r) for r in self.reports]
        self.position = StreamPosition(rows=[0] * len(sources), passes=[0] * len(sources))
        self._starts: list[StreamPosition] = []

    # ---- positions ------------------------------------------------------------------------------

    def identity(self) -> dict:
        """What must match for a saved position to mean the same blocks."""
        return {"seed": self.seed, "window": self.window, "held_out": self.held_out, "packing": self.packing,
                "max_length": self.max_length, "sources": [s.name for s in self.sources],
                "formats": self.formats, "weights": self.weights}

    def position_at(self, block: int) -> dict:
        """The saved form of the position just before stream block ``block`` (of the last iteration)."""
        starts = [s for s in self._starts if s.block <= block]
        start = starts[-1] if starts else StreamPosition(rows=[0] * len(self.sources),
                                                          passes=[0] * len(self.sources))
        if not starts and block:
            raise ValueError(f"block {block} is before the stream positions kept")
        position = StreamPosition(start.window, block - start.block, block, list(start.rows), list(start.passes))
        return {"position": asdict(position), **self.identity()}

    def resume(self, saved: dict) -> StreamPosition:
        """Start the next iteration at a position :meth:`position_at` gave; ConfigError when it was
        saved for other data or settings (the blocks would not be the same)."""
        mine = self.identity()
        changed = [k for k in mine if saved.get(k) != mine[k]]
        if changed:
            raise ConfigError(f"the checkpoint's stream position was saved with other {', '.join(changed)}; "
                              "resume with the same data options, or train into a new --output")
        self.position = StreamPosition(**saved["position"])
        return self.position

    # ---- the stream -----------------------------------------------------------------------------

    def _counts(self, window: int) -> list[int]:
        """Rows each source gives window ``window``: its weight's share, drawn with the seed."""
        if len(self.sources) == 1:
            return [self.window]
        rng = random.Random(f"{self.seed}:stream-mix:{window}")
        drawn = Counter(rng.choices(range(len(self.sources)), weights=self.weights, k=self.window))
        return [drawn[i] for i in range(len(self.sources))]

    def _examples(self, i: int, rows: list[tuple[int, Any]], stream: _SourceStream) -> list[Example]:
        ctx, report = self.ctxs[i], self.reports[i]
        report.rows_read += len(rows)
        if self.formats[i] == "text" and self.sources[i].kind == TEXT:
            examples = text_examples("\n".join(line for _, line in rows), ctx, rows[0][0]) if rows else []
        else:
            examples = examples_from_rows(rows, self.formats[i], ctx)
        _count(examples, report)
        stream.rows_since_kept = 0 if examples else stream.rows_since_kept + len(rows)
        if stream.rows_in_pass is not None and stream.rows_since_kept > stream.rows_in_pass:
            why = f": {report.skipped_text()}" if report.skipped else ""
            raise DataError(f"{self.sources[i].path}: no usable rows in a whole pass over it{why}")
        return examples

    def _window(self, window: int, streams: list[_SourceStream]) -> list[dict]:
        examples: list[Example] = []
        for i, (stream, count) in enumerate(zip(streams, self._counts(window))):
            if count:
                examples += self._examples(i, stream.take(count), stream)
        features = pack_examples(examples, self.max_length) if self.packing else [as_feature(e) for e in examples]
        random.Random(f"{self.seed}:stream:{window}").shuffle(features)
        return features

    def __iter__(self) -> Iterator[dict]:
        pos = copy.deepcopy(self.position)
        streams = [_SourceStream(s, self.held_out, r, p) for s, r, p in zip(self.sources, pos.rows, pos.passes)]
        self._starts = []
        while True:
            start = StreamPosition(pos.window, 0, pos.block - pos.offset, [s.row for s in streams],
                                   [s.passes for s in streams])
            features = self._window(pos.window, streams)
            self._starts = [*self._starts[-KEPT_WINDOW_STARTS + 1:], start]
            for feature in features[pos.offset:]:
                pos.block += 1
                yield feature
            pos.window, pos.offset = pos.window + 1, 0

    def summary(self) -> str:
        """What the stream has read so far, per source."""
        return "\n".join(r.summary() for r in self.reports)


def _count(examples: list[Example], report: DataReport) -> None:
    report.examples_kept += len(examples)
    report.tokens += sum(len(e) for e in examples)
    report.trained_tokens += sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples)


def _detect(source: DataSource, tokenizer: Any) -> str:
    """The source's format, from its first rows (and its columns checked on them)."""
    if source.kind == TEXT:
        return "text"
    head = list(islice(source_rows(source), DETECT_ROWS))
    if not head:
        raise DataError(f"{source.path}: has no rows")
    if source.columns:
        check_columns(source, [r for _, r in head])
    fmt = source.fmt or detect_rows(source.path, head)
    check_chat_tokenizer(source.path, fmt, tokenizer)
    return fmt


def _held_out_examples(source: DataSource, fmt: str, rows: int, ctx: Ctx) -> list[Example]:
    head = list(islice(source_rows(source), rows))
    ctx.report.rows_read = len(head)
    if source.kind == TEXT and fmt == "text":
        return text_examples("\n".join(line for _, line in head), ctx, 1) if head else []
    return examples_from_rows(head, fmt, ctx)


def build_streaming(sources: list[DataSource], tokenizer: Any, max_length: int, packing: bool, seed: int,
                    val_fraction: float = 0.0, window: int = STREAM_WINDOW, train_on_prompt: bool = False,
                    overlong: str = "truncate") -> tuple[StreamedDataset, list[dict], str]:
    """The training stream, the validation features (the first ``round(val_fraction * window)``
    rows of each source, at least one when ``val_fraction > 0``), and a line saying what it is."""
    if not isinstance(window, int) or window < 1:
        raise ConfigError(f"the stream window must be a positive number of rows, got {window!r}")
    formats = []
    for source in sources:
        check_options(max_length, source.fmt, overlong)
        formats.append(_detect(source, tokenizer))
    held_out = max(1, round(val_fraction * window)) if val_fraction > 0 else 0
    dataset = StreamedDataset(sources, formats, tokenizer, max_length, packing, seed, window, train_on_prompt,
                              overlong, held_out)
    val: list[Example] = []
    for source, fmt in zip(sources, formats):
        ctx = make_ctx(tokenizer, max_length, train_on_prompt, overlong, DataReport(source.path, name=source.name))
        val += _held_out_examples(source, fmt, held_out, ctx) if held_out else []
    val_features = pack_examples(val, max_length) if packing else [as_feature(e) for e in val]
    names = ", ".join(f"{s.name} ({f}{f', weight {s.weight:g}' if s.weight else ''})"
                      for s, f in zip(sources, formats))
    line = (f"streaming {names}: windows of {window:,} rows shuffled with seed {seed}; "
            f"the first {held_out:,} rows of each source held out for validation ({len(val):,} examples)")
    return dataset, val_features, line
