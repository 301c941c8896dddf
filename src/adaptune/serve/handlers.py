"""From an OpenAI request body to engine requests and back: prompts, limits, adapters, results.

A body becomes a :class:`Plan` (token ids per prompt, sampling parameters, adapter terms), checked
against the limits before anything is queued. A :class:`Run` submits one engine request per
prompt and choice, and gathers their events from the engine thread on one asyncio queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..errors import ConfigError
from .engine import Delta, Engine, Failed, Finished, PromptScored, Request
from .registry import Registry, UnknownModel, check_name
from .sampling import SamplingParams, TokenLogprob
from .schemas import ChatRequest, CompletionRequest, Limits, _Generation

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) default for /v1/completions


@dataclass
class ServeState:
    """Everything the endpoints share."""

    engine: Engine
    registry: Registry
    tokenizer: Any
    limits: Limits
    base_name: str
    base_root: str
    context_length: int | None
    allow_runtime_loading: bool = False
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def token_text(self, token_id: int) -> str:
        return self.engine.decode([token_id])


@dataclass
class Plan:
    prompts: list[list[int]]
    texts: list[str]  # the prompts as text, for echo
    params: SamplingParams
    terms: list[tuple[str, float]]
    n: int

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass
class Choice:
    """One choice's results, gathered from its events."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


# ---- plans ----------------------------------------------------------------------------------------
def adapter_terms(state: ServeState, body: _Generation) -> list[tuple[str, float]]:
    """The request's adapters as (name, scale): ``model`` names one, or ``adapters`` lists several."""
    if body.adapters:
        if body.model != state.base_name:
            raise ConfigError(f"with 'adapters', set 'model' to the base model's name ({state.base_name!r})")
        for ref in body.adapters:
            check_name(ref.name)
        return [(ref.name, ref.scale) for ref in body.adapters]
    if body.model == state.base_name:
        return []
    check_name(body.model)
    if body.model not in state.registry and state.registry.adapter_dir is None:
        raise UnknownModel(f"the model {body.model!r} does not exist")
    return [(body.model, 1.0)]


def _encode(state: ServeState, text: str, special: bool) -> list[int]:
    with state.engine.tokenizer_lock:
        return list(state.tokenizer(text, add_special_tokens=special)["input_ids"])


def _completion_prompts(state: ServeState, prompt: Any) -> tuple[list[list[int]], list[str]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt or len(prompt) > 64:
        raise ConfigError("prompt: give 1 to 64 prompts")
    ids, texts = [], []
    vocab = len(state.tokenizer)
    for item in prompt:
        if isinstance(item, str):
            ids.append(_encode(state, item, special=True))
            texts.append(item)
        else:
            if any(t < 0 or t >= vocab for t in item):
                raise ConfigError(f"prompt: token ids must be in [0, {vocab})")
            ids.append(list(item))
            texts.append(state.engine.decode(item))
    return ids, texts


def chat_prompt(state: ServeState, body: ChatRequest) -> list[int]:
    if not getattr(state.tokenizer, "chat_template", None):
        raise ConfigError("this model's tokenizer has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    try:
        with state.engine.tokenizer_lock:
            text = state.tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=body.add_generation_prompt,
                                                       **(body.chat_template_kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - a template that refuses the messages is the caller's problem
        raise ConfigError(f"the chat template refused these messages: {exc}") from None
    return _encode(state, text, special=False)


def plan_completion(state: ServeState, body: CompletionRequest) -> Plan:
    _check_supported(body)
    prompts, texts = _completion_prompts(state, body.prompt)
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
    logprobs = body.logprobs
    params = _params(body, max_tokens, logprobs, prompt_logprobs=logprobs if body.echo else None)
    return _checked(state, Plan(prompts, texts, params, adapter_terms(state, body), body.n))


def plan_chat(state: ServeState, body: ChatRequest) -> Plan:
    _check_supported(body)
    ids = chat_prompt(state, body)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    room = (state.context_length - len(ids)) if state.context_length else state.limits.max_tokens
    max_tokens = asked if asked is not None else max(1, min(state.limits.max_tokens, room))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _params(body, max_tokens, logprobs, prompt_logprobs=None)
    return _checked(state, Plan([ids], [""], params, adapter_terms(state, body), body.n))


def _check_supported(body: _Generation) -> None:
    problem = body.unsupported()
    if problem:
        raise ConfigError(problem)


def _params(body: _Generation, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=tuple(body.stop_list()),
        stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs)


def _checked(state: ServeState, plan: Plan) -> Plan:
    limits, max_tokens = state.limits, plan.params.max_tokens
    if max_tokens > limits.max_tokens:
        raise ConfigError(f"max_tokens is {max_tokens}, over this server's limit of {limits.max_tokens}")
    for ids in plan.prompts:
        if not ids:
            raise ConfigError("the prompt is empty")
        if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
            raise ConfigError(f"the prompt has {len(ids)} tokens, over this server's limit of "
                              f"{limits.max_prompt_tokens}")
        if state.context_length is not None and len(ids) + max_tokens > state.context_length:
            raise ConfigError(f"this model's maximum context length is {state.context_length} tokens, but "
                              f"{len(ids) + max_tokens} were asked for ({len(ids)} in the prompt, {max_tokens} "
                              f"for the completion)")
    return plan


# ---- running ----------------------------------------------------------------------------------------
class Run:
    """The engine requests of one API call, their events on one asyncio queue as (choice, event)."""

    def __init__(self, state: ServeState, plan: Plan) -> None:
        self.state, self.plan = state, plan
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests: list[Request] = []
        self.open: set[int] = set()
        self._loop = asyncio.get_running_loop()

    async def start(self) -> None:
        """Queue every choice; if one cannot be queued, none stays queued."""
        try:
            for i in range(self.plan.choices):
                await self._submit(i)
        except BaseException:
            self.abort()
            raise

    async def _submit(self, i: int) -> None:
        ids = self.plan.prompts[i // self.plan.n]
        params = self.plan.params
        if params.seed is not None and i % self.plan.n:  # n choices of one seeded request differ
            params = dataclasses.replace(params, seed=params.seed + i % self.plan.n)
        lease = await run_in_threadpool(self.state.registry.lease, self.plan.terms)
        request = Request(ids, params, lease, self._sink(i))
        try:
            self.state.engine.submit(request)
        except BaseException:
            self.state.registry.release(lease)
            raise
        self.requests.append(request)
        self.open.add(i)

    def _sink(self, index: int):
        def deliver(event) -> None:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return deliver

    def abort(self) -> None:
        for i in list(self.open):
            self.state.engine.abort(self.requests[i].id)
        self.open.clear()

    async def next_event(self, timeout: float | None = None):
        index, event = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(event, (Finished, Failed)):
            self.open.discard(index)
        return index, event


async def gather(run: Run, disconnected) -> list[Choice] | None:
    """Every choice's results; None when the client went away first (its requests are stopped)."""
    choices = [Choice() for _ in range(run.plan.choices)]
    while run.open:
        try:
            index, event = await run.next_event(timeout=1.0)
        except asyncio.TimeoutError:
            if await disconnected():
                run.abort()
                return None
            continue
        absorb(choices[index], event)
    return choices


def absorb(choice: Choice, event) -> None:
    if isinstance(event, PromptScored):
        choice.prompt_logprobs = event.logprobs
    elif isinstance(event, Delta):
        choice.text += event.text
        choice.logprobs.extend(event.logprobs or [])
    elif isinstance(event, Finished):
        choice.text += event.text
        choice.finish_reason = event.reason
        choice.prompt_tokens, choice.completion_tokens = event.prompt_tokens, event.completion_tokens
    elif isinstance(event, Failed):
        choice.error = event.message
