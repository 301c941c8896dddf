"""User data -> token examples for causal-LM fine-tuning.

Formats: plain text (split into blocks), and JSON / JSON-lines rows of four shapes, detected from
the rows' keys: ``text``; ``prompt`` + ``completion``; chat ``messages``; alpaca ``instruction``
(+ ``input``) + ``output``. Labels are ``-100`` wherever no loss is wanted (the prompt, the user and
system turns, padding). Bad rows are counted by reason in a ``DataReport`` and never crash a run;
a file with nothing usable raises ``DataError`` naming the file.

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
from .files import is_json_file, json_rows, read_text
from .records import IGNORE_INDEX, BadRow, DataReport, Example
from .tokens import bos_prefix, encode, encode_long, split_blocks, with_eos

FORMATS = ("text", "completion", "chat", "alpaca")
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
class _Ctx:
    """Everything a row builder needs, resolved once per file."""

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
    if "prompt" in row and "completion" in row:
        return "completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    return None


def _detect_rows(path: Path, rows: list[tuple[int, Any]]) -> str:
    """The most common row format among the first object rows (ties: earlier in FORMATS)."""
    objects = [row for _, row in rows if isinstance(row, dict)][:DETECT_ROWS]
    votes = Counter(f for f in map(_row_format, objects) if f is not None)
    if not votes:
        keys = sorted({k for row in objects for k in row})[:10]
        found = f"found keys {keys}" if objects else "found no JSON objects"
        raise DataError(f"{path}: cannot tell the data format ({found}); rows need 'text', "
                        "'prompt'+'completion', 'messages' or 'instruction'+'output'")
    return max(FORMATS, key=lambda f: (votes[f], -FORMATS.index(f)))


def detect_format(path: str | Path) -> str:
    """'text' for non-JSON files, else the format the rows' keys say ('completion', 'chat', ...)."""
    path = Path(path)
    text = read_text(path)
    if not is_json_file(path):
        return "text"
    return _detect_rows(path, json_rows(path, text, DataReport(str(path))))


def _is_unicode(text: str) -> bool:
    """False for a string with a lone UTF-16 surrogate (JSON's "\\ud800" escape allows one); no
    tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _field(row: dict, name: str, *, required: bool = True, allow_empty: bool = False) -> str:
    """A string field of a row, or BadRow saying what is wrong with it."""
    if name not in row or row[name] is None:
        if required:
            raise BadRow(f"missing '{name}'")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise BadRow(f"'{name}' is not a string")
    if not _is_unicode(value):
        raise BadRow(f"'{name}' holds a lone surrogate escape (\\ud800-\\udfff), not text")
    if not allow_empty and not value.strip():
        raise BadRow(f"empty '{name}'")
    return value


def _prompt_answer(prompt_ids: list[int], answer_ids: list[int], ctx: _Ctx) -> Example:
    """Concatenate prompt and answer; the prompt gets no loss unless train_on_prompt."""
    prompt_labels = list(prompt_ids) if ctx.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return Example(prompt_ids + answer_ids, prompt_labels + list(answer_ids))


def _completion_example(row: dict, ctx: _Ctx) -> Example:
    prompt = _field(row, "prompt", allow_empty=True)
    completion = _field(row, "completion")
    prompt_ids = ctx.bos + encode(ctx.tokenizer, prompt)
    return _prompt_answer(prompt_ids, with_eos(encode(ctx.tokenizer, completion), ctx.eos), ctx)


def _alpaca_example(row: dict, ctx: _Ctx) -> Example:
    instruction = _field(row, "instruction")
    extra = _field(row, "input", required=False, allow_empty=True)
    output = _field(row, "output")
    template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=instruction, input=extra)
    prompt_ids = ctx.bos + encode(ctx.tokenizer, prompt)
    return _prompt_answer(prompt_ids, with_eos(encode(ctx.tokenizer, output), ctx.eos), ctx)


def _messages(row: dict) -> list[dict]:
    """The row's chat messages, checked: a list of {role: str, content: str} with an assistant."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRow("'messages' is not a non-empty list")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise BadRow("a message is not {role: str, content: str}")
        if not (_is_unicode(m["role"]) and _is_unicode(m["content"])):
            raise BadRow("a message holds a lone surrogate escape (\\ud800-\\udfff), not text")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant turn")
    return messages


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _assistant_char_spans(tokenizer: Any, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns (content + end-of-turn) in the full rendering.

    Found by rendering prefixes of the conversation: turn i starts where the rendering of
    messages[:i] with the generation prompt stops, and ends where messages[:i+1] stops. Taking
    the common prefix with the full text (rather than the prefix's length) keeps this right for
    templates that render earlier turns slightly differently once later turns exist.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _common_prefix_len(full, _render(tokenizer, messages[:i], True)) if i else 0
        end = _common_prefix_len(full, _render(tokenizer, messages[:i + 1], False))
        if end > start:
            spans.append((start, end))
    return spans


def _token_mask(tokenizer: Any, text: str,
                spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it overlaps one of the character spans.

    Fast tokenizers give character offsets; slow ones fall back to token counts of text prefixes
    at each span boundary.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        return ids, [any(s < b and e > a for a, b in spans) for s, e in offsets]
    ids = encode(tokenizer, text)
    bounds = [(len(encode(tokenizer, text[:a])), len(encode(tokenizer, text[:b])))
              for a, b in spans]
    return ids, [any(lo <= j < hi for lo, hi in bounds) for j in range(len(ids))]


def _chat_example(row: dict, ctx: _Ctx) -> Example:
    messages = _messages(row)
    try:
        full = _render(ctx.tokenizer, messages, False)
        spans = _assistant_char_spans(ctx.tokenizer, messages, full)
    except Exception as err:  # jinja raises whatever the template author chose
        raise BadRow(f"chat template error ({type(err).__name__})") from None
    ids, trained = _token_mask(ctx.tokenizer, full, spans)
    labels = [t if (keep or ctx.train_on_prompt) else IGNORE_INDEX for t, keep in zip(ids, trained)]
    return Example(ids, labels)


_BUILDERS = {"completion": _completion_example, "alpaca": _alpaca_example, "chat": _chat_example}


def _fit(example: Example, ctx: _Ctx) -> tuple[Example, bool]:
    """Apply the max_length policy; returns the example and whether it was truncated."""
    if len(example) <= ctx.max_length:
        return example, False
    if ctx.overlong == "drop":
        raise BadRow(f"longer than max_length {ctx.max_length}")
    cut = Example(example.input_ids[:ctx.max_length], example.labels[:ctx.max_length])
    return cut, True


def _row_examples(where: int, row: Any, fmt: str, ctx: _Ctx) -> list[Example]:
    """The examples one JSON row gives (text rows may give several blocks); raises BadRow."""
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


def _examples_from_rows(rows: list[tuple[int, Any]], fmt: str, ctx: _Ctx) -> list[Example]:
    examples: list[Example] = []
    for where, row in rows:
        try:
            examples.extend(_row_examples(where, row, fmt, ctx))
        except BadRow as bad:
            ctx.report.skip(str(bad), where)
    return examples


def _check_options(max_length: int, fmt: str | None, overlong: str) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if overlong not in OVERLONG:
        raise ConfigError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")


def _make_ctx(tokenizer: Any, max_length: int, train_on_prompt: bool, overlong: str,
              report: DataReport) -> _Ctx:
    return _Ctx(tokenizer, max_length, train_on_prompt, overlong, bos_prefix(tokenizer),
                getattr(tokenizer, "eos_token_id", None), report)


def _finish(path: Path, examples: list[Example], report: DataReport) -> None:
    """Fill the totals; a file that gave nothing usable is the user's error to hear about."""
    report.examples_kept = len(examples)
    report.tokens = sum(len(e) for e in examples)
    report.trained_tokens = sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples)
    if not examples:
        why = f": {report.skipped_text()}" if report.skipped else ""
        raise DataError(f"{path}: no usable rows in {report.rows_read} read{why}")


def load_examples(path: str | Path, tokenizer: Any, max_length: int, fmt: str | None = None,
                  train_on_prompt: bool = False, overlong: str = "truncate",
                  ) -> tuple[list[Example], DataReport]:
    """Read one data file into examples of at most ``max_length`` tokens, with a report.

    ``fmt`` overrides detection. For JSON files it names the row format; ``fmt="text"`` on a
    non-JSON file (and the default there) reads the whole file as one text; any other ``fmt``
    reads the file as JSON lines whatever its name.
    """
    _check_options(max_length, fmt, overlong)
    path = Path(path)
    report = DataReport(str(path))
    ctx = _make_ctx(tokenizer, max_length, train_on_prompt, overlong, report)
    text = read_text(path)
    if fmt in (None, "text") and not is_json_file(path):
        report.fmt = "text"
        report.rows_read = len(text.splitlines())
        ids = ctx.bos + with_eos(encode_long(tokenizer, text), ctx.eos)
        examples = split_blocks(ids, max_length, report, None)
    else:
        rows = json_rows(path, text, report)
        report.rows_read = len(rows)
        report.fmt = fmt or _detect_rows(path, rows)
        if report.fmt == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{path}: chat rows need a tokenizer with a chat template; "
                            "this tokenizer has none")
        examples = _examples_from_rows(rows, report.fmt, ctx)
    _finish(path, examples, report)
    return examples, report
