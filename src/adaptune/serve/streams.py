"""Completions and chat completions as OpenAI returns them: whole, or streamed as server-sent events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from .engine import Delta, Failed, Finished, PromptScored
from .handlers import Choice, Run, ServeState
from .protocol import chat_logprobs, completion_logprobs, envelope, error_body, new_id, sse, usage


def _usage(choices: list[Choice], n: int) -> dict:
    prompt = sum(c.prompt_tokens for i, c in enumerate(choices) if i % n == 0)
    return usage(prompt, sum(c.completion_tokens for c in choices))


# ---- whole responses ----------------------------------------------------------------------------------
def completion_response(state: ServeState, run: Run, choices: list[Choice], model: str, echo: bool) -> dict:
    out = []
    for i, c in enumerate(choices):
        prompt_text = run.plan.texts[i // run.plan.n] if echo else ""
        entries = (c.prompt_logprobs or []) + c.logprobs if echo else c.logprobs
        logprobs = completion_logprobs(entries, state.token_text) if run.plan.params.logprobs is not None else None
        out.append({"index": i, "text": prompt_text + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                    "stop_reason": None})
    body = envelope("text_completion", new_id("cmpl"), model, out)
    body["usage"] = _usage(choices, run.plan.n)
    return body


def chat_response(state: ServeState, run: Run, choices: list[Choice], model: str) -> dict:
    out = []
    for i, c in enumerate(choices):
        logprobs = chat_logprobs(c.logprobs, state.token_text) if run.plan.params.logprobs is not None else None
        out.append({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": logprobs,
                    "finish_reason": c.finish_reason, "stop_reason": None})
    body = envelope("chat.completion", new_id("chatcmpl"), model, out)
    body["usage"] = _usage(choices, run.plan.n)
    return body


# ---- streams ----------------------------------------------------------------------------------------
async def completion_stream(state: ServeState, run: Run, model: str, echo: bool,
                            include_usage: bool) -> AsyncIterator[str]:
    rid, created = new_id("cmpl"), int(time.time())
    offsets = [0] * run.plan.choices
    choices = [Choice() for _ in range(run.plan.choices)]
    wants_logprobs = run.plan.params.logprobs is not None

    def chunk(i: int, text: str, entries=None, finish: str | None = None) -> str:
        logprobs = None
        if wants_logprobs and entries is not None:
            logprobs = completion_logprobs(entries, state.token_text, offsets[i])
        offsets[i] += len(text)
        return sse(envelope("text_completion", rid, model, [{"index": i, "text": text, "logprobs": logprobs,
                                                              "finish_reason": finish}], created))

    try:
        if echo and not wants_logprobs:
            for i in range(run.plan.choices):
                yield chunk(i, run.plan.texts[i // run.plan.n])
        while run.open:
            i, event = await run.next_event()
            _track(choices[i], event)
            if isinstance(event, PromptScored) and echo:
                yield chunk(i, run.plan.texts[i // run.plan.n], event.logprobs)
            elif isinstance(event, Delta) and (event.text or event.logprobs):
                yield chunk(i, event.text, event.logprobs)
            elif isinstance(event, Finished):
                yield chunk(i, event.text, [], event.reason)
            elif isinstance(event, Failed):
                yield sse(error_body(event.message, 500, "server_error"))
        if include_usage:
            yield sse({**envelope("text_completion", rid, model, [], created), "usage": _usage(choices, run.plan.n)})
        yield sse("[DONE]")
    finally:
        run.abort()  # the client went away (or the stream ended): free any slot still held


async def chat_stream(state: ServeState, run: Run, model: str, include_usage: bool) -> AsyncIterator[str]:
    rid, created = new_id("chatcmpl"), int(time.time())
    choices = [Choice() for _ in range(run.plan.choices)]
    wants_logprobs = run.plan.params.logprobs is not None

    def chunk(i: int, delta: dict, entries=None, finish: str | None = None) -> str:
        logprobs = chat_logprobs(entries, state.token_text) if wants_logprobs and entries else None
        return sse(envelope("chat.completion.chunk", rid, model, [{"index": i, "delta": delta, "logprobs": logprobs,
                                                                    "finish_reason": finish}], created))

    try:
        for i in range(run.plan.choices):
            yield chunk(i, {"role": "assistant", "content": ""})
        while run.open:
            i, event = await run.next_event()
            _track(choices[i], event)
            if isinstance(event, Delta) and (event.text or event.logprobs):
                yield chunk(i, {"content": event.text}, event.logprobs)
            elif isinstance(event, Finished):
                yield chunk(i, {"content": event.text} if event.text else {}, None, event.reason)
            elif isinstance(event, Failed):
                yield sse(error_body(event.message, 500, "server_error"))
        if include_usage:
            yield sse({**envelope("chat.completion.chunk", rid, model, [], created),
                       "usage": _usage(choices, run.plan.n)})
        yield sse("[DONE]")
    finally:
        run.abort()


def _track(choice: Choice, event) -> None:
    if isinstance(event, Finished):
        choice.prompt_tokens, choice.completion_tokens = event.prompt_tokens, event.completion_tokens
