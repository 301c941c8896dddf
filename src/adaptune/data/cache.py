"""The tokenization cache: a second run on the same data reuses the tokens of the first.

Entries are keyed by a hash of everything that decides the tokens: the data's content (every byte
of a file or a ``save_to_disk`` folder; a hub dataset's fingerprint), how it is read (format,
column renames, split, config), the tokenizer (its full serialisation and special tokens), the
chat template, ``max_length``, the label options, and the source code of adaptune's data readers.
A change to any of them is a different key, so nothing stale is ever served; old entries are
simply never read again (delete the folder to reclaim the space).

Each entry is one safetensors file (token ids, labels, lengths; the data report in its metadata),
written atomically. The folder is ``$ADAPTUNE_TOKEN_CACHE``, else ``$XDG_CACHE_HOME/adaptune/tokens``,
else ``~/.cache/adaptune/tokens``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import warn_user
from .formats import load_examples
from .records import DataReport, Example
from .sources import DISK, HUB, DataSource, load_hub

CACHE_ENV = "ADAPTUNE_TOKEN_CACHE"
FORMAT_VERSION = 1
# the modules whose code decides which tokens and labels a row becomes
_CODE_MODULES = ("formats.py", "chat.py", "tokens.py", "files.py", "sources.py", "records.py")


def default_cache_dir() -> Path:
    """``$ADAPTUNE_TOKEN_CACHE``, else the user cache folder's ``adaptune/tokens``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adaptune" / "tokens"


@lru_cache(maxsize=1)
def _code_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in _CODE_MODULES:
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()


def _hash_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def source_digest(source: DataSource) -> str:
    """A hash of the data itself: every byte of a file or saved folder, a hub dataset's fingerprint
    (which changes with the revision downloaded)."""
    h = hashlib.sha256()
    if source.kind == HUB:
        h.update(str(getattr(load_hub(source, streaming=False), "_fingerprint", "")).encode())
        return h.hexdigest()
    path = Path(source.path).expanduser()
    if source.kind == DISK:
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(file.relative_to(path).as_posix().encode() + b"\0")
            _hash_file(h, file)
    else:
        _hash_file(h, path)
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of what decides a tokenizer's ids without calling it: a fast tokenizer's full JSON
    (vocabulary, merges, normalizer, pre-tokenizer, added tokens), a slow one's vocabulary and the
    files it was built from, and the special tokens and BOS/EOS switches of either."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        for key in getattr(tokenizer, "vocab_files_names", {}) or {}:
            file = getattr(tokenizer, "init_kwargs", {}).get(key)
            if isinstance(file, str) and os.path.isfile(file):
                _hash_file(h, Path(file))
    settings = {name: getattr(tokenizer, name, None) for name in (
        "bos_token_id", "eos_token_id", "add_bos_token", "add_eos_token", "add_prefix_space")}
    settings["special"] = {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", {}) or {}).items()}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(source: DataSource, tokenizer: Any, max_length: int, train_on_prompt: bool, overlong: str) -> str:
    parts = {
        "version": FORMAT_VERSION, "code": _code_digest(),
        "source": {"digest": source_digest(source), "kind": source.kind, "fmt": source.fmt,
                   "columns": sorted(source.columns.items()), "split": source.split, "config": source.config},
        "tokenizer": tokenizer_digest(tokenizer), "chat_template": getattr(tokenizer, "chat_template", None),
        "max_length": max_length, "train_on_prompt": bool(train_on_prompt), "overlong": overlong,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _read(path: Path, source: DataSource) -> tuple[list[Example], DataReport] | None:
    """The entry's examples and report, or None if it is missing or unreadable (then it is remade)."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            ids, labels, lengths = (f.get_tensor(k) for k in ("input_ids", "labels", "lengths"))
        fields = {f.name for f in dataclasses.fields(DataReport)}
        report = DataReport(**{k: v for k, v in json.loads(meta["report"]).items() if k in fields})
    except Exception:  # noqa: BLE001 - a torn or foreign file is a miss, never an error
        return None
    sizes = lengths.tolist()
    examples = [Example(a, b) for a, b in zip((t.tolist() for t in torch.split(ids, sizes)),
                                              (t.tolist() for t in torch.split(labels, sizes)))]
    report.path, report.name, report.cached = source.path, source.name, True
    return examples, report


def _write(path: Path, examples: list[Example], report: DataReport) -> None:
    import torch

    from ..atomic import atomic_save_safetensors

    tensors = {
        "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),
        "labels": torch.tensor([t for e in examples for t in e.labels], dtype=torch.int32),
        "lengths": torch.tensor([len(e) for e in examples], dtype=torch.int64),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path, metadata={"report": json.dumps(dataclasses.asdict(report))})


def cached_examples(source: DataSource, tokenizer: Any, max_length: int, train_on_prompt: bool = False,
                    overlong: str = "truncate", cache_dir: str | Path | None = None,
                    ) -> tuple[list[Example], DataReport]:
    """``load_examples`` through the cache in ``cache_dir`` (default :func:`default_cache_dir`).

    A cache folder that cannot be written is said once and the run goes on without it.
    """
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = cache_key(source, tokenizer, max_length, train_on_prompt, overlong)
    path = folder / key[:2] / f"{key}.safetensors"
    if path.is_file():
        hit = _read(path, source)
        if hit is not None:
            return hit
    examples, report = load_examples(source, tokenizer, max_length, train_on_prompt=train_on_prompt,
                                     overlong=overlong)
    try:
        _write(path, examples, report)
    except OSError as exc:
        warn_user(f"the tokenization cache {folder} cannot be written ({exc.strerror or exc}); "
                  "going on without it")
    return examples, report
