"""adaptune.data: formats, label masks, bad-row reports, splitting, packing and collating."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

import adaptune.data as data
from adaptune.data import IGNORE_INDEX, DataCollator, Example, packing, tokens
from adaptune.errors import DataError
from tests.tiny import make_tokenizer

# --------------------------------------------------------------------------- helpers


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def segments(position_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each packed example: where the position ids restart at 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts, starts[1:]))


def trained(example: Example) -> list[int]:
    """Positions whose label carries loss."""
    return [i for i, x in enumerate(example.labels) if x != IGNORE_INDEX]


@pytest.fixture(scope="module")
def byte_tok():
    """A byte-level tokenizer (one token per byte, exact decode) with the same chat template."""
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(["<pad>", "<s>", "</s>"] + alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = make_tokenizer().chat_template
    return tok


@pytest.fixture
def bos_tok():
    """The word tokenizer, but adding BOS by itself the way Llama's does."""
    tok = make_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


CHAT = [
    {"role": "system", "content": "you are a king"},
    {"role": "user", "content": "what is love"},
    {"role": "assistant", "content": "love is a word"},
    {"role": "user", "content": "and water"},
    {"role": "assistant", "content": "water is water"},
]

# --------------------------------------------------------------------------- plain text


def test_text_file_is_split_into_blocks_with_loss_everywhere(tmp_path, tokenizer):
    words = "the king and the lord"  # 5 tokens a line
    path = write(tmp_path, "t.txt", "\n".join([words] * 3) + "\n")  # 15 tokens + EOS = 16
    examples, report = data.load_examples(path, tokenizer, max_length=6)
    stream = ids(tokenizer, words) * 3 + [tokenizer.eos_token_id]
    assert [len(e) for e in examples] == [6, 6, 4]
    assert [t for e in examples for t in e.input_ids] == stream
    assert all(e.labels == e.input_ids for e in examples)
    assert report.fmt == "text" and report.rows_read == 3 and report.skipped == {}
    assert report.tokens == report.trained_tokens == 16


def test_text_tail_of_one_token_is_dropped_and_counted(tmp_path, tokenizer):
    path = write(tmp_path, "t.txt", "the king and the lord")  # 5 tokens + EOS = 6 = 5 + 1
    examples, report = data.load_examples(path, tokenizer, max_length=5)
    assert [len(e) for e in examples] == [5]
    assert sum(report.skipped.values()) == 1 and "tail" in report.summary()


def test_chunked_text_tokenization_equals_one_call(tmp_path, tokenizer, monkeypatch):
    lines = [" ".join(random.Random(i).choices(["the", "king", "lord", "love", "water"], k=7))
             for i in range(200)]
    text = "\n".join(lines) + "\n"
    monkeypatch.setattr(tokens, "TEXT_CHUNK_CHARS", 100)
    assert len(tokens._text_chunks(text, 100)) > 10
    assert tokens.encode_long(tokenizer, text) == ids(tokenizer, text)


class _PrefixEveryCall:
    """Stands in for a tokenizer that adds a marker at the start of every call (SentencePiece's
    prefix space): chunking would change its tokens, so data must fall back to one call."""

    def __init__(self, tok):
        self.tok = tok
        self.calls = 0

    def __call__(self, text, **kw):
        self.calls += 1
        out = self.tok(text, **kw)
        if isinstance(text, str):
            return {"input_ids": [3] + out["input_ids"]}
        return {"input_ids": [[3] + x for x in out["input_ids"]]}


def test_chunking_falls_back_to_one_call_when_tokens_would_change(tokenizer, monkeypatch):
    text = "".join(f"the king {w}\n" for w in ["lord", "love", "water"] * 40)
    monkeypatch.setattr(tokens, "TEXT_CHUNK_CHARS", 60)
    fake = _PrefixEveryCall(tokenizer)
    assert tokens.encode_long(fake, text) == [3] + ids(tokenizer, text)


def test_bos_added_once_per_example_not_per_chunk(tmp_path, bos_tok, monkeypatch):
    monkeypatch.setattr(tokens, "TEXT_CHUNK_CHARS", 30)
    bos = bos_tok.bos_token_id
    path = write(tmp_path, "t.txt", "the king and the lord\n" * 20)
    examples, _ = data.load_examples(path, bos_tok, max_length=64)
    stream = [t for e in examples for t in e.input_ids]
    assert stream[0] == bos and stream.count(bos) == 1
    rows = jsonl(tmp_path, [{"prompt": "the king", "completion": "a lord"}])
    (ex,), _ = data.load_examples(rows, bos_tok, max_length=64)
    assert ex.input_ids == [bos] + ids(bos_tok, "the king") + ids(bos_tok, "a lord") + [2]
    assert trained(ex) == [3, 4, 5]


# --------------------------------------------------------------------------- label masks


def test_completion_masks_the_prompt_and_appends_eos(tmp_path, tokenizer):
    path = jsonl(tmp_path, [{"prompt": "the king said", "completion": "love is water"},
                            {"prompt": "the lord", "completion": "a king </s>"}])
    (a, b), report = data.load_examples(path, tokenizer, max_length=32)
    eos = tokenizer.eos_token_id
    p, c = ids(tokenizer, "the king said"), ids(tokenizer, "love is water")
    assert a.input_ids == p + c + [eos]
    assert a.labels == [IGNORE_INDEX] * len(p) + c + [eos]
    assert b.input_ids.count(eos) == 1 and b.input_ids[-1] == eos  # EOS not doubled
    assert report.fmt == "completion"
    assert report.trained_tokens == len(c) + 1 + 3


def test_train_on_prompt_trains_every_token(tmp_path, tokenizer):
    path = jsonl(tmp_path, [{"prompt": "the king said", "completion": "love is water"}])
    (ex,), _ = data.load_examples(path, tokenizer, max_length=32, train_on_prompt=True)
    assert ex.labels == ex.input_ids


def test_chat_trains_only_assistant_turns_and_their_end_token(tmp_path, tokenizer):
    path = jsonl(tmp_path, [{"messages": CHAT}])
    (ex,), report = data.load_examples(path, tokenizer, max_length=64)
    assert report.fmt == "chat"
    # The test template writes "<|role|> content </s> " per message: build the expected mask from
    # that by hand, independently of the prefix rendering data.py does.
    exp_ids, exp_labels = [], []
    for m in CHAT:
        role = ids(tokenizer, f"<|{m['role']}|>")
        body = ids(tokenizer, m["content"]) + [tokenizer.eos_token_id]
        exp_ids += role + body
        exp_labels += [IGNORE_INDEX] * len(role)
        exp_labels += body if m["role"] == "assistant" else [IGNORE_INDEX] * len(body)
    assert ex.input_ids == exp_ids
    assert ex.labels == exp_labels
    (all_on,), _ = data.load_examples(path, tokenizer, max_length=64, train_on_prompt=True)
    assert all_on.labels == all_on.input_ids


def test_chat_spans_are_exact_with_a_byte_tokenizer(tmp_path, byte_tok):
    path = jsonl(tmp_path, [{"messages": CHAT}])
    (ex,), _ = data.load_examples(path, byte_tok, max_length=512)
    pieces, current = [], []
    for i in range(len(ex)):  # contiguous trained runs, decoded
        if ex.labels[i] != IGNORE_INDEX:
            current.append(ex.input_ids[i])
        elif current:
            pieces.append(byte_tok.decode(current))
            current = []
    if current:
        pieces.append(byte_tok.decode(current))
    assert pieces == ["love is a word </s> ", "water is water </s> "]


def test_chat_template_whose_prompt_is_not_a_prefix(tmp_path):
    """Generation prompt 'A:' while the full text writes 'A: content': still found exactly."""
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|> ' + m['content'] + ' ' }}"
        "{% else %}{{ '<|assistant|>' + ' ' + m['content'] + ' </s> ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    msgs = [{"role": "user", "content": "the king"}, {"role": "assistant", "content": "a lord"}]
    (ex,), _ = data.load_examples(jsonl(tmp_path, [{"messages": msgs}]), tok, max_length=32)
    assert [ex.input_ids[i] for i in trained(ex)] == ids(tok, "a lord") + [tok.eos_token_id]


def test_alpaca_prompt_template_and_mask(tmp_path, byte_tok):
    rows = [{"instruction": "Add one.", "input": "2", "output": "3"},
            {"instruction": "Say hi.", "output": "hi"}]
    (with_input, without), report = data.load_examples(jsonl(tmp_path, rows), byte_tok, 1024)
    assert report.fmt == "alpaca"
    for ex, output in ((with_input, "3"), (without, "hi")):
        n = len(trained(ex))
        assert trained(ex) == list(range(len(ex) - n, len(ex)))  # exactly the tail is trained
        assert byte_tok.decode(ex.input_ids[-n:]) == output + "</s>"
    assert byte_tok.decode(with_input.input_ids[:-2]) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd one.\n\n### Input:\n2\n\n### Response:\n")
    assert "### Input:" not in byte_tok.decode(without.input_ids)
    tail = "### Instruction:\nSay hi.\n\n### Response:\nhi</s>"
    assert byte_tok.decode(without.input_ids).endswith(tail)


def test_jsonl_text_rows_are_separate_documents(tmp_path, tokenizer):
    path = jsonl(tmp_path, [{"text": "the king"}, {"text": "a lord and the water"}])
    examples, report = data.load_examples(path, tokenizer, max_length=4)
    eos = tokenizer.eos_token_id
    assert [e.input_ids for e in examples] == [ids(tokenizer, "the king") + [eos],
                                               ids(tokenizer, "a lord and the"),
                                               ids(tokenizer, "water") + [eos]]
    assert all(e.labels == e.input_ids for e in examples) and report.fmt == "text"


# --------------------------------------------------------------------------- overlong rows


def test_overlong_truncate_or_drop(tmp_path, tokenizer):
    long = {"prompt": "the king", "completion": " ".join(["love"] * 20)}
    short = {"prompt": "the king", "completion": "a lord"}
    prompt_only = {"prompt": " ".join(["the"] * 20), "completion": "a lord"}
    path = jsonl(tmp_path, [long, short, prompt_only])
    cut, report = data.load_examples(path, tokenizer, max_length=8)
    assert [len(e) for e in cut] == [8, 5] and report.truncated == 1
    assert report.skipped == {"no trained tokens within max_length 8": 1}
    assert report.bad_lines == [3]
    kept, report = data.load_examples(path, tokenizer, max_length=8, overlong="drop")
    assert [len(e) for e in kept] == [5] and report.truncated == 0
    assert report.skipped == {"longer than max_length 8": 2}


# --------------------------------------------------------------------------- bad input


def test_bad_rows_are_counted_by_reason_with_line_numbers(tmp_path, tokenizer):
    lines = [
        json.dumps({"prompt": "the", "completion": "king"}),  # 1 good
        "{not json",                                          # 2
        json.dumps([1, 2]),                                   # 3
        json.dumps({"prompt": "the"}),                        # 4 missing completion
        "",                                                   # 5 blank: not a row
        json.dumps({"prompt": "the", "completion": 7}),       # 6 wrong type
        json.dumps({"prompt": "the", "completion": "  "}),    # 7 empty
        json.dumps({"prompt": "the", "completion": "lord"}),  # 8 good
        "{still not json",                                    # 9
    ]
    path = write(tmp_path, "rows.jsonl", "\n".join(lines) + "\n")
    examples, report = data.load_examples(path, tokenizer, max_length=16)
    assert len(examples) == report.examples_kept == 2
    assert report.rows_read == 8
    assert report.skipped == {"invalid JSON": 2, "not a JSON object": 1, "missing 'completion'": 1,
                              "'completion' is not a string": 1, "empty 'completion'": 1}
    assert report.bad_lines == [2, 3, 4, 6, 7]  # the first five
    text = report.summary()
    assert "skipped 6" in text and "2 invalid JSON" in text and "lines 2, 3, 4, 6, 7" in text


def test_bad_chat_rows(tmp_path, tokenizer):
    rows = [{"messages": CHAT},
            {"messages": [{"role": "user", "content": "the king"}]},
            {"messages": "the king"},
            {"messages": [{"role": "user", "content": None},
                          {"role": "assistant", "content": "a"}]}]
    _, report = data.load_examples(jsonl(tmp_path, rows), tokenizer, max_length=64)
    assert report.examples_kept == 1
    assert report.skipped == {"no assistant turn": 1, "'messages' is not a non-empty list": 1,
                              "a message is not {role: str, content: str}": 1}
    assert report.bad_lines == [2, 3, 4]


def test_chat_template_errors_are_bad_rows(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                         "{% endif %}" + tok.chat_template)
    rows = [{"messages": CHAT[1:3]}, {"messages": CHAT}]  # the second starts with system
    _, report = data.load_examples(jsonl(tmp_path, rows), tok, max_length=64)
    assert report.examples_kept == 1 and report.bad_lines == [2]
    assert list(report.skipped) == ["chat template error (TemplateError)"]


def test_json_array_rows_are_numbered_by_item(tmp_path, tokenizer):
    path = write(tmp_path, "d.json", json.dumps([{"text": "the king"}, {"text": 3}, {"text": "a"}]))
    examples, report = data.load_examples(path, tokenizer, max_length=8)
    assert len(examples) == 2 and report.line_unit == "item" and report.bad_lines == [2]
    assert "items 2" in report.summary()


@pytest.mark.parametrize("name,content,needle", [
    ("empty.jsonl", "", "empty"),
    ("blank.txt", "  \n\n", "empty"),
    ("latin1.txt", "the king caf\xe9".encode("latin-1"), "UTF-8"),
    ("nogood.jsonl", '{"prompt": "the"}\n{"prompt": "a"}\n', "no usable rows"),
    ("unknown.jsonl", '{"question": "the"}\n', "cannot tell the data format"),
])
def test_unusable_files_raise_data_error_naming_the_file(tmp_path, tokenizer, name, content,
                                                         needle):
    path = write(tmp_path, name, content)
    fmt = "completion" if "nogood" in name else None
    with pytest.raises(DataError) as err:
        data.load_examples(path, tokenizer, max_length=16, fmt=fmt)
    message = str(err.value)
    assert name in message and needle in message and "\n" not in message


def test_zero_good_rows_message_gives_the_reasons(tmp_path, tokenizer):
    path = jsonl(tmp_path, [{"prompt": "the", "completion": None},
                            {"prompt": "a", "completion": None}])
    expected = r"data.jsonl: no usable rows.*2 missing 'completion'.*lines 1, 2"
    with pytest.raises(DataError, match=expected):
        data.load_examples(path, tokenizer, max_length=16)


def test_missing_file_and_chat_without_template(tmp_path, tokenizer):
    with pytest.raises(DataError, match="nothere.txt"):
        data.load_examples(tmp_path / "nothere.txt", tokenizer, max_length=16)
    tok = make_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="chat.jsonl.*chat template"):
        data.load_examples(jsonl(tmp_path, [{"messages": CHAT}], "chat.jsonl"), tok, max_length=16)


def test_detect_format_and_override(tmp_path, tokenizer):
    assert data.detect_format(write(tmp_path, "a.txt", "the king")) == "text"
    json_in_md = write(tmp_path, "a.md", '{"prompt": "x", "completion": "y"}')
    assert data.detect_format(json_in_md) == "text"
    cases = {"completion": {"prompt": "the", "completion": "king"}, "chat": {"messages": CHAT},
             "alpaca": {"instruction": "the", "output": "king"}, "text": {"text": "the king"}}
    for fmt, row in cases.items():
        assert data.detect_format(jsonl(tmp_path, [row, row], f"{fmt}.jsonl")) == fmt
    # Majority of rows decides; the odd row is then a bad row of the chosen format.
    mixed = jsonl(tmp_path, [cases["text"], cases["completion"], cases["completion"]], "mix.jsonl")
    assert data.detect_format(mixed) == "completion"
    # fmt= overrides: the same rows read as text rows.
    both = jsonl(tmp_path, [{"text": "the king", "prompt": "a", "completion": "lord"}],
                 "both.jsonl")
    assert data.detect_format(both) == "completion"
    (ex,), report = data.load_examples(both, tokenizer, 16, fmt="text")
    assert report.fmt == "text" and ex.input_ids == ids(tokenizer, "the king") + [2]


# --------------------------------------------------------------------------- validation split


def test_split_validation_is_deterministic_and_disjoint():
    items = list(range(100))
    train, val = data.split_validation(items, val_fraction=0.1, seed=3)
    assert (train, val) == data.split_validation(items, val_fraction=0.1, seed=3)
    assert len(val) == 10 and sorted(train + val) == items and not set(train) & set(val)
    assert data.split_validation(items, 0.1, seed=4)[1] != val  # the seed matters
    assert train == sorted(train) and val == sorted(val)  # file order kept
    assert len(data.split_validation(list(range(5)), 0.05)[1]) == 1  # min_val=1
    assert len(data.split_validation(list(range(5)), 0.05, min_val=3)[1]) == 3
    assert data.split_validation(items, 0.0) == (items, [])
    assert data.split_validation([7], 0.5) == ([7], [])  # never empties the train side


# --------------------------------------------------------------------------- packing


def _naive_first_fit(lengths, capacity):
    bins, room = [], []
    for i, n in enumerate(lengths):
        for b, r in enumerate(room):
            if r >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def test_first_fit_matches_the_plain_algorithm():
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 32) for _ in range(rng.randint(1, 60))]
        assert packing._first_fit(lengths, 32) == _naive_first_fit(lengths, 32)


def test_pack_examples_keeps_examples_whole(tokenizer):
    rng = random.Random(1)
    examples = []
    for _ in range(40):
        n = rng.randint(2, 12)
        toks = [rng.randint(3, 150) for _ in range(n)]
        labels = [IGNORE_INDEX] * (n // 2) + toks[n // 2:]
        examples.append(Example(toks, labels))
    blocks = data.pack_examples(examples, max_length=16)
    assert len(blocks) < len(examples)
    seen = []
    for block in blocks:
        assert len(block["input_ids"]) == len(block["labels"]) == len(block["position_ids"]) <= 16
        spans = segments(block["position_ids"])
        assert block["position_ids"] == [p for a, b in spans for p in range(b - a)]
        for a, b in spans:
            seen.append((block["input_ids"][a:b], block["labels"][a:b]))
    assert len(seen) == len(examples)
    for ex in examples:  # each example once, unsplit; its first label is -100, the rest kept
        assert (ex.input_ids, [IGNORE_INDEX] + ex.labels[1:]) in seen
    with pytest.raises(ValueError):
        data.pack_examples([Example([1] * 20, [1] * 20)], max_length=16)


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_packed_logits_equal_unpacked_logits(model_name, request):
    """Each example inside a packed, padded batch gets exactly the logits it gets alone."""
    model = request.getfixturevalue(model_name)
    rng = random.Random(2)
    examples = [Example(t, t) for t in ([rng.randint(3, 150) for _ in range(rng.randint(2, 9))]
                                        for _ in range(7))]
    blocks = data.pack_examples(examples, max_length=16)
    assert any(len(segments(b["position_ids"])) > 1 for b in blocks)  # really packed
    batch = DataCollator(pad_token_id=0, packing=True)(blocks)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        checked = 0
        for row, block in enumerate(blocks):
            for a, b in segments(block["position_ids"]):
                alone = model(input_ids=torch.tensor([block["input_ids"][a:b]])).logits[0]
                torch.testing.assert_close(packed[row, a:b], alone, atol=1e-5, rtol=0)
                checked += 1
    assert checked == len(examples)


def test_packed_loss_equals_sum_of_unpacked_losses(llama):
    """The -100 on each packed example's first label removes the one cross-example prediction."""
    rng = random.Random(4)
    examples = [Example(t, t) for t in ([rng.randint(3, 150) for _ in range(rng.randint(3, 8))]
                                        for _ in range(5))]
    batch = DataCollator(0, packing=True)(data.pack_examples(examples, max_length=32))

    def token_loss_sum(logits, labels):
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
            reduction="sum")

    with torch.no_grad():
        logits = llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        packed = token_loss_sum(logits, batch["labels"])
        alone = sum(token_loss_sum(llama(input_ids=torch.tensor([e.input_ids])).logits,
                                   torch.tensor([e.labels])) for e in examples)
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-5)


def test_supports_packing_probe(llama, gpt2):
    llama.train()
    assert data.supports_packing(llama) and llama.training  # mode restored
    assert data.supports_packing(gpt2) and not gpt2.training

    class SeesEverything(torch.nn.Module):
        """A causal LM that ignores position_ids: each logit sums all tokens so far."""

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, input_ids, position_ids=None, use_cache=None):
            return type("Out", (), {"logits": self.emb(input_ids).cumsum(1)})()

    assert not data.supports_packing(SeesEverything())
    assert not data.supports_packing(torch.nn.Linear(2, 2))  # errors mean "no"


# --------------------------------------------------------------------------- collator


def test_collator_dynamic_padding():
    feats = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7]),
             {"input_ids": torch.tensor([8]), "labels": [8]}]
    batch = DataCollator(pad_token_id=0, packing=False)(feats)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    wide = DataCollator(0, packing=False, pad_to_multiple_of=8)(feats)
    assert wide["input_ids"].shape == (2, 8) and wide["attention_mask"][0].sum() == 3
    with pytest.raises(ValueError, match="packing=True"):
        DataCollator(0, packing=False)(data.pack_examples([Example([1, 2], [1, 2])] * 2, 8))


def test_collator_pad_as_eos_keeps_eos_trained(tokenizer):
    tok = make_tokenizer()
    tok.pad_token = None
    eos = data.pad_token_id_for(tok)
    assert eos == tok.eos_token_id
    rows = [Example([5, eos], [5, eos]), Example([5, 6, 7, eos], [5, 6, 7, eos])]
    batch = DataCollator(eos, packing=False)(rows)
    assert batch["labels"][0].tolist() == [5, eos, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["input_ids"][0].tolist() == [5, eos, eos, eos]


def test_collator_packed_padding():
    blocks = data.pack_examples([Example([5, 6, 7], [5, 6, 7]), Example([8, 9], [8, 9]),
                                 Example([1, 2, 3, 4], [1, 2, 3, 4])], max_length=5)
    batch = DataCollator(pad_token_id=0, packing=True, pad_to_multiple_of=3)(blocks)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [1, 2, 3, 4, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100], [-100, 2, 3, 4, -100, -100]]


# --------------------------------------------------------------------------- build_datasets


def test_build_datasets_keeps_val_out_of_train_blocks(tmp_path, tokenizer):
    words = ["the", "king", "lord", "love", "water", "day", "people", "first"]
    rows = [{"prompt": f"{words[i % 8]} {words[i // 8]}", "completion": f"{words[(i * 3) % 8]} is"}
            for i in range(64)]
    path = jsonl(tmp_path, rows)
    train, val, report = data.build_datasets(path, tokenizer, max_length=16, val_fraction=0.25,
                                             seed=1)
    assert report.train_examples == 48 and report.val_examples == 16
    assert report.train_blocks == len(train) < 48 and all("position_ids" in f for f in train + val)
    val_prompts = {tuple(v["input_ids"][a:a + 2]) for v in val
                   for a, _ in segments(v["position_ids"])}
    train_prompts = {tuple(t["input_ids"][a:a + 2]) for t in train
                     for a, _ in segments(t["position_ids"])}
    assert len(val_prompts) == 16 and len(train_prompts) == 48 and not val_prompts & train_prompts
    plain_train, plain_val, _ = data.build_datasets(path, tokenizer, 16, packing=False,
                                                    val_fraction=0.25, seed=1, max_examples=20)
    assert len(plain_train) + len(plain_val) == 20 and "position_ids" not in plain_train[0]
    batch = DataCollator(0, packing=False)(plain_train[:4])
    assert batch["input_ids"].shape[0] == 4


def test_default_data_builds(tokenizer):
    path = data.default_data_path()
    assert path.is_file() and path.name == "shakespeare.txt"
    train, val, report = data.build_datasets(path, tokenizer, max_length=128)
    assert report.fmt == "text" and val and all(len(f["input_ids"]) <= 128 for f in train)
    assert "shakespeare.txt (text)" in report.summary()
