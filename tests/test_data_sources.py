"""Data from anywhere: tables and saved datasets through ``datasets``, hub ids offline, column
renames, ShareGPT and tool-call rows, weighted mixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import adaptune.data as data
from adaptune.data import IGNORE_INDEX
from adaptune.data.sources import DataSource, parse_sources
from adaptune.errors import ConfigError, DataError
from tests.tiny import make_tokenizer

datasets = pytest.importorskip("datasets")

QA = [{"question": f"the king {w}", "answer": f"{w} and the lord"} for w in ("one", "two", "side", "time", "water")]

TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|system|> ' }}{% for t in tools %}{{ t['function']['name'] + ' ' }}{% endfor %}"
    "{{ '</s> ' }}{% endif %}"
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] }}"
    "{% if m.tool_calls is defined %}{% for c in m.tool_calls %}"
    "{{ ' ' + c['function']['name'] + ' ' + c['function']['arguments']['what'] }}{% endfor %}{% endif %}"
    "{{ ' </s> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)

TOOL_ROW = {
    "tools": [{"type": "function", "function": {"name": "find", "description": "look",
                                                 "parameters": {"type": "object"}}}],
    "messages": [
        {"role": "user", "content": "where is the water"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "find", "arguments": "{\"what\": \"water\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "down by the side"},
        {"role": "assistant", "content": "the water is down by the side"},
    ],
}


def trained_tokens(tok, example) -> list[str]:
    return [t for t, label in zip(tok.convert_ids_to_tokens(example.input_ids), example.labels)
            if label != IGNORE_INDEX]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def tools_tok():
    tok = make_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    return tok


# ---- sources ---------------------------------------------------------------------------------------


def _reference(tmp_path, tok):
    """The QA rows as prompt/completion JSON lines: what every other source must give."""
    rows = [{"prompt": r["question"], "completion": r["answer"]} for r in QA]
    return data.load_examples(jsonl(tmp_path / "ref.jsonl", rows), tok, 32)[0]


def _write_table(tmp_path: Path, kind: str) -> Path:
    ds = datasets.Dataset.from_list(QA)
    path = tmp_path / f"qa.{kind}"
    if kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "arrow":
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, ds.data.table.schema) as writer:
            writer.write_table(ds.data.table)
    elif kind == "disk":
        ds.save_to_disk(str(path))
    elif kind == "disk-dict":
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["parquet", "csv", "arrow", "disk", "disk-dict"])
def test_tables_and_saved_datasets_give_the_same_examples_as_jsonl(tmp_path, tok, kind):
    path = _write_table(tmp_path, kind)
    examples, report = data.load_examples(path, tok, 32, columns="prompt=question,completion=answer")
    assert report.fmt == "completion" and report.rows_read == len(QA) and report.line_unit == "row"
    assert examples == _reference(tmp_path, tok)


def test_saved_dataset_dict_split_is_chosen(tmp_path, tok):
    path = _write_table(tmp_path, "disk-dict")
    examples, report = data.load_examples(path, tok, 32, columns="prompt=question,completion=answer", split="test")
    assert report.rows_read == 1 and examples == _reference(tmp_path, tok)[:1]
    with pytest.raises(DataError, match="no split 'dev'.*train, test"):
        data.load_examples(path, tok, 32, columns="prompt=question,completion=answer", split="dev")


def test_bad_table_rows_are_counted_with_their_row_numbers(tmp_path, tok):
    rows = [*QA[:2], {"question": "the king", "answer": None}, {"question": "a", "answer": "   "}]
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    examples, report = data.load_examples(path, tok, 32, columns="prompt=question,completion=answer")
    assert len(examples) == 2
    assert report.skipped == {"missing 'completion'": 1, "empty 'completion'": 1}
    assert report.bad_lines == [3, 4] and "rows 3, 4" in report.summary()


def test_csv_cells_stay_text(tmp_path, tok):
    """pandas would read '42' as a number and 'NA' as missing: the formats want the text."""
    path = tmp_path / "n.csv"
    path.write_text("prompt,completion\nthe king,42\nthe lord,NA\n", encoding="utf-8")
    examples, report = data.load_examples(path, tok, 32)
    assert report.n_skipped == 0 and len(examples) == 2


def test_columns_naming_a_missing_column_is_one_clear_error(tmp_path, tok):
    path = _write_table(tmp_path, "parquet")
    with pytest.raises(DataError, match="'query', which the data does not have.*answer, question"):
        data.load_examples(path, tok, 32, columns="prompt=query,completion=answer")
    with pytest.raises(ConfigError, match="not one of adaptune's names"):
        data.load_examples(path, tok, 32, columns="question=prompt")
    with pytest.raises(ConfigError, match="name=column pairs"):
        data.load_examples(path, tok, 32, columns="prompt")


def test_folder_that_is_not_a_saved_dataset_and_missing_files(tmp_path, tok):
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        data.load_examples(tmp_path, tok, 32)
    with pytest.raises(DataError, match="no such data file"):
        data.load_examples(tmp_path / "nothere.jsonl", tok, 32)


def test_hub_id_offline_is_one_line_naming_hf_hub_offline_and_the_cache(tok):
    with pytest.raises(DataError) as err:
        data.load_examples("someone/not-cached-dataset", tok, 32, split="train")
    text = str(err.value)
    assert "\n" not in text and "HF_HUB_OFFLINE" in text and "cache" in text
    assert text.startswith("someone/not-cached-dataset:")


def test_cli_hub_id_offline_exits_2_with_one_line_before_loading_the_model(tmp_path, capsys):
    from adaptune.cli import main

    code = main(["train", "--data", "someone/not-cached-dataset", "--data-config", "en", "--output",
                 str(tmp_path / "out"), "--model", str(tmp_path / "no-model-needed")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "HF_HUB_OFFLINE" in err[0] and "Traceback" not in err[0]


# ---- ShareGPT and tool calls -----------------------------------------------------------------------


def test_sharegpt_rows_train_every_gpt_turn_like_the_same_messages(tmp_path, tok):
    turns = [("system", "be the king"), ("human", "who is the lord"), ("gpt", "the king is the lord"),
             ("human", "and the water"), ("gpt", "down by the side")]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    share = jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": f, "value": v} for f, v in turns]},
                                         {"conversations": [{"from": "bot", "value": "x"}]}])
    chat = jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": roles[f], "content": v} for f, v in turns]}])
    (ex,), report = data.load_examples(share, tok, 64)
    (ref,), _ = data.load_examples(chat, tok, 64)
    assert report.fmt == "sharegpt" and ex == ref
    assert trained_tokens(tok, ex) == "the king is the lord </s> down by the side </s>".split()
    assert report.skipped == {"a turn's 'from' is not human, gpt or system": 1}


def test_tool_calls_are_rendered_and_every_assistant_turn_is_trained(tmp_path, tools_tok):
    (ex,), report = data.load_examples(jsonl(tmp_path / "t.jsonl", [TOOL_ROW]), tools_tok, 64)
    assert report.fmt == "chat" and report.n_skipped == 0
    text = tools_tok.convert_ids_to_tokens(ex.input_ids)
    assert text[:2] == ["<|system|>", "find"]  # the tools, rendered by the template
    # the tool-call turn (function name and argument) and the final answer; not the tool's reply
    assert trained_tokens(tools_tok, ex) == "find water </s> the water is down by the side </s>".split()


def test_tool_rows_from_a_table_with_null_fields(tmp_path, tools_tok):
    """Arrow gives every message every field (None where a message has none); tools as JSON text."""
    row = dict(TOOL_ROW, tools=json.dumps(TOOL_ROW["tools"]))
    path = tmp_path / "tools.parquet"
    datasets.Dataset.from_list([row, row]).to_parquet(str(path))
    examples, report = data.load_examples(path, tools_tok, 64)
    (ref,), _ = data.load_examples(jsonl(tmp_path / "t.jsonl", [TOOL_ROW]), tools_tok, 64)
    assert report.n_skipped == 0 and examples == [ref, ref]


def test_template_without_tool_support_counts_a_reason(tmp_path, tok):
    no_tools = {"messages": TOOL_ROW["messages"]}
    path = jsonl(tmp_path / "t.jsonl", [TOOL_ROW, no_tools, {"messages": [{"role": "user", "content": "the"},
                                                                           {"role": "assistant", "content": "king"}]}])
    examples, report = data.load_examples(path, tok, 64)
    assert len(examples) == 1
    assert report.skipped == {"the chat template does not render 'tools'": 1,
                              "the chat template does not render tool calls": 1}


def test_bad_tool_calls_are_counted(tmp_path, tools_tok):
    def row(call):
        messages = [TOOL_ROW["messages"][0], {"role": "assistant", "content": None, "tool_calls": [call]}]
        return {"messages": messages}

    path = jsonl(tmp_path / "t.jsonl", [
        row({"type": "function", "function": {"name": "find", "arguments": "{not json"}}),
        row({"type": "function", "function": {"arguments": {}}}),
        row({"type": "function", "function": {"name": "find", "arguments": "[1]"}}),
        {"messages": TOOL_ROW["messages"], "tools": "zzz"},
        TOOL_ROW,
    ])
    examples, report = data.load_examples(path, tools_tok, 64)
    assert len(examples) == 1
    assert report.skipped == {"tool call arguments is a string that is not JSON": 1,
                              "a tool call has no function name": 1, "tool call arguments are not a JSON object": 1,
                              "'tools' is a string that is not JSON": 1}


# ---- mixtures --------------------------------------------------------------------------------------


def _mixture_files(tmp_path: Path) -> tuple[Path, Path]:
    words = "the king lord water side time day one two people".split()
    a = jsonl(tmp_path / "a.jsonl", [{"prompt": f"{w} {v}", "completion": f"{v} {w}"}
                                     for w in words for v in words[:4]])
    b = tmp_path / "b.parquet"
    datasets.Dataset.from_list([{"q": f"find {w}", "a": f"{w} find"} for w in words]).to_parquet(str(b))
    return a, b


def test_weighted_mixture_gives_the_shares_and_says_so(tmp_path, tok):
    a, b = _mixture_files(tmp_path)
    sources = parse_sources([{"path": str(a), "weight": 1},
                             {"path": str(b), "weight": 1, "columns": {"prompt": "q", "completion": "a"}}])
    train, val, report = data.build_datasets(sources, tok, max_length=32, packing=False, val_fraction=0.1, seed=3)
    assert report.had == [36, 9] and report.gave == [23, 22] and len(train) == 45
    assert "a.jsonl gave 23 of its 36 training examples (weight 1, 50%)" in report.summary()
    assert "b.parquet gave 22 of its 9 training examples" in report.summary()
    # b's 9 examples repeat (twice each, then 4 more); validation never shares an example with training
    from_b = [f["input_ids"] for f in train if tok.convert_ids_to_tokens(f["input_ids"])[0] == "find"]
    assert len(from_b) == 22 and len({tuple(x) for x in from_b}) == 9
    assert not {tuple(f["input_ids"]) for f in val} & {tuple(f["input_ids"]) for f in train}
    again, _, _ = data.build_datasets(sources, tok, max_length=32, packing=False, val_fraction=0.1, seed=3)
    other, _, _ = data.build_datasets(sources, tok, max_length=32, packing=False, val_fraction=0.1, seed=4)
    assert again == train and other != train


def test_mixture_without_weights_is_every_example_once(tmp_path, tok):
    a, b = _mixture_files(tmp_path)
    train, _, report = data.build_datasets([str(a), {"path": str(b), "columns": "prompt=q,completion=a"}], tok,
                                           max_length=32, packing=True, val_fraction=0.0)
    assert report.gave == report.had == [40, 10] and report.train_examples == 50
    assert report.train_blocks == len(train) < 50


def test_mixture_config_errors():
    with pytest.raises(ConfigError, match="every data source a weight, or none"):
        parse_sources([{"path": "a/b", "weight": 1}, {"path": "c/d"}])
    with pytest.raises(ConfigError, match="unknown keys fromat"):
        parse_sources([{"path": "a/b", "fromat": "chat"}])
    with pytest.raises(ConfigError, match="weight must be a positive number"):
        DataSource("a/b", weight=0)
    with pytest.raises(ConfigError, match="needs a path"):
        parse_sources([{"weight": 1}])


def test_yaml_mixture_reaches_the_data(tmp_path, tok):
    from adaptune.training.job import TrainJob

    a, b = _mixture_files(tmp_path)
    config = tmp_path / "job.yaml"
    config.write_text(f"data:\n  - path: {a}\n    weight: 3\n  - path: {b}\n    weight: 1\n"
                      "    format: completion\n    columns: prompt=q,completion=a\n", encoding="utf-8")
    job = TrainJob.from_yaml(config)
    sources = parse_sources(job.data, job.data_format, job.columns, job.data_split, job.data_config)
    assert [s.weight for s in sources] == [3, 1] and sources[1].columns == {"prompt": "q", "completion": "a"}
    _, _, report = data.build_datasets(sources, tok, max_length=32, val_fraction=0.0)
    assert report.gave == [38, 12]
