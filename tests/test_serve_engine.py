"""The serving engine without HTTP: mixed-adapter continuous batching against PeftModel, prompt
log-probs, scaled/summed adapters, sampling, stops, aborts, replacement and LRU residency."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from adaptune.errors import AdapterFileError, ConfigError  # noqa: E402
from adaptune.serve.registry import UnknownModel, check_name  # noqa: E402
from adaptune.serve.text import TextStream  # noqa: E402
from tests.serve_helpers import (  # noqa: E402
    PROMPTS,
    encode,
    make_adapters,
    reference_model,
    reference_tokens,
    state_for,
    submit,
)

KINDS = [None, "lora_a", "dora_b", "wide_c", "prompt_p", "prefix_x"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture
def state(adapters):
    state = state_for(adapters)
    state.engine.start()
    yield state
    state.engine.stop()


def _terms(name):
    return [] if name is None else [(name, 1.0)]


def test_each_request_in_a_mixed_batch_equals_peft_generate_for_its_adapter(state, adapters) -> None:
    """Every adapter kind shares the batch; requests join while others are mid-decode."""
    jobs = []
    for i, prompt in enumerate(PROMPTS[:2]):
        for name in KINDS:
            jobs.append((name, prompt, submit(state, _terms(name), prompt, max_tokens=10 + i, ignore_eos=True)[1]))
            time.sleep(0.002)  # arrive at different decode steps
    for name, prompt, sink in jobs:
        sink.wait()
        want = reference_tokens(adapters.get(name), prompt, len(sink.tokens))
        assert sink.tokens == want, (name, prompt)
    assert state.engine.metrics.batch_size._sum.get() > state.engine.metrics.batch_size._buckets[0].get()


def test_requests_that_arrive_together_are_prefilled_together_and_still_equal_peft(adapters) -> None:
    state = state_for(adapters)  # not started: every request waits, then all are admitted in one step
    jobs = [(name, prompt, submit(state, _terms(name), prompt, max_tokens=6, ignore_eos=True)[1])
            for prompt in PROMPTS for name in (None, "lora_a", "dora_b", "wide_c")]  # prompts of 3 to 6 tokens
    state.engine.start()
    try:
        for name, prompt, sink in jobs:
            assert sink.wait().tokens == reference_tokens(adapters.get(name), prompt, 6), (name, prompt)
    finally:
        state.engine.stop()
    assert state.engine.metrics.batch_size._sum.get() == 5 * len(jobs)  # 5 decode steps, all rows in each


def test_prompt_logprobs_equal_the_models_log_probs(state, adapters) -> None:
    for name in ("lora_a", "dora_b", None, "prompt_p"):
        ids = encode(PROMPTS[2])
        sink = submit(state, _terms(name), ids, max_tokens=0, prompt_logprobs=2)[1].wait()
        assert sink.reason == "length" and sink.tokens == []
        model = reference_model(adapters.get(name))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -len(ids):]  # after any virtual tokens
        expected = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        got = sink.prompt_logprobs
        assert got[0].logprob is None and [e.token_id for e in got] == ids
        torch.testing.assert_close(torch.tensor([e.logprob for e in got[1:]], dtype=torch.float64), expected)
        best = torch.log_softmax(logits, -1)[0].topk(2)
        assert [i for i, _ in got[1].top] == best.indices.tolist()


def test_generated_token_logprobs_are_the_models(state, adapters) -> None:
    sink = submit(state, _terms("wide_c"), PROMPTS[0], max_tokens=4, logprobs=1, ignore_eos=True)[1].wait()
    ids = encode(PROMPTS[0]) + sink.tokens
    with torch.no_grad():
        logits = reference_model(adapters["wide_c"])(input_ids=torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits, -1)[len(ids) - 5:-1].gather(-1, torch.tensor(sink.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([e.logprob for e in sink.logprobs], dtype=torch.float64), expected)


def test_scaled_and_summed_adapters_equal_their_weighted_combination(state, adapters) -> None:
    terms = [("lora_a", 0.5), ("wide_c", -1.5)]
    mixed = submit(state, terms, PROMPTS[1], max_tokens=8, ignore_eos=True)[1]
    plain = submit(state, _terms("lora_a"), PROMPTS[1], max_tokens=8, ignore_eos=True)[1]
    model = reference_model(adapters["lora_a"])
    model.load_adapter(adapters["wide_c"], "wide_c")
    with torch.no_grad():  # the oracle: base weights + 0.5 delta_a - 1.5 delta_c, folded in by hand
        for _, layer in model.base_model.lora_layers():
            for name, scale in (("default", 0.5), ("wide_c", -1.5)):
                if name in layer.specs:
                    layer.base_layer.weight += scale * layer.delta_weight(name)
    model = model.unload()
    ids = torch.tensor([encode(PROMPTS[1])])
    want = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert mixed.wait().tokens == want[0, ids.shape[1]:].tolist()
    assert plain.wait().tokens != mixed.tokens


def test_prompt_adapter_takes_scale_one_and_goes_alone(state) -> None:
    with pytest.raises(ConfigError, match="one prompt-learning adapter"):
        state.registry.lease([("prompt_p", 0.5)])
    with pytest.raises(ConfigError, match="one prompt-learning adapter"):
        state.registry.lease([("prompt_p", 1.0), ("prefix_x", 1.0)])
    lease = state.registry.lease([("prompt_p", 1.0), ("lora_a", 0.5)])  # virtual tokens + a LoRA is fine
    state.registry.release(lease)


def test_seeded_sampling_repeats_whatever_shares_the_batch(state) -> None:
    alone = submit(state, _terms("lora_a"), PROMPTS[0], max_tokens=12, temperature=1.5, top_p=0.9, seed=7,
                   ignore_eos=True)[1].wait()
    crowd = [submit(state, _terms(n), PROMPTS[3], max_tokens=12, temperature=1.0, ignore_eos=True)[1]
             for n in ("dora_b", None)]
    again = submit(state, _terms("lora_a"), PROMPTS[0], max_tokens=12, temperature=1.5, top_p=0.9, seed=7,
                   ignore_eos=True)[1]
    assert again.wait().tokens == alone.tokens
    for sink in crowd:
        sink.wait()
    other = submit(state, _terms("lora_a"), PROMPTS[0], max_tokens=12, temperature=1.5, seed=8,
                   ignore_eos=True)[1].wait()
    assert other.tokens != alone.tokens


def test_a_stop_string_ends_the_text_before_it(state) -> None:
    full = submit(state, _terms("lora_a"), PROMPTS[2], max_tokens=12, ignore_eos=True)[1].wait()
    words = full.text.split()
    stop = " ".join(words[2:4])
    cut = submit(state, _terms("lora_a"), PROMPTS[2], max_tokens=12, ignore_eos=True, stop=(stop,))[1].wait()
    assert cut.reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]


def test_text_stream_holds_back_a_possible_stop_string() -> None:
    pieces = {1: "ab", 2: "c", 3: "X", 4: "Y", 5: "d"}

    def decode(ids):
        return "".join(pieces.get(i, "") for i in ids)

    stream = TextStream(decode, [], stop=("cXZ",))
    assert [stream.push(t) for t in (1, 2, 3)] == ["ab", "", ""]  # "cX" may start "cXZ"
    assert stream.push(4) == "cXY"  # it did not
    assert stream.push(5) == "d" and stream.finish() == ""
    stopped = TextStream(decode, [], stop=("Xd",))
    assert [stopped.push(t) for t in (1, 3, 5, 2)] == ["ab", "", "", ""]
    assert stopped.stopped and stopped.text == "ab"


def test_eos_ends_a_request_unless_ignored(state) -> None:
    eos = state.tokenizer.eos_token_id
    sink = submit(state, _terms(None), PROMPTS[0], max_tokens=6, stop_token_ids=(eos,), ignore_eos=True)[1]
    first = submit(state, _terms(None), PROMPTS[0], max_tokens=6, ignore_eos=True)[1].wait()
    stop_at = first.tokens[2]
    ended = submit(state, _terms(None), PROMPTS[0], max_tokens=6, stop_token_ids=(stop_at,))[1].wait()
    assert ended.reason == "stop" and ended.tokens == first.tokens[:first.tokens.index(stop_at) + 1]
    sink.wait()


def test_abort_frees_the_slot_and_the_adapter(state) -> None:
    request, sink = submit(state, _terms("lora_a"), PROMPTS[0], max_tokens=200, ignore_eos=True)
    deadline = time.monotonic() + 10
    while not sink.tokens and time.monotonic() < deadline:
        time.sleep(0.001)
    state.engine.abort(request.id)
    while (state.engine.snapshot()["running"] or any(e.refs for e in state.registry.names())) \
            and time.monotonic() < deadline:
        time.sleep(0.005)
    assert state.engine.snapshot()["running"] == 0
    assert len(sink.tokens) < 200 and not sink.done.is_set()
    assert all(e.refs == 0 for e in state.registry.names())


def test_replacing_an_adapter_lets_requests_in_flight_finish_on_the_old_weights(state, adapters) -> None:
    old = submit(state, _terms("lora_a"), PROMPTS[1], max_tokens=60, ignore_eos=True)[1]
    deadline = time.monotonic() + 10
    while not old.tokens and time.monotonic() < deadline:
        time.sleep(0.001)
    state.registry.load("lora_a", adapters["dora_b"])  # same name, other weights
    new = submit(state, _terms("lora_a"), PROMPTS[1], max_tokens=8, ignore_eos=True)[1]
    assert old.wait().tokens == reference_tokens(adapters["lora_a"], PROMPTS[1], 60)
    assert new.wait().tokens == reference_tokens(adapters["dora_b"], PROMPTS[1], 8)
    assert len(state.registry.host.keys) == 3  # the old lora_a is gone from the model


def test_max_loras_keeps_the_most_recently_used_and_reloads_on_demand(adapters, tmp_path) -> None:
    folder = tmp_path / "dir"
    folder.mkdir()
    for name in ("lora_a", "dora_b", "wide_c"):
        shutil.copytree(adapters[name], folder / name)
    state = state_for({}, max_loras=2, adapter_dir=str(folder))
    state.engine.start()
    try:
        for name in ("lora_a", "dora_b", "wide_c", "lora_a"):
            sink = submit(state, _terms(name), PROMPTS[0], max_tokens=5, ignore_eos=True)[1].wait()
            assert sink.tokens == reference_tokens(adapters[name], PROMPTS[0], 5)
        assert sorted(state.registry.resident_loras()) == ["lora_a", "wide_c"]
        assert len(state.registry.host.keys) == 2
        with pytest.raises(UnknownModel):
            state.registry.lease([("nothing_here", 1.0)])
    finally:
        state.engine.stop()


def test_adapter_dir_reads_only_inside_its_folder(adapters, tmp_path) -> None:
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "escape").symlink_to(adapters["lora_a"], target_is_directory=True)  # a link out of the folder
    state = state_for({}, adapter_dir=str(folder))
    for name in ("escape", "../dir/escape", str(adapters["lora_a"])):
        with pytest.raises((UnknownModel, ConfigError)):
            state.registry.lease([(name, 1.0)])
    assert state.registry.host.keys == []


@pytest.mark.parametrize("name", ["..", "a/b", "a\\b", "/etc/passwd", "C:\\x", "x/../y", "", "tab\there"])
def test_names_that_look_like_paths_are_refused(name) -> None:
    with pytest.raises(ConfigError):
        check_name(name)


def test_bad_adapter_folders_are_refused_and_change_nothing(state, adapters, tmp_path) -> None:
    broken_json = tmp_path / "json"
    shutil.copytree(adapters["lora_a"], broken_json)
    (broken_json / "adapter_config.json").write_text("{ nope")
    truncated = tmp_path / "truncated"
    shutil.copytree(adapters["lora_a"], truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    other_rank = tmp_path / "rank"
    shutil.copytree(adapters["lora_a"], other_rank)
    config = (other_rank / "adapter_config.json").read_text().replace('"r": 2', '"r": 3')
    (other_rank / "adapter_config.json").write_text(config)
    heads = tmp_path / "heads"
    shutil.copytree(adapters["lora_a"], heads)
    config = (heads / "adapter_config.json").read_text().replace('"modules_to_save": null',
                                                                  '"modules_to_save": ["lm_head"]')
    (heads / "adapter_config.json").write_text(config)
    keys = state.registry.host.keys
    for folder, message in [(broken_json, "JSON"), (truncated, "safetensors"), (other_rank, "shape"),
                            (heads, "modules_to_save"), (tmp_path / "missing", "no such")]:
        with pytest.raises(AdapterFileError, match=message):
            state.registry.load("broken", folder)
        assert state.registry.host.keys == keys
    assert "broken" not in state.registry
    sink = submit(state, _terms("lora_a"), PROMPTS[0], max_tokens=4, ignore_eos=True)[1].wait()
    assert sink.tokens == reference_tokens(adapters["lora_a"], PROMPTS[0], 4)
