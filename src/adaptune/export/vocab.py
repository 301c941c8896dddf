"""A transformers tokenizer as llama.cpp's ``tokenizer.ggml.*`` keys (bases that are not GGUF files).

Byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2) are written the way llama.cpp's
``convert_hf_to_gguf.py`` writes them (``get_vocab_base``): the token list padded to the model's
vocabulary size, token types (control for special added tokens), the merges, the special token ids
and the chat template (``gguf.SpecialVocab``). llama.cpp also needs the name of the pre-tokenizer,
which that script finds from a hash of sample tokenizations; here it is read from the tokenizer's
own pre-tokenizer description and must be one llama.cpp knows, else the export stops with a reason.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# The split patterns of tokenizer.json's Split pre-tokenizers that llama.cpp implements, by its name.
_SPLIT_PATTERNS = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
}

EXPORT_FROM_GGUF = ("export from a GGUF file of the base model instead (--model base.gguf, e.g. one made by "
                    "llama.cpp's convert_hf_to_gguf.py)")


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level BPE tokenizer's pre-tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        if pattern in _SPLIT_PATTERNS:
            return _SPLIT_PATTERNS[pattern]
    raise ConfigError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) is not one adaptune can name for "
                      f"llama.cpp (gpt-2, smollm, llama-bpe, qwen2); {EXPORT_FROM_GGUF}")


def _looks_special(token: str) -> bool:
    """Added tokens some models forget to mark special (convert_hf_to_gguf's does_token_look_special)."""
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1, as convert_hf_to_gguf.py's get_vocab_base."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} "
                          f"embedding rows")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special if i in decoder else False
            types.append(gguf.TokenType.CONTROL if special or _looks_special(token) else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, [int(t) for t in types]


def add_tokenizer(writer, tokenizer: Any, vocab_size: int) -> None:
    """Add the tokenizer, special tokens and chat template to a ``gguf.GGUFWriter``."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="adaptune-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) has no tokenizer.json (a slow "
                              f"tokenizer); {EXPORT_FROM_GGUF}")
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            kind = model.get("type") if not model.get("byte_fallback") else "SentencePiece-style BPE with byte fallback"
            raise ConfigError(f"adaptune writes byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2) into "
                              f"GGUF files, not a {kind} tokenizer; {EXPORT_FROM_GGUF}")
        pre = pre_tokenizer_name(data)
        tokens, types = token_list(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            raise ConfigError("the tokenizer has no BPE merges to write")
        special.add_to_gguf(writer, quiet=True)
