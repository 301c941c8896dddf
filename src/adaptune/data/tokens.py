"""Text to token ids: long texts in chunks that tokenize exactly as the whole, BOS/EOS handling,
and a token stream cut into blocks."""

from __future__ import annotations

import re
from typing import Any

from .records import DataReport, Example

TEXT_CHUNK_CHARS = 1 << 16  # plain text is tokenized in chunks of about this many characters


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def bos_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text by itself (Llama's BOS; GPT-2: none).

    We tokenize pieces without special tokens (so chunks and prompt/completion halves get no stray
    BOS) and add this prefix once per example instead.
    """
    plain = encode(tokenizer, "hello")
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
    return encode(tokenizer, tail) + encode(tokenizer, head) == encode(tokenizer, tail + head)


def encode_long(tokenizer: Any, text: str) -> list[int]:
    """Tokenize a long text in line-aligned chunks (one batched call, faster than one giant call on
    a long text), falling back to one call where chunking would change the tokens."""
    chunks = _text_chunks(text, TEXT_CHUNK_CHARS)
    if len(chunks) == 1 or not _chunking_is_exact(tokenizer, chunks[0], chunks[1]):
        return encode(tokenizer, text)
    batches = tokenizer(chunks, add_special_tokens=False, verbose=False)["input_ids"]
    return [i for ids in batches for i in ids]


def with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def split_blocks(ids: list[int], max_length: int, report: DataReport,
            where: int | None) -> list[Example]:
    """Split a token stream into max_length blocks; a last block of < 2 tokens teaches nothing."""
    blocks = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    if blocks and len(blocks[-1]) < 2:
        blocks.pop()
        report.skip("text tail shorter than 2 tokens", where)
    return [Example(list(b), list(b)) for b in blocks]
