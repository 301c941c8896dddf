"""The HTTP API in process (FastAPI's TestClient): shapes, streaming, errors, auth, limits, metrics."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from adaptune.serve.api import create_app  # noqa: E402
from adaptune.serve.engine import QueueFull  # noqa: E402
from tests.serve_helpers import PROMPTS, encode, make_adapters, reference_tokens, state_for, submit  # noqa: E402
from tests.tiny import make_tokenizer  # noqa: E402

BASE = "tiny-llama"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def client(adapters):
    state = state_for({k: adapters[k] for k in ("lora_a", "dora_b", "prompt_p")}, max_tokens=64,
                      max_prompt_tokens=40)
    with TestClient(create_app(state)) as client:
        yield client


def _sse(response) -> list[dict]:
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _error(response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert "\n" not in message and message
    return message


def test_models_list_the_base_and_adapters_with_vllm_parent_and_root(client, adapters) -> None:
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards[BASE]["parent"] is None and cards[BASE]["root"] == BASE
    for name in ("lora_a", "dora_b", "prompt_p"):
        assert cards[name]["parent"] == BASE and cards[name]["root"] == str(adapters[name])
        assert cards[name]["object"] == "model"


def test_completion_equals_peft_and_streams_join_to_it(client, adapters) -> None:
    body = {"model": "dora_b", "prompt": PROMPTS[0], "max_tokens": 9, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "length"
    assert whole["usage"] == {"prompt_tokens": len(encode(PROMPTS[0])), "completion_tokens": 9, "total_tokens":
                              len(encode(PROMPTS[0])) + 9}
    want = make_tokenizer().decode(reference_tokens(adapters["dora_b"], PROMPTS[0], 9), skip_special_tokens=True)
    assert choice["text"].strip() == want.strip()
    chunks = _sse(client.post("/v1/completions", json={**body, "stream": True,
                                                      "stream_options": {"include_usage": True}}))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 9
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"


def test_several_prompts_and_choices_come_back_in_order(client) -> None:
    body = {"model": "lora_a", "prompt": PROMPTS[:3], "max_tokens": 4, "temperature": 0, "n": 2,
            "ignore_eos": True}
    out = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == list(range(6))
    for i in range(3):
        single = client.post("/v1/completions", json={**body, "prompt": PROMPTS[i], "n": 1}).json()
        assert out["choices"][2 * i]["text"] == out["choices"][2 * i + 1]["text"] == single["choices"][0]["text"]
    tokens = client.post("/v1/completions", json={**body, "prompt": [encode(PROMPTS[0])], "n": 1}).json()
    assert tokens["choices"][0]["text"] == out["choices"][0]["text"]


def test_chat_uses_the_chat_template_and_streams(client) -> None:
    messages = [{"role": "user", "content": "the king and the"}]
    body = {"model": "lora_a", "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/chat/completions", json=body).json()
    expected_prompt = make_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert whole["usage"]["prompt_tokens"] == len(make_tokenizer()(expected_prompt, add_special_tokens=False)
                                                  ["input_ids"])
    assert whole["choices"][0]["message"]["role"] == "assistant"
    chunks = _sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    content_parts = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": "the king "},
                                                                         {"type": "text", "text": "and the"}]}]}
    assert client.post("/v1/chat/completions", json=content_parts).json()["choices"] == whole["choices"]


def test_echo_with_max_tokens_zero_returns_prompt_logprobs(client) -> None:
    body = {"model": "prompt_p", "prompt": PROMPTS[1], "max_tokens": 0, "echo": True, "logprobs": 2}
    out = client.post("/v1/completions", json=body).json()["choices"][0]
    ids = encode(PROMPTS[1])
    assert out["text"] == PROMPTS[1]
    lp = out["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None
    assert all(v < 0 for v in lp["token_logprobs"][1:]) and len(lp["top_logprobs"][1]) == 2
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_scaled_adapters_per_request(client) -> None:
    body = {"model": BASE, "prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    one = client.post("/v1/completions", json={**body, "model": "lora_a"}).json()["choices"][0]["text"]
    same = client.post("/v1/completions", json={**body, "adapters": [{"name": "lora_a", "scale": 1}]}).json()
    assert same["choices"][0]["text"] == one
    mixed = client.post("/v1/completions", json={**body, "adapters": [{"name": "lora_a", "scale": 2.0},
                                                                       {"name": "dora_b", "scale": -1}]})
    assert mixed.status_code == 200 and mixed.json()["choices"][0]["text"] != one
    message = _error(client.post("/v1/completions", json={**body, "model": "lora_a",
                                                          "adapters": [{"name": "dora_b"}]}), 400)
    assert "base model" in message


@pytest.mark.parametrize("body, status, words", [
    ({"model": "lora_a"}, 400, "prompt"),
    ({"model": "lora_a", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "lora_a", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "lora_a", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "lora_a", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "lora_a", "prompt": "x", "max_tokens": 65}, 400, "limit"),
    ({"model": "lora_a", "prompt": "the " * 41}, 400, "limit"),
    ({"model": "lora_a", "prompt": ""}, 400, "empty"),
    ({"model": "lora_a", "prompt": [[1, 2, 999999]]}, 400, "token ids"),
    ({"model": "lora_a", "prompt": "x", "frequency_penalty": 0.5}, 400, "not supported"),
    ({"model": "lora_a", "prompt": "x", "adapters": [{"name": "lora_a", "scale": "nan"}]}, 400, "scale"),
    ({"model": "nobody", "prompt": "x"}, 404, "does not exist"),
    ({"model": "../lora_a", "prompt": "x"}, 400, "path"),
    ({"model": "/etc/passwd", "prompt": "x"}, 400, "path"),
    ({"model": BASE, "prompt": "x", "adapters": [{"name": "a/../../b"}]}, 400, "path"),
])
def test_bad_requests_get_one_line_errors(client, body, status, words) -> None:
    assert words in _error(client.post("/v1/completions", json=body), status)


def test_malformed_json_and_wrong_content_are_400(client) -> None:
    response = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    _error(response, 400)
    _error(client.post("/v1/chat/completions", json={"model": "lora_a", "messages": []}), 400)
    _error(client.post("/v1/chat/completions", json={"model": "lora_a", "messages": [{"content": "x"}]}), 400)
    _error(client.get("/v1/nothing"), 404)


def test_runtime_loading_is_off_by_default(client, adapters) -> None:
    message = _error(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path":
                                                                str(adapters["wide_c"])}), 403)
    assert "--allow-runtime-loading" in message
    _error(client.post("/v1/unload_lora_adapter", json={"lora_name": "lora_a"}), 403)
    assert "x" not in {c["id"] for c in client.get("/v1/models").json()["data"]}


def test_runtime_load_replace_unload_and_bad_folders(adapters, tmp_path) -> None:
    state = state_for({"lora_a": adapters["lora_a"]}, allow_runtime_loading=True)
    body = {"prompt": PROMPTS[3], "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    tok = make_tokenizer()

    def text_of(folder):
        return tok.decode(reference_tokens(folder, PROMPTS[3], 5), skip_special_tokens=True).strip()

    with TestClient(create_app(state)) as client:
        ok = client.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": str(adapters["wide_c"])})
        assert ok.status_code == 200 and "Success" in ok.text
        out = client.post("/v1/completions", json={**body, "model": "new"}).json()
        assert out["choices"][0]["text"].strip() == text_of(adapters["wide_c"])
        client.post("/v1/load_lora_adapter", json={"lora_name": "new", "lora_path": str(adapters["dora_b"])})
        out = client.post("/v1/completions", json={**body, "model": "new"}).json()
        assert out["choices"][0]["text"].strip() == text_of(adapters["dora_b"])
        broken = tmp_path / "broken"
        shutil.copytree(adapters["lora_a"], broken)
        (broken / "adapter_model.safetensors").write_bytes(b"garbage")
        for name, path, status in [("bad", str(broken), 400), ("bad", str(tmp_path / "none"), 400),
                                   ("../x", str(adapters["lora_a"]), 400), ("a/b", str(adapters["lora_a"]), 400),
                                   (BASE, str(adapters["lora_a"]), 400)]:
            _error(client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}), status)
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "new"}).status_code == 200
        _error(client.post("/v1/unload_lora_adapter", json={"lora_name": "new"}), 404)
        _error(client.post("/v1/completions", json={**body, "model": "new"}), 404)
        assert {c["id"] for c in client.get("/v1/models").json()["data"]} == {BASE, "lora_a"}
        out = client.post("/v1/completions", json={**body, "model": "lora_a"}).json()  # still serving
        assert out["choices"][0]["text"].strip() == text_of(adapters["lora_a"])


def test_api_key_guards_v1_only(adapters) -> None:
    state = state_for({"lora_a": adapters["lora_a"]}, api_key="sk-right")
    with TestClient(create_app(state)) as client:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-right"}):
            _error(client.get("/v1/models", headers=headers), 401)
            _error(client.post("/v1/completions", json={"model": "lora_a", "prompt": "x"}, headers=headers), 401)
        good = {"Authorization": "Bearer sk-right"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200


def test_a_full_queue_is_429_and_nothing_is_left_queued(adapters) -> None:
    state = state_for({"lora_a": adapters["lora_a"]}, max_waiting=1)
    client = TestClient(create_app(state))  # no lifespan: the engine is not running, so requests wait
    submit(state, [("lora_a", 1.0)], PROMPTS[0], max_tokens=1)
    with pytest.raises(QueueFull):
        submit(state, [("lora_a", 1.0)], PROMPTS[0], max_tokens=1)
    message = _error(client.post("/v1/completions", json={"model": "lora_a", "prompt": "x"}), 429)
    assert "waiting" in message
    assert state.engine.snapshot()["waiting"] == 1
    assert [e.refs for e in state.registry.names()] == [1]  # only the request still queued holds the adapter


def test_metrics_count_requests_and_tokens_per_adapter(client) -> None:
    before = client.get("/metrics").text
    client.post("/v1/completions", json={"model": "prompt_p", "prompt": PROMPTS[0], "max_tokens": 3,
                                         "temperature": 0, "ignore_eos": True})
    text = client.get("/metrics").text
    line = 'adaptune_generation_tokens_total{adapter="prompt_p"}'

    def value(page: str, key: str) -> float:
        return next((float(row.split()[-1]) for row in page.splitlines() if row.startswith(key)), 0.0)

    assert value(text, line) == value(before, line) + 3
    assert value(text, 'adaptune_requests_total{adapter="prompt_p",finish_reason="length"}') >= 1
    assert "vllm:lora_requests_info{" in text and 'max_lora="0"' in text
    assert "adaptune_batch_size_bucket" in text and "vllm:num_requests_running 0.0" in text


def test_playground_page_is_served(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "adaptune playground" in page.text and "/v1/models" in page.text
