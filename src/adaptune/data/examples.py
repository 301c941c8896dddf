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

import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError

IGNORE_INDEX = -100
FORMATS = ("text", "completion", "chat", "alpaca")
OVERLONG = ("truncate", "drop")
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
MAX_BAD_LINES = 5        # line numbers kept in the report
DETECT_ROWS = 100        # object rows looked at to detect a file's format
TEXT_CHUNK_CHARS = 1 << 16  # plain text is tokenized in chunks of about this many characters

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


# --------------------------------------------------------------------------- public records


@dataclass
class Example:
    """One training example; ``labels`` is ``-100`` where the token gets no loss."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataReport:
    """What loading a file did: counts the user can check, so nothing is dropped unseen."""

    path: str
    fmt: str = ""
    rows_read: int = 0                  # JSON rows, or lines of a plain-text file
    examples_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated: int = 0                  # examples cut to max_length (overlong="truncate")
    bad_lines: list[int] = field(default_factory=list)     # first few bad rows' line numbers
    line_unit: str = "line"             # "item" for rows of a JSON array (1-based)
    tokens: int = 0                     # tokens in kept examples
    trained_tokens: int = 0             # of those, tokens whose label is not -100
    limited_to: int | None = None       # build_datasets(max_examples=...) cut the examples to this
    train_examples: int | None = None
    val_examples: int | None = None
    train_blocks: int | None = None     # features after packing (== examples when not packed)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, where: int | None = None) -> None:
        """Count one unusable row (or tail) under ``reason``; remember where the first few were."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if where is not None and len(self.bad_lines) < MAX_BAD_LINES:
            self.bad_lines.append(where)

    def skipped_text(self) -> str:
        """'3 invalid JSON, 1 missing 'text' (first at lines 2, 5)', most frequent reason first."""
        parts = [f"{n} {reason}" for reason, n in Counter(self.skipped).most_common()]
        text = ", ".join(parts)
        if self.bad_lines:
            text += f" (first at {self.line_unit}s {', '.join(map(str, self.bad_lines))})"
        return text

    def summary(self) -> str:
        """One or two lines for people: what was read, kept, skipped and trained on."""
        share = 100.0 * self.trained_tokens / max(self.tokens, 1)
        line = (f"{Path(self.path).name} ({self.fmt}): {self.rows_read:,} rows -> "
                f"{self.examples_kept:,} examples, {self.tokens:,} tokens ({share:.0f}% trained)")
        if self.truncated:
            line += f"; {self.truncated:,} truncated"
        if self.limited_to is not None:
            line += f"; limited to the first {self.limited_to:,}"
        if self.train_examples is not None:
            line += f"; train {self.train_examples:,} / val {self.val_examples:,}"
            if self.train_blocks is not None and self.train_blocks != self.train_examples:
                line += f" (train packed into {self.train_blocks:,} blocks)"
        if self.skipped:
            line += f"\nskipped {self.n_skipped:,}: {self.skipped_text()}"
        return line


class _BadRow(Exception):
    """A row that cannot become an example; its message is the reason counted in the report."""


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


# --------------------------------------------------------------------------- reading files


def default_data_path() -> Path:
    """The bundled training text (Shakespeare, public domain), used when no data is given."""
    return Path(str(resources.files("adaptune").joinpath("resources").joinpath("shakespeare.txt")))


def check_data_file(path: str | Path) -> Path:
    """``path`` as a Path if it is a file; DataError saying what it is otherwise."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; pass a data file inside it (text or .jsonl)")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    return path


def _read_text(path: Path) -> str:
    """The file as text; DataError for missing, empty or non-UTF-8 files (the usual user slips)."""
    check_data_file(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (bad byte 0x{raw[err.start]:02x} at offset "
                        f"{err.start}); re-save it as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def _is_json_file(path: Path) -> bool:
    return path.suffix.lower() in JSON_SUFFIXES


def _json_rows(path: Path, text: str, report: DataReport) -> list[tuple[int, Any]]:
    """(line or item number, parsed value) per row; rows that are not JSON hold a ``_BadRow``."""
    if path.suffix.lower() == ".json":
        try:
            whole = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            whole = None  # not one document: read it as JSON lines below
        if isinstance(whole, list):
            report.line_unit = "item"
            return [(i + 1, row) for i, row in enumerate(whole)]
        if whole is not None:
            return [(1, whole)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines separate nothing and are not rows
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError:
            rows.append((number, _BadRow("invalid JSON")))
        except RecursionError:
            rows.append((number, _BadRow("JSON nested too deeply")))
    return rows


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
    text = _read_text(path)
    if not _is_json_file(path):
        return "text"
    return _detect_rows(path, _json_rows(path, text, DataReport(str(path))))


# --------------------------------------------------------------------------- tokenizing


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _bos_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text by itself (Llama's BOS; GPT-2: none).

    We tokenize pieces without special tokens (so chunks and prompt/completion halves get no stray
    BOS) and add this prefix once per example instead.
    """
    plain = _encode(tokenizer, "hello")
    full = list(tokenizer("hello", verbose=False)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


_SAFE_CUT = re.compile(r"\S\n(?=\S)")  # a single newline between two non-space characters


def _text_chunks(text: str, size: int) -> list[str]:
    """Cut text into ~size pieces at single newlines, where BPE pre-tokenizers split anyway."""
    chunks, start = [], 0
    while len(text) - start > size:
        cut = _SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        chunks.append(text[start:cut.end()])
        start = cut.end()
    chunks.append(text[start:])
    return chunks


def _chunking_is_exact(tokenizer: Any, left: str, right: str) -> bool:
    """Whether tokenizing two chunks apart gives the same ids as together (it does not for
    tokenizers that prepend a space marker to every call, e.g. some SentencePiece ones)."""
    tail = left[left.rstrip("\n").rfind("\n") + 1:]
    head = right[:right.find("\n") + 1] or right
    return _encode(tokenizer, tail) + _encode(tokenizer, head) == _encode(tokenizer, tail + head)


def _encode_long(tokenizer: Any, text: str) -> list[int]:
    """Tokenize a long text in line-aligned chunks (one batched call: ~3x faster than one giant
    call on 1 MB), falling back to one call where chunking would change the tokens."""
    chunks = _text_chunks(text, TEXT_CHUNK_CHARS)
    if len(chunks) == 1 or not _chunking_is_exact(tokenizer, chunks[0], chunks[1]):
        return _encode(tokenizer, text)
    batches = tokenizer(chunks, add_special_tokens=False, verbose=False)["input_ids"]
    return [i for ids in batches for i in ids]


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


# --------------------------------------------------------------------------- row builders


def _is_unicode(text: str) -> bool:
    """False for a string with a lone UTF-16 surrogate (JSON's "\\ud800" escape allows one); no
    tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _field(row: dict, name: str, *, required: bool = True, allow_empty: bool = False) -> str:
    """A string field of a row, or _BadRow saying what is wrong with it."""
    if name not in row or row[name] is None:
        if required:
            raise _BadRow(f"missing '{name}'")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise _BadRow(f"'{name}' is not a string")
    if not _is_unicode(value):
        raise _BadRow(f"'{name}' holds a lone surrogate escape (\\ud800-\\udfff), not text")
    if not allow_empty and not value.strip():
        raise _BadRow(f"empty '{name}'")
    return value


def _blocks(ids: list[int], max_length: int, report: DataReport,
            where: int | None) -> list[Example]:
    """Split a token stream into max_length blocks; a last block of < 2 tokens teaches nothing."""
    blocks = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    if blocks and len(blocks[-1]) < 2:
        blocks.pop()
        report.skip("text tail shorter than 2 tokens", where)
    return [Example(list(b), list(b)) for b in blocks]


def _prompt_answer(prompt_ids: list[int], answer_ids: list[int], ctx: _Ctx) -> Example:
    """Concatenate prompt and answer; the prompt gets no loss unless train_on_prompt."""
    prompt_labels = list(prompt_ids) if ctx.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return Example(prompt_ids + answer_ids, prompt_labels + list(answer_ids))


def _completion_example(row: dict, ctx: _Ctx) -> Example:
    prompt = _field(row, "prompt", allow_empty=True)
    completion = _field(row, "completion")
    prompt_ids = ctx.bos + _encode(ctx.tokenizer, prompt)
    return _prompt_answer(prompt_ids, _with_eos(_encode(ctx.tokenizer, completion), ctx.eos), ctx)


def _alpaca_example(row: dict, ctx: _Ctx) -> Example:
    instruction = _field(row, "instruction")
    extra = _field(row, "input", required=False, allow_empty=True)
    output = _field(row, "output")
    template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=instruction, input=extra)
    prompt_ids = ctx.bos + _encode(ctx.tokenizer, prompt)
    return _prompt_answer(prompt_ids, _with_eos(_encode(ctx.tokenizer, output), ctx.eos), ctx)


def _messages(row: dict) -> list[dict]:
    """The row's chat messages, checked: a list of {role: str, content: str} with an assistant."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRow("'messages' is not a non-empty list")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise _BadRow("a message is not {role: str, content: str}")
        if not (_is_unicode(m["role"]) and _is_unicode(m["content"])):
            raise _BadRow("a message holds a lone surrogate escape (\\ud800-\\udfff), not text")
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRow("no assistant turn")
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
    ids = _encode(tokenizer, text)
    bounds = [(len(_encode(tokenizer, text[:a])), len(_encode(tokenizer, text[:b])))
              for a, b in spans]
    return ids, [any(lo <= j < hi for lo, hi in bounds) for j in range(len(ids))]


def _chat_example(row: dict, ctx: _Ctx) -> Example:
    messages = _messages(row)
    try:
        full = _render(ctx.tokenizer, messages, False)
        spans = _assistant_char_spans(ctx.tokenizer, messages, full)
    except Exception as err:  # jinja raises whatever the template author chose
        raise _BadRow(f"chat template error ({type(err).__name__})") from None
    ids, trained = _token_mask(ctx.tokenizer, full, spans)
    labels = [t if (keep or ctx.train_on_prompt) else IGNORE_INDEX for t, keep in zip(ids, trained)]
    return Example(ids, labels)


_BUILDERS = {"completion": _completion_example, "alpaca": _alpaca_example, "chat": _chat_example}


def _fit(example: Example, ctx: _Ctx) -> tuple[Example, bool]:
    """Apply the max_length policy; returns the example and whether it was truncated."""
    if len(example) <= ctx.max_length:
        return example, False
    if ctx.overlong == "drop":
        raise _BadRow(f"longer than max_length {ctx.max_length}")
    cut = Example(example.input_ids[:ctx.max_length], example.labels[:ctx.max_length])
    return cut, True


def _row_examples(where: int, row: Any, fmt: str, ctx: _Ctx) -> list[Example]:
    """The examples one JSON row gives (text rows may give several blocks); raises _BadRow."""
    if isinstance(row, _BadRow):
        raise row
    if not isinstance(row, dict):
        raise _BadRow("not a JSON object")
    if fmt == "text":
        ids = ctx.bos + _with_eos(_encode_long(ctx.tokenizer, _field(row, "text")), ctx.eos)
        return _blocks(ids, ctx.max_length, ctx.report, where)
    example, truncated = _fit(_BUILDERS[fmt](row, ctx), ctx)
    if all(label == IGNORE_INDEX for label in example.labels[1:]):
        raise _BadRow(f"no trained tokens within max_length {ctx.max_length}")
    ctx.report.truncated += truncated
    return [example]


def _examples_from_rows(rows: list[tuple[int, Any]], fmt: str, ctx: _Ctx) -> list[Example]:
    examples: list[Example] = []
    for where, row in rows:
        try:
            examples.extend(_row_examples(where, row, fmt, ctx))
        except _BadRow as bad:
            ctx.report.skip(str(bad), where)
    return examples


# --------------------------------------------------------------------------- loading


def _check_options(max_length: int, fmt: str | None, overlong: str) -> None:
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if overlong not in OVERLONG:
        raise ConfigError(f"overlong must be 'truncate' or 'drop', got {overlong!r}")


def _make_ctx(tokenizer: Any, max_length: int, train_on_prompt: bool, overlong: str,
              report: DataReport) -> _Ctx:
    return _Ctx(tokenizer, max_length, train_on_prompt, overlong, _bos_prefix(tokenizer),
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
    text = _read_text(path)
    if fmt in (None, "text") and not _is_json_file(path):
        report.fmt = "text"
        report.rows_read = len(text.splitlines())
        ids = ctx.bos + _with_eos(_encode_long(tokenizer, text), ctx.eos)
        examples = _blocks(ids, max_length, report, None)
    else:
        rows = _json_rows(path, text, report)
        report.rows_read = len(rows)
        report.fmt = fmt or _detect_rows(path, rows)
        if report.fmt == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{path}: chat rows need a tokenizer with a chat template; "
                            "this tokenizer has none")
        examples = _examples_from_rows(rows, report.fmt, ctx)
    _finish(path, examples, report)
    return examples, report


# --------------------------------------------------------------------------- split and pack


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


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit bin packing in O(n log n): the leftmost bin with room gets each item.

    A max-tree over the room left in each bin finds that bin; bins not yet opened have full room,
    so the first of them is found exactly when no open bin fits.
    """
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    room = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for item, need in enumerate(lengths):
        if need > capacity:
            raise ValueError(f"example of {need} tokens does not fit max_length {capacity}")
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        if node - size == len(bins):
            bins.append([])
        bins[node - size].append(item)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def _as_feature(item: Example | dict) -> dict[str, list[int]]:
    """A feature dict of int lists from an Example or a dict (tensors allowed)."""
    if isinstance(item, Example):
        return {"input_ids": list(item.input_ids), "labels": list(item.labels)}
    out = {k: (v.tolist() if isinstance(v, torch.Tensor) else list(v)) for k, v in item.items()
           if k in ("input_ids", "labels", "position_ids")}
    out.setdefault("labels", list(out["input_ids"]))
    return out


def _block(examples: list[Example]) -> dict[str, list[int]]:
    """One packed block. Each example's first label is -100: its logits would be predicted from
    the previous example's last token, which cannot see it (the same loss as unpacked)."""
    block: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        block["input_ids"] += example.input_ids
        block["labels"] += [IGNORE_INDEX] + list(example.labels[1:])
        block["position_ids"] += list(range(len(example)))
    return block


def pack_examples(examples: Sequence[Example], max_length: int) -> list[dict[str, list[int]]]:
    """Pack examples first-fit into blocks of at most max_length tokens, never splitting one."""
    bins = _first_fit([len(e) for e in examples], max_length)
    return [_block([examples[i] for i in b]) for b in bins]


# --------------------------------------------------------------------------- collating


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
        rows = [_as_feature(f) for f in features]
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


# --------------------------------------------------------------------------- the one call


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
        train_features, val_features = ([_as_feature(e) for e in part] for part in (train, val))
    report.train_examples, report.val_examples = len(train), len(val)
    report.train_blocks = len(train_features)
    return train_features, val_features, report


# --------------------------------------------------------------------------- model check


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether ``model`` keeps packed examples apart (restarting position_ids, no mask).

    Checked on the model itself with a 4-token probe: two 2-token examples packed in one row must
    give the second the same logits as running it alone. False for any model that errors on
    position_ids or ignores them, so callers can fall back to
    ``packing=False``. Runs without a KV cache, as training does.
    """
    was_training = model.training
    try:
        param = next(model.parameters())
        vocab = model.get_input_embeddings().num_embeddings
        a, b = 1 % vocab, 2 % vocab
        ids = torch.tensor([[a, b, b, a]], device=param.device)
        model.eval()
        with torch.no_grad():
            positions = torch.tensor([[0, 1, 0, 1]], device=param.device)
            packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 2:]
            packed = packed.float()
            alone = model(input_ids=ids[:, 2:], use_cache=False).logits[0].float()
    except Exception:
        return False
    finally:
        model.train(was_training)
    tol = (1e-4 if param.dtype == torch.float32 else 2e-2) * max(1.0, alone.abs().max().item())
    return packed.shape == alone.shape and bool((packed - alone).abs().max() <= tol)
