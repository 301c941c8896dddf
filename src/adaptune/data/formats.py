"""User data -> token examples for causal-LM fine-tuning.

Formats: plain text (split into blocks), and rows (JSON lines, table rows, dataset rows) of five
shapes, detected from the rows' keys: ``text``; ``prompt`` + ``completion``; chat ``messages``
(with ``tools`` and tool calls); ShareGPT ``conversations``; alpaca ``instruction`` (+ ``input``) +
``output``. Labels are ``-100`` wherever no loss is wanted (the prompt, the user, system and tool
turns, padding). Bad rows are counted by reason in a ``DataReport`` and never crash a run; a
source with nothing usable raises ``DataError`` naming it.

Packing puts several examples in one block with ``position_ids`` that restart at 0 for each
example and no ``attention_mask``: transformers (>= 4.56) then builds a block-diagonal causal mask
(``masking_utils.find_packed_sequence_indices``), so examples never see each other. It only does
so when the forward runs **without a KV cache** (``use_cache=False``; ``transformers.Trainer``
sets ``model.config.use_cache = args.use_cache``, False by default). See ``docs/data.md``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .chat import chat_example, checked_messages, is_unicode, row_tools, sharegpt_messages
from .files import json_rows, read_text
from .records import IGNORE_INDEX, BadRow, DataReport, Example
from .sources import JSON, TEXT, DataSource, check_columns, dataset_rows, rename_columns
from .tokens import bos_prefix, encode, encode_long, split_blocks, with_eos

FORMATS = ("text", "completion", "chat", "alpaca", "sharegpt")
CHAT_FORMATS = ("chat", "sharegpt")
OVERLONG = ("truncate", "drop")
DETECT_ROWS = 100        # object rows looked at to detect a file's format

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class Ctx:
    """Everything a row builder needs, resolved once per source."""

    tokenizer: Any
    max_length: int
    train_on_prompt: bool
    overlong: str
    bos: list[int]
    eos: int | None
    report: DataReport


def _row_format(row: Any) -> str | None:
    """Which format a row's keys say it is, or None."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "chat"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return None


def detect_rows(name: str | Path, rows: list[tuple[int, Any]]) -> str:
    """The most common row format among the first object rows (ties: earlier in FORMATS)."""
    objects = [row for _, row in rows if isinstance(row, dict)][:DETECT_ROWS]
    votes = Counter(f for f in map(_row_format, objects) if f is not None)
    if not votes:
        keys = sorted({k for row in objects for k in row})[:10]
        found = f"found keys {keys}" if objects else "found no JSON objects"
        raise DataError(f"{name}: cannot tell the data format ({found}); rows need 'text', "
                        "'prompt'+'completion', 'messages', 'conversations' or 'instruction'+'output' "
                        "(--columns maps other column names onto these)")
    return max(FORMATS, key=lambda f: (votes[f], -FORMATS.index(f)))


def detect_format(path: str | Path) -> str:
    """'text' for plain-text files, else the format the rows' keys say ('completion', 'chat', ...)."""
    source = as_source(path)
    if source.kind == TEXT:
        read_text(Path(source.path))
        return "text"
    return detect_rows(source.path, read_rows(source, DataReport(source.path)))


def _field(row: dict, name: str, *, required: bool = True, allow_empty: bool = False) -> str:
    """A string field of a row, or BadRow saying what is wrong with it."""
    if name not in row or row[name] is None:
        if required:
            raise BadRow(f"missing '{name}'")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise BadRow(f"'{name}' is not a string")
    if not is_unicode(value):
        raise BadRow(f"'{name}' holds a lone surrogate escape (\\ud800-\\udfff), not text")
    if not allow_empty and not value.strip():
        raise BadRow(f"empty '{name}'")
    return value


def _prompt_answer(prompt_ids: list[int], answer_ids: list[int], ctx: Ctx) -> Example:
    """Concatenate prompt and answer; the prompt gets no loss unless train_on_prompt."""
    prompt_labels = list(prompt_ids) if ctx.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return Example(prompt_ids + answer_ids, prompt_labels + list(answer_ids))


def _completion_example(row: dict, ctx: Ctx) -> Example:
    prompt = _field(row, "prompt", allow_empty=True)
    completion = _field(row, "completion")
    prompt_ids = ctx.bos + encode(ctx.tokenizer, prompt)
    return _prompt_answer(prompt_ids, with_eos(encode(ctx.tokenizer, completion), ctx.eos), ctx)


def _alpaca_example(row: dict, ctx: Ctx) -> Example:
    instruction = _field(row, "instruction")
    extra = _field(row, "input", required=False, allow_empty=True)
    output = _field(row, "output")
    template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=instruction, input=extra)
    prompt_ids = ctx.bos + encode(ctx.tokenizer, prompt)
    return _prompt_answer(prompt_ids, with_eos(encode(ctx.tokenizer, output), ctx.eos), ctx)


def _chat_example(row: dict, ctx: Ctx) -> Example:
    return chat_example(checked_messages(row.get("messages")), row_tools(row), ctx.tokenizer, ctx.train_on_prompt)


def _sharegpt_example(row: dict, ctx: Ctx) -> Example:
    return chat_example(sharegpt_messages(row), row_tools(row), ctx.tokenizer, ctx.train_on_prompt)


_BUILDERS = {"completion": _completion_example, "alpaca": _alpaca_example, "chat": _chat_example,
             "sharegpt": _sharegpt_example}


def _fit(example: Example, ctx: Ctx) -> tuple[Example, bool]:
    """Apply the max_length policy; returns the example and whether it was truncated."""
    if len(example) <= ctx.max_length:
        return example, False
    if ctx.overlong == "drop":
        raise BadRow(f"longer than max_length {ctx.max_length}")
    cut = Example(example.input_ids[:ctx.max_length], example.labels[:ctx.max_length])
    return cut, True


def _row_examples(where: int, row: Any, fmt: str, ctx: Ctx) -> list[Example]:
    """The examples one row gives (text rows may give several blocks); raises BadRow."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow("not a JSON object")
    if fmt == "text":
        ids = ctx.bos + with_eos(encode_long(ctx.tokenizer, _field(row, "text")), ctx.eos)
        return split_blocks(ids, ctx.max_length, ctx.report, where)
    example, truncated = _fit(_BUILDERS[fmt](row, ctx), ctx)
    if all(label == IGNORE_INDEX for label in example.labels[1:]):
        raise BadRow(f"no trained tokens within max_length {ctx.max_length}")
    ctx.report.truncated += truncated
    return [example]


def examples_from_rows(rows: list[tuple[int, Any]], fmt: str, ctx: Ctx) -> list[Example]:
    """Every row's examples; each bad row is counted in ``ctx.report`` with where it was."""
    examples: list[Example] = []
    for where, row in rows:
        try:
            examples.extend(_row_examples(where, row, fmt, ctx))
        except BadRow as bad:
            ctx.report.skip(str(bad), where)
    return examples


def text_examples(text: str, ctx: Ctx, where: int | None = None) -> list[Example]:
    """A plain text as one token stream (BOS, EOS once) cut into max_length blocks."""
    ids = ctx.bos + with_eos(encode_long(ctx.tokenizer, text), ctx.eos)
    return split_blocks(ids, ctx.max_length, ctx.report, where)


def check_options(max_length: int, fmt: str | None, overlong: str) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if overlong not in OVERLONG:
        raise ConfigError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")


def check_chat_tokenizer(name: str, fmt: str, tokenizer: Any) -> None:
    if fmt in CHAT_FORMATS and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{name}: chat rows need a tokenizer with a chat template; this tokenizer has none")


def make_ctx(tokenizer: Any, max_length: int, train_on_prompt: bool, overlong: str, report: DataReport) -> Ctx:
    return Ctx(tokenizer, max_length, train_on_prompt, overlong, bos_prefix(tokenizer),
               getattr(tokenizer, "eos_token_id", None), report)


def finish_report(examples: list[Example], report: DataReport) -> None:
    """Fill the totals; a source that gave nothing usable is the user's error to hear about."""
    report.examples_kept = len(examples)
    report.tokens = sum(len(e) for e in examples)
    report.trained_tokens = sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples)
    if not examples:
        why = f": {report.skipped_text()}" if report.skipped else ""
        raise DataError(f"{report.path}: no usable rows in {report.rows_read} read{why}")


def as_source(source: str | Path | DataSource, fmt: str | None = None, columns: str | dict | None = None,
              split: str | None = None, config: str | None = None) -> DataSource:
    """A DataSource as given, or one built from a path / hub id and the options."""
    if isinstance(source, DataSource):
        return source
    return DataSource(str(source), fmt, columns or {}, split, config)


def read_rows(source: DataSource, report: DataReport) -> list[tuple[int, Any]]:
    """All (number, row) of a row source, columns renamed; a JSON file's non-JSON lines are BadRows."""
    report.line_unit = source.line_unit
    if source.kind == JSON:
        path = Path(source.path).expanduser()
        rows = json_rows(path, read_text(path), report)
        rows = [(n, rename_columns(r, source.columns)) for n, r in rows]
    else:
        rows = list(dataset_rows(source))
        if not rows:
            raise DataError(f"{source.path}: has no rows")
    if source.columns:
        check_columns(source, [r for _, r in rows[:DETECT_ROWS]])
    return rows


def load_examples(path: str | Path | DataSource, tokenizer: Any, max_length: int, fmt: str | None = None,
                  train_on_prompt: bool = False, overlong: str = "truncate", columns: str | dict | None = None,
                  split: str | None = None, config: str | None = None) -> tuple[list[Example], DataReport]:
    """Read one source into examples of at most ``max_length`` tokens, with a report.

    ``path`` is a file (text, json, jsonl, csv, parquet, arrow), a ``save_to_disk`` folder, a hub
    dataset id (``config``/``split`` choose in it) or a :class:`DataSource`. ``fmt`` overrides
    detection; ``fmt="text"`` on a plain-text file (and the default there) reads the whole file
    as one text; any other ``fmt`` reads a plain-text file as JSON lines. ``columns`` maps
    adaptune's names to the data's (``"prompt=question,completion=answer"``).
    """
    source = as_source(path, fmt, columns, split, config)
    check_options(max_length, source.fmt, overlong)
    report = DataReport(source.path, name=source.name)
    ctx = make_ctx(tokenizer, max_length, train_on_prompt, overlong, report)
    if source.kind == TEXT:
        text = read_text(Path(source.path).expanduser())
        report.fmt = "text"
        report.rows_read = len(text.splitlines())
        examples = text_examples(text, ctx)
    else:
        rows = read_rows(source, report)
        report.rows_read = len(rows)
        report.fmt = source.fmt or detect_rows(source.path, rows)
        check_chat_tokenizer(source.path, report.fmt, tokenizer)
        examples = examples_from_rows(rows, report.fmt, ctx)
    finish_report(examples, report)
    return examples, report
