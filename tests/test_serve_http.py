"""One real uvicorn on 127.0.0.1 (a free port, bounded time), driven by the official ``openai`` client:
mixed batches against PeftModel, streams, log-probs, runtime loading, refusals, a bounded load test,
and a client that disconnects mid-stream."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from adaptune.serve.api import create_app  # noqa: E402
from tests.serve_helpers import (  # noqa: E402
    PROMPTS,
    encode,
    make_adapters,
    reference_model,
    reference_tokens,
    running_server,
    state_for,
)
from tests.tiny import make_tokenizer  # noqa: E402

BASE = "tiny-llama"
KEY = "sk-test-key"
SERVED = ("lora_a", "dora_b", "wide_c", "prompt_p")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def server(adapters):
    state = state_for({k: adapters[k] for k in SERVED}, api_key=KEY, allow_runtime_loading=True, max_batch=8)
    with running_server(create_app(state)) as url:
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, timeout=30, max_retries=0)


def _text(tokens: list[int]) -> str:
    return make_tokenizer().decode(tokens, skip_special_tokens=True).strip()


def test_each_adapters_completion_equals_peft_in_mixed_batches(client, adapters) -> None:
    jobs = [(name, prompt) for prompt in PROMPTS[:2] for name in (None, *SERVED)]

    def ask(job):
        name, prompt = job
        out = client.completions.create(model=name or BASE, prompt=prompt, max_tokens=8, temperature=0,
                                        extra_body={"ignore_eos": True})
        return out.choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: they share batches
        texts = list(pool.map(ask, jobs))
    for (name, prompt), text in zip(jobs, texts):
        assert text.strip() == _text(reference_tokens(adapters.get(name), prompt, 8)), (name, prompt)


def test_streamed_chunks_join_into_the_whole_text(client) -> None:
    args = dict(model="wide_c", prompt=PROMPTS[3], max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0].text
    stream = client.completions.create(stream=True, **args)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == whole
    messages = [{"role": "user", "content": "love is a"}]
    chat = client.chat.completions.create(model="lora_a", messages=messages, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    pieces = client.chat.completions.create(model="lora_a", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == chat.choices[0].message.content
    assert chat.usage.completion_tokens == 10


def test_echo_logprobs_equal_the_models_log_probs(client, adapters) -> None:
    out = client.completions.create(model="dora_b", prompt=PROMPTS[2], max_tokens=0, echo=True, logprobs=1)
    got = out.choices[0].logprobs.token_logprobs
    ids = encode(PROMPTS[2])
    with torch.no_grad():
        logits = reference_model(adapters["dora_b"])(input_ids=torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert got[0] is None
    torch.testing.assert_close(torch.tensor(got[1:], dtype=torch.float64), expected)
    assert out.choices[0].text == PROMPTS[2]


def test_runtime_load_replace_and_unload(server, client, adapters) -> None:
    url, _ = server
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, headers=auth, timeout=30) as http:
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "late",
                                                        "lora_path": str(adapters["prefix_x"])}).status_code == 200
        assert "late" in {m.id for m in client.models.list().data}
        out = client.completions.create(model="late", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text.strip() == _text(reference_tokens(adapters["prefix_x"], PROMPTS[0], 6))
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "late",
                                                        "lora_path": str(adapters["lora_a"])}).status_code == 200
        out = client.completions.create(model="late", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text.strip() == _text(reference_tokens(adapters["lora_a"], PROMPTS[0], 6))
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="x", max_tokens=1)
    cards = {m.id: m for m in client.models.list().data}
    assert "late" not in cards and cards["lora_a"].model_extra["parent"] == BASE


def test_wrong_key_traversal_and_bad_bodies_are_refused(server, client) -> None:
    url, _ = server
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=BASE, prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    for model in ("../lora_a", "/tmp", "a/b"):
        with pytest.raises(openai.BadRequestError, match="path"):
            client.completions.create(model=model, prompt="x", max_tokens=1)
    refused = httpx.post(url + "/v1/load_lora_adapter", headers={"Authorization": f"Bearer {KEY}"}, timeout=10,
                         json={"lora_name": "../../x", "lora_path": "/tmp"})
    assert refused.status_code == 400 and "path" in refused.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=BASE, prompt="x", max_tokens=-3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE, messages=[])
    assert client.completions.create(model=BASE, prompt="x", max_tokens=1).choices  # still serving


def test_bounded_load_loses_nothing(server, client) -> None:
    """64 requests over 4 adapters at concurrency 8, each with a fixed length, within a time limit."""
    _, state = server
    names = list(SERVED)
    started = time.monotonic()

    def ask(i: int):
        out = client.completions.create(model=names[i % 4], prompt=PROMPTS[i % len(PROMPTS)], max_tokens=6,
                                        temperature=0.8, seed=i, extra_body={"ignore_eos": True})
        return i, out.choices[0].finish_reason, out.usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(64)))
    assert time.monotonic() - started < 60
    assert sorted(i for i, _, _ in results) == list(range(64))
    assert all(reason == "length" and n == 6 for _, reason, n in results)
    assert state.engine.snapshot()["running"] == 0 and state.engine.snapshot()["waiting"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server) -> None:
    url, state = server
    body = {"model": "lora_a", "prompt": PROMPTS[0], "max_tokens": 240, "temperature": 0, "stream": True,
            "ignore_eos": True}
    before = state.engine.metrics.requests.labels("lora_a", "abort")._value.get()
    with httpx.Client(timeout=30) as http, http.stream("POST", url + "/v1/completions", json=body,
                                                       headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first chunk arrived: the request is running
    deadline = time.monotonic() + 10
    while state.engine.metrics.requests.labels("lora_a", "abort")._value.get() == before:
        assert time.monotonic() < deadline, "the abandoned request kept its slot"
        time.sleep(0.01)
    assert state.engine.snapshot()["running"] == 0
