"""Attention for packed rows, one example at a time: no padding and no attention across examples.

A packed row holds several examples back to back; their ``position_ids`` restart at 0 at each one
(``DataCollator(packing=True)``, ``BatchPackingCollator``). transformers' ``sdpa`` keeps them
apart with a block-diagonal mask over the whole row::

    row:   [a a a b b c c c c]       sdpa + mask: one 9 x 9 product,      this: a 3 x 3, a 2 x 2
    mask:  a sees a, b sees b, ...   most of it masked out                 and a 4 x 4 causal product

so its cost grows with the square of the row, and a mask keeps the fused causal kernel off. Here
each example runs its own causal ``scaled_dot_product_attention``: the attention work is that of
the examples alone, whatever the row width. Rows may then be as wide as a whole batch, and a
batch of short examples becomes one row with no padding at all (``BatchPackingCollator`` with a
wide ``max_length``). This is what FlashAttention-2's variable-length path does on a GPU
(``cu_seqlens`` from ``position_ids``), written with PyTorch's own kernel so it runs on a CPU.
Examples of one length run as one batched call; when every row is cut into examples of one
length (full blocks), that call reads views of the rows, with no copy in or out.

Anything else (a padding mask, a KV cache, one token at a time) goes to transformers' ``sdpa``
unchanged. :func:`packed_attention` switches a model from ``sdpa`` to this for a block of code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PACKED_SDPA", "packed_attention", "packed_sdpa_forward", "segments", "register"]

PACKED_SDPA = "adaptune_packed_sdpa"
_NO_PADDING = "_adaptune_no_padding"  # set on a mask that only keeps examples apart


_last: list[Any] = [None, -1, None]  # (position_ids, its version, its segments): every layer asks again


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, stop)`` column ranges of its examples: a new one wherever the position
    does not follow the previous one by 1 (as transformers' ``find_packed_sequence_indices``).
    The answer for the last tensor asked about is kept: all layers of a forward share it, and it
    costs a device-to-host copy."""
    if torch.compiler.is_compiling():  # tensor identity means nothing while tracing: no cache
        return _segments(position_ids)
    if _last[0] is position_ids and _last[1] == position_ids._version:
        return _last[2]
    found = _segments(position_ids)
    _last[:] = [position_ids, position_ids._version, found]
    return found


def _segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    rows = position_ids.reshape(-1, position_ids.shape[-1])
    starts = torch.ones_like(rows, dtype=torch.bool)
    starts[:, 1:] = rows[:, 1:] != rows[:, :-1] + 1
    width = rows.shape[1]
    out = []
    for row in starts.tolist():
        cuts = [i for i, s in enumerate(row) if s] + [width]
        out.append(list(zip(cuts[:-1], cuts[1:])))
    return out


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def packed_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: query (B, H, T, D), key/value (B, H_kv, T, D) -> (B, T, H, D)."""
    position_ids = kwargs.get("position_ids")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    unpadded = attention_mask is None or getattr(attention_mask, _NO_PADDING, False)
    if (not unpadded or position_ids is None or not causal or kwargs.get("position_bias") is not None
            or query.shape[2] != key.shape[2] or query.shape[2] < 2):
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                       is_causal=is_causal, **kwargs)
    p = dropout if module.training else 0.0
    gqa = query.shape[1] != key.shape[1]
    rows = segments(position_ids)
    if len(rows) != query.shape[0]:  # one row of positions for the whole batch
        rows = rows * query.shape[0]
    length = _tile_length(rows)
    if length is not None:  # rows of examples of one length (full blocks, or one each): views, one call
        batch, heads, width, dim = query.shape
        q, k, v = (_as_examples(t, length) for t in (query, key, value))
        out = _causal_sdpa(q, k, v, p, scaling, gqa)  # (examples, H, length, D)
        return out.transpose(1, 2).reshape(batch, width, heads, dim), None
    # Each example as a view of its row: split, not slices, because in backward split's gradient is
    # one cat of the pieces' gradients, where each slice's is a zero-filled tensor as big as the row.
    pieces = [[row.split([stop - start for start, stop in spans], dim=1) for row, spans in zip(_unstack(t), rows)]
              for t in (query, key, value)]
    by_length: dict[int, list[tuple[int, int]]] = {}
    for b, spans in enumerate(rows):
        for i, (start, stop) in enumerate(spans):
            by_length.setdefault(stop - start, []).append((b, i))
    outs: dict[tuple[int, int], torch.Tensor] = {}
    for places in by_length.values():  # examples of one length: one batched call
        q, k, v = (_stack([part[b][i] for b, i in places]) for part in pieces)
        outs.update(zip(places, _unstack(_causal_sdpa(q, k, v, p, scaling, gqa))))
    # (T, H, D) rows in column order; a cat for the same reason (writes into slices of one buffer
    # would each clone the whole gradient in backward)
    out = [torch.cat([outs[b, i].transpose(0, 1) for i in range(len(spans))]) for b, spans in enumerate(rows)]
    return _stack(out), None


def _tile_length(rows: list[list[tuple[int, int]]]) -> int | None:
    """The example length when all rows are cut into examples of that one length, else None."""
    length = rows[0][0][1] - rows[0][0][0]
    return length if all(stop - start == length for spans in rows for start, stop in spans) else None


def _as_examples(t: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, T, D) -> (B * T / length, H, length, D), each row's examples side by side: a view where
    the layout allows (one row: always; several: when t is a (B, T, H, D) tensor transposed), else a copy."""
    batch, heads, width, dim = t.shape
    return t.unflatten(2, (width // length, length)).transpose(1, 2).reshape(-1, heads, length, dim)


def _stack(pieces: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, without a copy for one piece."""
    return pieces[0].unsqueeze(0) if len(pieces) == 1 else torch.stack(pieces)


def _unstack(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``t.unbind(0)``, without a copy in backward for one piece (unbind's gradient is a stack): the
    attention kernel's output gradient then keeps the kernel's own memory layout."""
    return (t.squeeze(0),) if t.shape[0] == 1 else t.unbind(0)


def _fp32_on_cpu(query: torch.Tensor) -> bool:
    return query.device.type == "cpu" and torch.is_autocast_enabled("cpu")


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float, scale: float | None,
                 gqa: bool) -> torch.Tensor:
    """Causal SDPA; under CPU autocast in fp32, not bf16: the CPU's fused kernel is slower in bf16
    than in fp32 for example lengths like these (docs/benchmarks.md), so fp32 is a precision gain
    at no cost in time, for a little more kept per token and layer."""
    if _fp32_on_cpu(q):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=p, is_causal=True,
                                                  scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scale, enable_gqa=gqa)


def _packed_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """sdpa's mask, marked when it holds no padding: the attention may then go by position_ids
    instead, and a model that does not hand position_ids to its attention still gets the mask."""
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    if mask is not None and flash_attention_mask(*args, **kwargs) is None:
        setattr(mask, _NO_PADDING, True)
    return mask


def register() -> str:
    """Register the attention function and its mask function with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, _packed_mask)
    return PACKED_SDPA


def _configs(model: nn.Module) -> list[Any]:
    """The distinct transformers configs of ``model``'s modules whose attention is ``sdpa``."""
    seen: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextmanager
def packed_attention(model: nn.Module) -> Iterator[int]:
    """Within the block, every ``sdpa`` attention of ``model`` runs :func:`packed_sdpa_forward`;
    yields how many configs were switched (0: nothing to do, e.g. eager or FlashAttention models)."""
    configs = _configs(model)
    if configs:
        register()
    for config in configs:
        config._attn_implementation = PACKED_SDPA
    try:
        yield len(configs)
    finally:
        for config in configs:
            config._attn_implementation = "sdpa"
