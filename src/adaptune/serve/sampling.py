"""Choosing each request's next token: greedy, temperature and nucleus (top-p) sampling with a
per-request seed, and the log-probabilities an OpenAI client may ask for."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the decoder (OpenAI's fields, and vLLM's ``ignore_eos``)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # per generated token: its log-prob and this many alternatives
    prompt_logprobs: int | None = None  # echo: the same for every prompt token

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, with the ``top`` most likely alternatives."""

    token_id: int
    logprob: float | None  # None for the first prompt token, which nothing predicts
    top: tuple[tuple[int, float], ...] = ()


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A request's own random stream: a seeded request samples the same text whatever shares its batch."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def next_tokens(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` (rows, vocab); greedy rows share one argmax."""
    chosen = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            chosen[i] = _sample(logits[i], p, generators[i])
    return chosen


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest set of tokens whose mass reaches top_p (the most likely one always)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Log-probs (float32 or wider) of ``tokens[i]`` under ``logits[i]``, and each row's ``top`` best."""
    logprobs = torch.log_softmax(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1)
    picked = logprobs.gather(-1, torch.tensor(tokens, device=logits.device).unsqueeze(-1)).squeeze(-1).tolist()
    if top > 0:
        values, ids = logprobs.topk(top, dim=-1)
        alternatives = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [()] * len(tokens)
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(tokens, picked, alternatives)]
