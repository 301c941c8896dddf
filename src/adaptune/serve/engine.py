"""The scheduler: one thread that runs the model, with continuous batching of mixed adapters.

Between two decode steps, waiting requests are prefilled (each on its own, so its cache holds
what a solo ``generate`` would) and join the running batch; finished, stopped and abandoned ones
leave it. One decode step runs the base model once for every row, each row with its own adapters
(``row_adapters``), position and cache. Sampling, stop strings and log-probs are per request.

The engine talks to its callers through a ``sink`` per request, called on the engine thread
with :class:`PromptScored`, :class:`Delta`, :class:`Finished` or :class:`Failed` events.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..tuners.lora.mixed import row_adapters
from .batching import KV, Row, RunningBatch, as_cache, cache_tensors
from .metrics import ServeMetrics
from .registry import Lease, Registry
from .sampling import SamplingParams, TokenLogprob, make_generator, next_tokens, token_logprobs
from .text import TextStream

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_waiting`` requests already (HTTP 429)."""


@dataclass(frozen=True)
class PromptScored:
    logprobs: list[TokenLogprob]  # one per prompt token; the first has no log-prob


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # anything held back until the end (part of a stop string that was not one)


@dataclass(frozen=True)
class Failed:
    message: str


Event = PromptScored | Delta | Finished | Failed
Sink = Callable[[Event], None]
_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    lease: Lease
    sink: Sink
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.monotonic)
    text: TextStream | None = None
    generator: torch.Generator | None = None
    released: bool = False


class Engine:
    def __init__(self, model: nn.Module, tokenizer, registry: Registry, metrics: ServeMetrics | None = None,
                 max_batch: int = 16, max_waiting: int = 256, prefill_tokens_per_step: int = 2048) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.registry = registry
        self.lock = registry.lock
        self.metrics = metrics or ServeMetrics()
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.device = next(model.parameters()).device
        self.eos_ids = _eos_ids(model, tokenizer)
        self.tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to share across threads
        self.batch = RunningBatch()
        self._waiting: collections.deque[Request] = collections.deque()
        self._aborted: set[str] = set()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        self.metrics.watch(self.snapshot)

    # ---- outside API (any thread) ---------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="adaptune-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self.lock:
            for req in list(self._waiting) + [r.request for r in self.batch.rows]:
                self._fail(req, "the server is shutting down")
            self._waiting.clear()
            self.batch = RunningBatch()

    def submit(self, request: Request) -> None:
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"the server has {len(self._waiting)} requests waiting already; retry later")
            request.text = TextStream(self.decode, request.prompt_ids, request.params.stop)
            self._waiting.append(request)
            self._wake.notify_all()

    def abort(self, request_id: str) -> None:
        """Stop a request (its client went away); its slot is free after the current step."""
        with self._wake:
            self._aborted.add(request_id)
            self._wake.notify_all()

    def decode(self, ids: Sequence[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def snapshot(self) -> dict:
        rows, waiting = list(self.batch.rows), list(self._waiting)
        return {"running": len(rows), "waiting": len(waiting),
                "running_adapters": sorted({a for r in rows for a in _adapter_names(r.request)}),
                "waiting_adapters": sorted({a for r in waiting for a in _adapter_names(r)}),
                "resident": self.registry.resident_loras(), "max_loras": self.registry.max_loras or 0}

    # ---- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self.batch.rows or self._aborted):
                    self._wake.wait()
                if self._stopping:
                    return
            with self.lock, torch.inference_mode():
                self._reap_aborted()
                self._admit()
                if self.batch.rows:
                    self._decode_step()
            time.sleep(0)  # let a thread waiting for the lock (an adapter load) have it between steps

    def _reap_aborted(self) -> None:
        with self._wake:
            aborted, self._aborted = self._aborted, set()
            gone = [r for r in self._waiting if r.id in aborted]
            for req in gone:
                self._waiting.remove(req)
        rows = [row for row in self.batch.rows if row.request.id in aborted]
        for req in gone:
            self._finish(req, "abort", 0, quiet=True)
        for row in rows:  # released before the slot shows as free
            self._finish(row.request, "abort", len(row.generated), quiet=True)
        self.batch.drop(rows)

    def _admit(self) -> None:
        """Prefill waiting requests while slots and this step's prefill budget last; they join the batch."""
        admitted: list[Request] = []
        budget = self.prefill_tokens_per_step
        while budget > 0 and len(self.batch) + len(admitted) < self.max_batch:
            with self._wake:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
            admitted.append(req)
            budget -= len(req.prompt_ids)
        # plain requests (no virtual tokens, no prompt scoring) are prefilled in one forward pass
        together = [r for r in admitted if r.lease.prompt is None and r.params.prompt_logprobs is None]
        if len(together) < 2:
            together = []
        groups = []
        for chunk in [together] + [[r] for r in admitted if r not in together]:
            if not chunk:
                continue
            try:
                groups.append(self._prefill_together(chunk) if len(chunk) > 1 else self._prefill(chunk[0]))
            except Exception as exc:  # noqa: BLE001 - a failed prefill fails its requests, not the server
                logger.exception("prefill failed")
                for req in chunk:
                    self._fail(req, f"the model failed on this request ({type(exc).__name__}: {exc})")
        self.batch.join([g for g in groups if g is not None])

    def _prefill_together(self, reqs: list[Request]) -> tuple[list[Row], KV, torch.Tensor] | None:
        """One forward pass over several prompts, left-padded to the longest."""
        reqs = sorted(reqs, key=lambda r: r.lease.terms)  # each adapter's rows together
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = as_cache(None)
        logits = self._forward({"input_ids": ids}, [r.lease.terms for r in reqs], cache, positions, mask)[:, -1]
        keep = []
        for i, req in enumerate(reqs):
            row = self._first_token(req, logits[i], len(req.prompt_ids))
            if row is not None:
                keep.append((i, row))
        if not keep:
            return None
        kv, mask = RunningBatch.select(cache_tensors(cache), mask, [i for i, _ in keep])
        return [row for _, row in keep], kv, mask

    def _prefill(self, req: Request) -> tuple[list[Row], KV, torch.Tensor] | None:
        """One request's prompt, with its virtual tokens or prefix, alone in a forward pass."""
        ids = torch.tensor([req.prompt_ids], device=self.device)
        prompt = req.lease.prompt
        n_virtual = prompt.n_virtual if prompt is not None else 0
        total = n_virtual + ids.shape[1]
        inputs: dict = {"input_ids": ids}
        start = 0
        if prompt is not None and prompt.embeds is not None:  # prompt / P-tuning: virtual token embeddings
            embeds = self.model.get_input_embeddings()(ids)
            inputs = {"inputs_embeds": torch.cat([prompt.embeds.to(embeds.dtype)[None], embeds], dim=1)}
        elif prompt is not None:  # prefix tuning: the cache starts with the prefix
            start = n_virtual
        cache = as_cache(prompt.prefix if prompt is not None and prompt.prefix is not None else None)
        scoring = req.params.prompt_logprobs is not None
        mask = torch.ones(1, total, dtype=torch.long, device=self.device)
        logits = self._forward(inputs, [req.lease.terms], cache, torch.arange(start, total, device=self.device)[None],
                               mask, keep_all=scoring)[0]
        if scoring:
            self._score_prompt(req, logits[total - start - ids.shape[1]:])
        row = self._first_token(req, logits[-1], total)
        return None if row is None else ([row], cache_tensors(cache), mask)

    def _first_token(self, req: Request, logits: torch.Tensor, length: int) -> Row | None:
        """After the prefill: the request's first token, and its row unless that already ended it."""
        self.metrics.prompt_tokens.labels(req.lease.label).inc(len(req.prompt_ids))
        if req.params.max_tokens == 0:
            self._finish(req, "length", 0)
            return None
        req.generator = None if req.params.greedy else make_generator(req.params.seed, self.device)
        row = Row(req, req.lease.terms, length=length, last_token=-1)
        token = next_tokens(logits[None], [req.params], [req.generator])[0]
        self.metrics.ttft.observe(time.monotonic() - req.arrival)
        reason = self._accept(row, token, logits)
        if reason is None:
            return row
        self._finish(req, reason, len(row.generated))
        return None

    def _score_prompt(self, req: Request, logits: torch.Tensor) -> None:
        """Log-probs of the prompt's tokens: logits row i predicts token i + 1."""
        ids = req.prompt_ids
        top = req.params.prompt_logprobs or 0
        scored = token_logprobs(logits[:len(ids) - 1], ids[1:], top) if len(ids) > 1 else []
        self._emit(req, PromptScored([TokenLogprob(ids[0], None), *scored]))

    def _decode_step(self) -> None:
        begun = time.monotonic()
        rows = list(self.batch.rows)
        inputs = self.batch.step_inputs(self.device)
        cache = as_cache(self.batch.kv)
        try:
            positions, mask = inputs.pop("position_ids"), inputs.pop("attention_mask")
            logits = self._forward(inputs, [r.adapter_key for r in rows], cache, positions, mask)
        except Exception as exc:  # noqa: BLE001 - fail this batch, keep serving
            logger.exception("decode step failed")
            self.batch = RunningBatch()
            for row in rows:
                self._fail(row.request, f"the model failed during decoding ({type(exc).__name__}: {exc})")
            return
        self.batch.after_step(cache_tensors(cache))
        logits = logits[:, -1]
        tokens = next_tokens(logits, [r.request.params for r in rows], [r.request.generator for r in rows])
        self.metrics.batch_size.observe(len(rows))
        self.metrics.step_seconds.observe(time.monotonic() - begun)
        ended = [(row, reason) for i, (row, token) in enumerate(zip(rows, tokens))
                 if (reason := self._accept(row, token, logits[i])) is not None]
        # out of the batch before the client hears it finished: metrics read after a response agree
        self.batch.drop([row for row, _ in ended])
        for row, reason in ended:
            self._finish(row.request, reason, len(row.generated))

    def _forward(self, inputs: dict, terms: list, cache, positions: torch.Tensor, mask: torch.Tensor,
                 keep_all: bool = False) -> torch.Tensor:
        kwargs = {**inputs, "attention_mask": mask, "position_ids": positions, self._cache_kw: cache,
                  "use_cache": True}
        if self._keep_kw and not keep_all:
            kwargs[self._keep_kw] = 1
        with row_adapters(self.registry.host.layers, terms):
            return self.model(**kwargs).logits

    # ---- one token for one request ------------------------------------------------------------
    def _accept(self, row: Row, token: int, logits: torch.Tensor) -> str | None:
        """Record ``token`` for ``row``'s request and send what it adds; the finish reason when the
        request is done (the caller finishes it), else None."""
        req, params = row.request, row.request.params
        row.generated.append(token)
        row.last_token = token
        logprobs = token_logprobs(logits[None], [token], params.logprobs) if params.logprobs is not None else None
        ends = (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids
        text = "" if ends else req.text.push(token)
        self._emit(req, Delta(text, [token], logprobs))
        if ends or req.text.stopped:
            return "stop"
        if len(row.generated) >= params.max_tokens:
            return "length"
        return None

    def _finish(self, req: Request, reason: str, generated: int, quiet: bool = False) -> None:
        if req.released:
            return
        req.released = True
        self.registry.release(req.lease)
        label = req.lease.label
        self.metrics.requests.labels(label, reason).inc()
        self.metrics.generation_tokens.labels(label).inc(generated)
        if not quiet:
            rest = req.text.finish() if req.text is not None and not req.text.stopped else ""
            self._emit(req, Finished(reason, len(req.prompt_ids), generated, rest))

    def _fail(self, req: Request, message: str) -> None:
        if req.released:
            return
        req.released = True
        self.registry.release(req.lease)
        self.metrics.requests.labels(req.lease.label, "error").inc()
        self._emit(req, Failed(message))

    def _emit(self, req: Request, event: Event) -> None:
        try:
            req.sink(event)
        except Exception:  # noqa: BLE001 - a caller that went away (closed event loop) is not our failure
            logger.debug("could not deliver an event to request %s", req.id, exc_info=True)


def _adapter_names(req: Request) -> list[str]:
    return [e.name for e in req.lease.entries]


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
