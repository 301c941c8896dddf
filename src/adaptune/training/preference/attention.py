"""Attention for pairs that share their prompt: ``[prompt, chosen, rejected]`` in one row, the prompt once.

A pair's chosen and rejected answers follow the same prompt. Packed as two sequences, the prompt is
run twice; here it is run once. The row holds ``prompt + chosen`` as one sequence (positions 0, 1,
...) and then ``rejected`` with positions that go on from the end of the prompt (``len(prompt)``,
...). A sequence whose first position p is not 0 *continues* the last sequence that started at 0:
it attends to that sequence's first p tokens (the prompt) and to itself, causally, and not to the
chosen answer between them. This is read from ``position_ids`` alone, like adaptune's packed
attention (``speedups.attention``), which is what every sequence starting at 0 gets: a causal
attention over itself only.

Prompt tokens are usually most of a preference pair (long instructions, short answers): sharing
them cuts the tokens of a step by up to half, with the same log-probabilities (the prompt's keys
and values are the same computation either way; checked against separate sequences, and against
TRL, in the tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SHARED_PROMPT_SDPA = "adaptune_shared_prompt_sdpa"

__all__ = ["SHARED_PROMPT_SDPA", "shared_prompt_attention", "shared_prompt_sdpa_forward", "spans",
           "supports_shared_prompts"]

_last: list[Any] = [None, -1, None]  # (position_ids, its version, its spans): every layer asks again


def spans(position_ids: torch.Tensor) -> list[list[tuple[int, int, int, int]]]:
    """Per row, ``(start, stop, root, prefix)`` of each sequence: columns ``start:stop``, attending
    also to columns ``root:root + prefix`` (prefix 0: a sequence of its own)."""
    if _last[0] is position_ids and _last[1] == position_ids._version and not torch.compiler.is_compiling():
        return _last[2]
    out = []
    for row in position_ids.reshape(-1, position_ids.shape[-1]).tolist():
        found, root = [], 0
        cuts = [i for i in range(len(row)) if i == 0 or row[i] != row[i - 1] + 1] + [len(row)]
        for start, stop in zip(cuts[:-1], cuts[1:]):
            first = row[start]
            if first == 0:
                root = start
            elif first > start - root:
                raise ValueError(f"a sequence continues a prompt of {first} tokens, but only {start - root} precede it")
            found.append((start, stop, root, first))
        out.append(found)
    _last[:] = [position_ids, position_ids._version, out]
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, p: float, scale: float | None,
            gqa: bool) -> torch.Tensor:
    """(1, H, L, D) queries over ``prefix`` earlier keys and their own, causally."""
    if not prefix:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale, enable_gqa=gqa)
    length = q.shape[2]
    mask = torch.ones(length, prefix + length, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale, enable_gqa=gqa)


def shared_prompt_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                               is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: query (B, H, T, D), key/value (B, H_kv, T, D) -> (B, T, H, D)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        from ...speedups.attention import packed_sdpa_forward

        return packed_sdpa_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                   is_causal=is_causal, **kwargs)
    p = dropout if module.training else 0.0
    gqa = query.shape[1] != key.shape[1]
    rows = spans(position_ids)
    if len(rows) != query.shape[0]:
        rows = rows * query.shape[0]
    out = []
    for b, row in enumerate(rows):
        pieces = []
        for start, stop, root, prefix in row:
            q = query[b:b + 1, :, start:stop]
            k, v = key[b:b + 1, :, start:stop], value[b:b + 1, :, start:stop]
            if prefix:
                k = torch.cat([key[b:b + 1, :, root:root + prefix], k], dim=2)
                v = torch.cat([value[b:b + 1, :, root:root + prefix], v], dim=2)
            pieces.append(_attend(q, k, v, prefix, p, scaling, gqa)[0].transpose(0, 1))
        out.append(torch.cat(pieces))
    return torch.stack(out), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Rows with shared prompts hold no padding; the attention goes by position_ids alone."""
    return None


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SHARED_PROMPT_SDPA, shared_prompt_sdpa_forward)
    AttentionMaskInterface.register(SHARED_PROMPT_SDPA, _no_mask)
    return SHARED_PROMPT_SDPA


@contextmanager
def shared_prompt_attention(model: nn.Module) -> Iterator[int]:
    """Within the block, ``model``'s sdpa attention (or adaptune's packed one) is this one; each config
    gets its own setting back after. Yields how many configs were switched."""
    from ...speedups.attention import PACKED_SDPA

    configs: dict[int, Any] = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) in ("sdpa", PACKED_SDPA,
                                                                                     SHARED_PROMPT_SDPA):
            configs.setdefault(id(config), config)
    if configs:
        register()
    before = {key: c._attn_implementation for key, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = SHARED_PROMPT_SDPA
    try:
        yield len(configs)
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]


def supports_shared_prompts(model: nn.Module) -> bool:
    """Whether ``model`` computes ``[prompt, chosen, rejected]`` rows as the separate sequences
    would (a 6-token probe, checked once per model): its attention must be sdpa and see position_ids."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    cached = base.__dict__.get("_adaptune_shared_prompts")
    if cached is not None:
        return cached
    was_training = model.training
    try:
        param = next(model.parameters())
        vocab = model.get_input_embeddings().num_embeddings
        ids = [(7 * i + 3) % max(vocab - 1, 1) + 1 for i in range(6)]  # prompt a b c, chosen d e, rejected f
        model.eval()
        with torch.no_grad(), shared_prompt_attention(model) as switched:
            row = model(input_ids=torch.tensor([ids], device=param.device),
                        position_ids=torch.tensor([[0, 1, 2, 3, 4, 3]], device=param.device), use_cache=False)
        with torch.no_grad():
            chosen = model(input_ids=torch.tensor([ids[:5]], device=param.device), use_cache=False).logits[0]
            rejected = model(input_ids=torch.tensor([ids[:3] + ids[5:]], device=param.device),
                             use_cache=False).logits[0]
        got = row.logits[0].float()
        want = torch.cat([chosen, rejected[3:]]).float()
        tol = (1e-4 if param.dtype == torch.float32 else 2e-2) * max(1.0, want.abs().max().item())
        ok = bool(switched) and got.shape == want.shape and bool((got - want).abs().max() <= tol)
    except Exception:  # noqa: BLE001 - any failure means the model cannot share prompts this way
        ok = False
    finally:
        model.train(was_training)
    base.__dict__["_adaptune_shared_prompts"] = ok
    return ok
