"""Streaming: blocks made on the fly, window by window; a saved position gives the same blocks
again; a streamed run resumed from a checkpoint goes on at the exact block it stopped at."""

from __future__ import annotations

import json
import random
import shutil
from itertools import islice

import pytest
import torch
from safetensors.torch import load_file

from adaptune.cli import main
from adaptune.data import DataSource, build_streaming
from adaptune.errors import ConfigError, DataError
from adaptune.training.job import TrainJob
from tests.tiny import WORDS, make_tokenizer, write_words_file


def _completion_rows(path, n: int, seed: int = 0, bad_every: int = 0):
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            lines.append("not json")
            continue
        lines.append(json.dumps({"prompt": " ".join(rng.choices(WORDS, k=4)),
                                 "completion": " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def two_sources(tmp_path):
    a = _completion_rows(tmp_path / "a.jsonl", 60, bad_every=9)
    b = write_words_file(tmp_path / "b.txt", 40, seed=1)
    return [DataSource(str(a), weight=2), DataSource(str(b), weight=1)]


def _stream(sources, **kw):
    options = dict(max_length=32, packing=True, seed=3, val_fraction=0.1, window=16) | kw
    return build_streaming(sources, make_tokenizer(), **options)


def test_a_saved_position_gives_the_same_blocks_again(two_sources):
    stream, val, line = _stream(two_sources)
    assert val and "a.jsonl (completion, weight 2), b.txt (text, weight 1)" in line
    blocks = list(islice(iter(stream), 80))
    assert len({json.dumps(b) for b in blocks}) > 60  # blocks, not one repeated
    for k in (0, 1, 9, 31, 57, 79):
        saved = json.loads(json.dumps(stream.position_at(k)))  # through JSON, as a checkpoint keeps it
        again, _, _ = _stream(two_sources)
        position = again.resume(saved)
        assert position.block == k
        assert list(islice(iter(again), 80 - k)) == blocks[k:], k
    # both sources went past their end at least once: passes are part of the position
    assert stream.position_at(79)["position"]["passes"][1] >= 1


def test_tables_and_saved_datasets_stream_and_resume(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = random.Random(2)
    rows = [{"q": " ".join(rng.choices(WORDS, k=3)), "a": " ".join(rng.choices(WORDS, k=4))} for _ in range(30)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "t.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:12])}).save_to_disk(str(tmp_path / "saved"))
    sources = [DataSource(str(tmp_path / "t.parquet"), columns="prompt=q,completion=a", weight=1),
               DataSource(str(tmp_path / "saved"), columns={"prompt": "q", "completion": "a"}, weight=1)]
    stream, val, line = _stream(sources, window=10)
    assert "t.parquet (completion, weight 1), saved (completion, weight 1)" in line and len(val) == 1
    blocks = list(islice(iter(stream), 40))
    again, _, _ = _stream(sources, window=10)
    again.resume(stream.position_at(23))
    assert list(islice(iter(again), 17)) == blocks[23:]
    assert stream.reports[1].rows_read > 11  # the 11 training rows of the saved dataset, and again


def test_held_out_rows_are_never_trained_and_sources_start_again(tmp_path):
    rows = [{"text": f"the {w} king"} for w in ("lord", "water", "side", "day", "one", "two", "time", "people")]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stream, val, _ = build_streaming([DataSource(str(path))], make_tokenizer(), max_length=32, packing=False,
                                     seed=0, val_fraction=0.25, window=8)
    tok = make_tokenizer()
    held = {tok.decode(f["input_ids"]) for f in val}
    assert held == {"the lord king </s>", "the water king </s>"}
    trained = [tok.decode(f["input_ids"]) for f in islice(iter(stream), 30)]
    assert not held & set(trained) and len(set(trained)) == 6  # the other six rows, pass after pass
    assert stream.reports[0].rows_read >= 30


def test_weights_are_the_shares_of_rows_each_window_reads(two_sources):
    stream, _, _ = _stream(two_sources, window=200)
    list(islice(iter(stream), 300))
    a, b = (r.rows_read for r in stream.reports)
    assert 0.6 < a / (a + b) < 0.74
    assert stream.reports[0].skipped == {"invalid JSON": stream.reports[0].n_skipped} and "invalid JSON" in \
        stream.summary()


def test_a_position_saved_with_other_settings_is_refused(two_sources):
    stream, _, _ = _stream(two_sources)
    list(islice(iter(stream), 5))
    saved = stream.position_at(5)
    other, _, _ = _stream(two_sources, seed=4)
    with pytest.raises(ConfigError, match="other seed"):
        other.resume(saved)


def test_a_source_without_usable_rows_stops_the_stream(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "the"}\n' + '{"prompt": "the", "completion": ""}\n' * 3,
                    encoding="utf-8")
    stream, _, _ = build_streaming([DataSource(str(path))], make_tokenizer(), max_length=32, packing=False,
                                   seed=0, val_fraction=0.2, window=4)  # the one good row is held out
    with pytest.raises(DataError, match="no usable rows in a whole pass.*empty 'completion'"):
        list(islice(iter(stream), 5))


def test_streaming_needs_max_steps():
    with pytest.raises(ConfigError, match="--streaming needs --max-steps"):
        TrainJob(streaming=True, max_steps=0)
    with pytest.raises(ConfigError, match="--max-examples does not apply"):
        TrainJob(streaming=True, max_examples=10)


def _argv(model_dir, data, out, steps, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--max-steps", str(steps),
            "--save-every", "2", "--max-length", "32", "--batch-size", "4", "--lr", "0.01", "--dropout", "0",
            "--seed", "5", "--eval-every", "0", "--streaming", "--stream-window", "24", *extra]


def test_streamed_run_resumes_at_the_recorded_position(model_dir, tmp_path, capsys):
    """Train 6 steps; take away the last checkpoint and the final adapter; --resume must start
    from checkpoint-4 at stream block 16 (4 steps x 4 rows) and give the same adapter."""
    data = _completion_rows(tmp_path / "rows.jsonl", 50)
    out = tmp_path / "out"
    assert main(_argv(model_dir, data, out, 6)) == 0
    saved = json.loads((out / "checkpoint-4" / "stream_state.json").read_text())
    assert saved["position"]["block"] == 16 and saved["seed"] == 5 and saved["window"] == 24
    reference = load_file(out / "adapter_model.safetensors")
    shutil.rmtree(out / "checkpoint-6")
    (out / "adapter_model.safetensors").unlink()
    capsys.readouterr()
    assert main(_argv(model_dir, data, out, 6, "--resume")) == 0
    log = capsys.readouterr().out
    assert "the stream goes on at block 16" in log
    resumed = load_file(out / "adapter_model.safetensors")
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], atol=1e-6, rtol=0)


def test_resume_skips_a_checkpoint_without_stream_state(model_dir, tmp_path, capsys):
    data = _completion_rows(tmp_path / "rows.jsonl", 50)
    out = tmp_path / "out"
    assert main(_argv(model_dir, data, out, 4)) == 0
    (out / "checkpoint-4" / "stream_state.json").unlink()
    capsys.readouterr()
    assert main(_argv(model_dir, data, out, 6, "--resume")) == 0
    log = capsys.readouterr().out
    assert "checkpoint-4: it has no stream_state.json" in log and "goes on at block 8" in log
