"""The tokenization cache: a second run on the same data reuses the tokens without calling the
tokenizer; any change to the data, the tokenizer, the template or the options is a miss."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from adaptune.data import build_datasets
from adaptune.data.cache import cached_examples, default_cache_dir
from adaptune.data.sources import DataSource
from tests.tiny import make_tokenizer

ROWS = [{"messages": [{"role": "user", "content": f"who is the {w}"},
                      {"role": "assistant", "content": f"the {w} is the king"}]}
        for w in ("lord", "king", "water", "side", "time", "day")]


@pytest.fixture
def calls(monkeypatch):
    """Counts every call into the tokenizer class (tokenizing, or rendering a chat template)."""
    counter = {"n": 0}
    cls = type(make_tokenizer())
    for name in ("__call__", "apply_chat_template", "encode"):
        original = getattr(cls, name)

        def counting(self, *args, _original=original, **kwargs):
            counter["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counting)
    return counter


@pytest.fixture
def chat_file(tmp_path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def _load(path, tok, cache_dir, **options):
    source = DataSource(str(path), options.pop("fmt", None), options.pop("columns", {}))
    return cached_examples(source, tok, options.pop("max_length", 32), cache_dir=cache_dir, **options)


def test_second_run_is_a_hit_without_calling_the_tokenizer(tmp_path, chat_file, calls):
    tok = make_tokenizer()
    first, report = _load(chat_file, tok, tmp_path / "cache")
    assert calls["n"] > 0 and not report.cached
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1
    calls["n"] = 0
    again, cached = _load(chat_file, make_tokenizer(), tmp_path / "cache")  # a new tokenizer object, the same one
    assert calls["n"] == 0 and cached.cached and again == first
    assert (cached.rows_read, cached.examples_kept, cached.tokens, cached.fmt) == (6, 6, report.tokens, "chat")
    assert "(tokens from the cache)" in cached.summary()


def _miss(path, tok, cache, calls, **options) -> list:
    calls["n"] = 0
    examples, report = _load(path, tok, cache, **options)
    assert calls["n"] > 0 and not report.cached, options
    return examples


def test_every_kind_of_change_is_a_miss(tmp_path, chat_file, calls):
    cache = tmp_path / "cache"
    tok = make_tokenizer()
    base, _ = _load(chat_file, tok, cache)

    # the file's content, with the same size and modification time
    stat = chat_file.stat()
    chat_file.write_text(chat_file.read_text().replace("king", "lord"), encoding="utf-8")
    os.utime(chat_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert chat_file.stat().st_size == stat.st_size
    assert _miss(chat_file, tok, cache, calls) != base

    added = make_tokenizer()
    added.add_tokens(["zebra"])
    _miss(chat_file, added, cache, calls)                                   # the tokenizer
    templated = make_tokenizer()
    templated.chat_template = templated.chat_template.replace("' </s> '", "' </s>  '")
    _miss(chat_file, templated, cache, calls)                               # the chat template
    assert len(_miss(chat_file, tok, cache, calls, max_length=8)[0]) == 8   # max_length
    _miss(chat_file, tok, cache, calls, train_on_prompt=True)               # label options
    _miss(chat_file, tok, cache, calls, overlong="drop")
    _miss(chat_file, tok, cache, calls, fmt="chat")                         # the format, given
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(chat_file.read_text().replace('"messages"', '"dialog"'), encoding="utf-8")
    _miss(renamed, tok, cache, calls, columns={"messages": "dialog"})       # column renames
    # and each of those is now a hit
    calls["n"] = 0
    _load(chat_file, tok, cache, max_length=8)
    _load(renamed, tok, cache, columns={"messages": "dialog"})
    assert calls["n"] == 0


def test_a_torn_cache_file_is_a_miss_and_is_rewritten(tmp_path, chat_file, calls):
    cache = tmp_path / "cache"
    first, _ = _load(chat_file, make_tokenizer(), cache)
    (entry,) = cache.rglob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:40])
    again = _miss(chat_file, make_tokenizer(), cache, calls)
    assert again == first
    calls["n"] = 0
    _load(chat_file, make_tokenizer(), cache)
    assert calls["n"] == 0


def test_build_datasets_through_the_cache_and_the_default_folder(tmp_path, chat_file, calls, monkeypatch):
    monkeypatch.setenv("ADAPTUNE_TOKEN_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    tok = make_tokenizer()
    first = build_datasets(chat_file, tok, max_length=32, cache=True)
    calls["n"] = 0
    second = build_datasets(chat_file, tok, max_length=32, cache=True)
    assert calls["n"] == 0 and second[:2] == first[:2] and second[2].cached
    assert list((tmp_path / "env-cache").rglob("*.safetensors"))
    monkeypatch.delenv("ADAPTUNE_TOKEN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "adaptune" / "tokens"


def test_second_cli_run_on_a_table_with_columns_uses_the_cache(model_dir, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from adaptune.cli import main

    rows = [{"question": f"who is the {w}", "answer": f"the {w} is the king"} for w in ("lord", "water", "side")] * 4
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))

    def run(*extra: str) -> str:
        argv = ["train", "--model", str(model_dir), "--data", str(tmp_path / "qa.parquet"), "--columns",
                "prompt=question,completion=answer", "--output", str(tmp_path / "out"), "--max-steps", "1",
                "--max-length", "32", "--batch-size", "2", "--eval-every", "0", "--token-cache-dir",
                str(tmp_path / "cache"), *extra]
        assert main(argv) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data: "))

    first = run()
    assert first.startswith("data: qa.parquet (completion): 12 rows -> 12 examples") and "cache" not in first
    assert "(tokens from the cache)" in run()
    assert "cache" not in run("--no-token-cache")
