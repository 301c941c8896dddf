"""Property-based fuzzing of the loaders that read user files.

* ``PeftConfig.from_dict`` / ``PeftConfig.from_pretrained`` on random JSON (and random bytes as
  ``adapter_config.json``): the result is a config whose fields all have their declared types and
  that writes and reads back to itself, or an ``AdaptuneError``; never another exception.
* ``adaptune.data.load_examples`` with the tiny test tokenizer on random bytes and on random
  JSON-lines rows (text, prompt/completion, chat, alpaca shapes with random values, bad JSON, lone
  surrogates, deep nesting): examples + a consistent report, or a ``DataError``.

The default suite runs a fixed number of cases per property (``N_DEFAULT``); ``-m slow`` runs
``N_SLOW``. Each test prints how many cases it ran (visible with ``-s``).
"""

from __future__ import annotations

import json
import math
import typing
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptune.config import CONFIG_CLASSES, CONFIG_NAME, PeftConfig
from adaptune.data import IGNORE_INDEX, load_examples
from adaptune.errors import AdaptuneError, DataError
from tests.tiny import VOCAB, WORDS, make_tokenizer

N_DEFAULT = 300
N_SLOW = 3000
MAX_LENGTH = 24

TOKENIZER = make_tokenizer()


def _settings(n: int):
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ---- strategies ----------------------------------------------------------------------------------
# Characters that stress text handling: lone surrogates (legal in JSON escapes, not encodable),
# NUL and other controls, combining marks, emoji, the BOM, line/paragraph separators.
ODD_CHARS = ["\ud800", "\udfff", "\x00", "\x1b", "\u0301", "\U0001f600", "\ufeff", "\u2028", "\r", "\t"]
words = st.lists(st.sampled_from(WORDS), min_size=0, max_size=12).map(" ".join)
odd_text = st.lists(st.one_of(st.sampled_from(ODD_CHARS), st.sampled_from(WORDS), st.text(max_size=5)),
                    max_size=8).map("".join)
any_text = st.one_of(words, odd_text, st.text(max_size=20))
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), any_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(any_text, inner, max_size=4)),
                           max_leaves=12)

FIELD_NAMES = sorted({f for cls in CONFIG_CLASSES.values() for f in cls.__dataclass_fields__})
PLAUSIBLE = {  # values of the right shape, so that the fuzzer gets past the first type check
    "r": st.integers(-2, 64), "lora_alpha": st.one_of(st.integers(-2, 64), st.floats(-10, 100)),
    "lora_dropout": st.floats(-0.5, 1.5), "bias": st.sampled_from(["none", "all", "lora_only", "some"]),
    "target_modules": st.one_of(st.none(), st.just("all-linear"),
                                st.lists(st.sampled_from(["q_proj", "v_proj", "c_attn"]))),
    "task_type": st.sampled_from(["CAUSAL_LM", "SEQ_CLS", "causal_lm", "NOPE", None]),
    "peft_type": st.sampled_from(list(CONFIG_CLASSES) + ["LOHA", "lora", None]),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "pissa_niter_4", "olora"]),
    "rank_pattern": st.dictionaries(any_text, st.one_of(st.integers(-1, 16), scalars), max_size=3),
    "alpha_pattern": st.dictionaries(any_text, st.one_of(st.floats(), scalars), max_size=3),
    "layers_to_transform": st.one_of(st.none(), st.integers(-1, 4), st.lists(st.integers(-1, 4), max_size=3)),
    "fused_slices": st.one_of(st.none(), st.dictionaries(
        st.sampled_from(["c_attn"]), st.lists(st.sampled_from(["q_attn", "v_attn", 1]), max_size=3))),
    "num_virtual_tokens": st.integers(-2, 40), "prompt_tuning_init": st.sampled_from(["RANDOM", "TEXT", "x"]),
    "encoder_reparameterization_type": st.sampled_from(["MLP", "LSTM", "GRU"]),
    "use_dora": st.booleans(), "use_rslora": st.booleans(), "inference_mode": st.booleans(),
}


@st.composite
def config_dicts(draw):
    """Mostly config-shaped dicts (known keys, plausible or random values), sometimes any JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    keys = draw(st.lists(st.sampled_from(FIELD_NAMES + ["peft_version", "auto_mapping", "unknown_field", ""]),
                         max_size=8, unique=True))
    data = {"peft_type": draw(PLAUSIBLE["peft_type"])} if draw(st.booleans()) else {}
    for key in keys:
        strategy = PLAUSIBLE.get(key) if draw(st.integers(0, 3)) else None
        data[key] = draw(strategy if strategy is not None else json_values)
    return data


def _check_config(config: PeftConfig) -> None:
    """A loaded config: every field of its declared type, written and read back unchanged."""
    from adaptune.schema import conforms

    hints = typing.get_type_hints(type(config))
    for name in config.__dataclass_fields__:
        assert conforms(getattr(config, name), hints[name]), (name, getattr(config, name))
    data = config.to_dict()
    text = json.dumps(data, allow_nan=False)  # what save_pretrained writes must be strict JSON
    again = PeftConfig.from_dict(json.loads(text))
    assert type(again) is type(config)
    assert again.to_dict() == data


chat_messages = st.lists(st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), scalars),
     "content": st.one_of(words, any_text, scalars)}), max_size=4)
row_values = st.one_of(words, any_text, scalars)
rows = st.one_of(
    st.fixed_dictionaries({"text": row_values}),
    st.fixed_dictionaries({"prompt": row_values, "completion": row_values}),
    st.fixed_dictionaries({"messages": st.one_of(chat_messages, scalars)}),
    st.fixed_dictionaries({"instruction": row_values, "output": row_values}, optional={"input": row_values}),
    json_values,
)


@st.composite
def jsonl_bytes(draw) -> bytes:
    lines = []
    for row in draw(st.lists(rows, max_size=12)):
        kind = draw(st.integers(0, 19))
        if kind == 0:
            lines.append(draw(st.sampled_from(["{", "not json", "[" * 3000 + "]" * 3000, '{"text": "a"',
                                               "\ufeff{}", "NaN", '"\\ud800"', ""])))
        else:
            lines.append(json.dumps(row, ensure_ascii=bool(kind % 2)))
    text = draw(st.sampled_from(["\n", "\r\n"])).join(lines)
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        data += draw(st.binary(max_size=8))
    return data


def _check_loaded(path: Path, fmt: str | None = None) -> str:
    """Load; the result is examples + a consistent report, or a DataError. Returns the outcome."""
    try:
        examples, report = load_examples(path, TOKENIZER, MAX_LENGTH, fmt=fmt)
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return "DataError"
    assert examples and report.examples_kept == len(examples)
    assert report.tokens == sum(len(e) for e in examples)
    for e in examples:
        assert 0 < len(e) <= MAX_LENGTH and len(e.labels) == len(e.input_ids)
        assert all(0 <= t < VOCAB for t in e.input_ids)
        assert all(label == IGNORE_INDEX or label == t for label, t in zip(e.labels, e.input_ids))
    assert report.rows_read >= 0 and report.n_skipped >= 0
    report.summary()
    return "loaded"


# ---- the properties ------------------------------------------------------------------------------
class Counter:
    def __init__(self, label: str):
        self.label, self.cases, self.outcomes = label, 0, {}

    def add(self, outcome: str) -> None:
        self.cases += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def report(self, capsys) -> None:
        with capsys.disabled():
            print(f"\n[fuzz] {self.label}: {self.cases} cases {self.outcomes}")


def _config_from_dict(n: int, capsys) -> None:
    counter = Counter("PeftConfig.from_dict")

    @_settings(n)
    @given(config_dicts())
    def prop(data):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                config = PeftConfig.from_dict(data, source="fuzz.json")
            except AdaptuneError as exc:
                assert "\n" not in str(exc)
                counter.add(type(exc).__name__)
                return
            _check_config(config)
        counter.add("loaded")

    prop()
    counter.report(capsys)
    assert counter.cases >= n // 2 and counter.outcomes.get("loaded", 0) > 0


def _config_from_file(n: int, folder: Path, capsys) -> None:
    counter = Counter("PeftConfig.from_pretrained")
    text_or_bytes = st.one_of(config_dicts().map(lambda d: json.dumps(d).encode()),
                              config_dicts().map(lambda d: json.dumps(d)[: len(json.dumps(d)) // 2].encode()),
                              st.binary(max_size=64), st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n))

    @_settings(n)
    @given(text_or_bytes)
    def prop(raw):
        (folder / CONFIG_NAME).write_bytes(raw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                config = PeftConfig.from_pretrained(folder)
            except AdaptuneError as exc:
                assert "\n" not in str(exc) and CONFIG_NAME in str(exc)
                counter.add(type(exc).__name__)
                return
            _check_config(config)
        counter.add("loaded")

    prop()
    counter.report(capsys)
    assert counter.cases >= n // 2


def _data_random_bytes(n: int, folder: Path, capsys) -> None:
    counter = Counter("load_examples(random bytes)")
    raw_text = st.one_of(st.binary(max_size=200),
                         st.lists(st.one_of(words, odd_text), max_size=20).map(lambda ls: "\n".join(ls).encode(
                             "utf-8", "surrogatepass")))

    @_settings(n)
    @given(raw_text, st.sampled_from(["data.txt", "data.jsonl", "data.json", "data.md"]))
    def prop(raw, name):
        path = folder / name
        path.write_bytes(raw)
        counter.add(_check_loaded(path))

    prop()
    counter.report(capsys)
    assert counter.cases >= n // 2


def _data_jsonl_rows(n: int, folder: Path, capsys) -> None:
    counter = Counter("load_examples(random jsonl rows)")

    @_settings(n)
    @given(jsonl_bytes(), st.sampled_from(["data.jsonl", "data.json"]),
           st.sampled_from([None, None, None, "text", "completion", "chat", "alpaca"]))
    def prop(raw, name, fmt):
        path = folder / name
        path.write_bytes(raw)
        counter.add(_check_loaded(path, fmt))

    prop()
    counter.report(capsys)
    assert counter.cases >= n // 2 and counter.outcomes.get("loaded", 0) > 0


@pytest.fixture
def folder(tmp_path):
    return tmp_path


def test_fuzz_config_from_dict(capsys):
    _config_from_dict(N_DEFAULT, capsys)


def test_fuzz_config_from_pretrained(folder, capsys):
    _config_from_file(N_DEFAULT, folder, capsys)


def test_fuzz_load_examples_random_bytes(folder, capsys):
    _data_random_bytes(N_DEFAULT, folder, capsys)


def test_fuzz_load_examples_random_jsonl_rows(folder, capsys):
    _data_jsonl_rows(N_DEFAULT, folder, capsys)


@pytest.mark.slow
def test_fuzz_slow_all(folder, capsys):
    _config_from_dict(N_SLOW, capsys)
    _config_from_file(N_SLOW, folder, capsys)
    _data_random_bytes(N_SLOW, folder, capsys)
    _data_jsonl_rows(N_SLOW, folder, capsys)


def test_nan_in_loaded_config_is_refused():
    """NaN/inf are legal in Python's JSON reader; a config holding them is refused, not kept."""
    with pytest.raises(AdaptuneError, match="lora_alpha"):
        PeftConfig.from_dict({"peft_type": "LORA", "lora_alpha": math.nan})
