"""The running batch: every request's own KV cache as one row of padded per-layer tensors.

Requests are prefilled when they arrive (together, left-padded, when several arrive at once) and
join the batch between decode steps: the batch and the newcomers are padded on the left to a
common length and stacked. A finished request's row is dropped, and padding that every remaining
row has in front is cut off. An attention mask marks the padding, and each row's positions count
only its own tokens, so a row's result does not depend on its neighbours beyond float rounding.

Rows are kept sorted by their adapters, so each adapter's rows sit together and the LoRA layers
work on one slice per adapter (``LoraLayer._addmm_rows``) instead of gathering rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values as (rows, heads, length, head_dim)


@dataclass(eq=False)
class Row:
    """A request in the running batch (what the batch needs to know; the engine keeps the rest)."""

    request: Any
    adapter_key: tuple  # the row's LoRA terms, ((internal name, scale), ...): the sort key
    length: int  # cache entries that are the row's own (virtual tokens and prefix included)
    last_token: int
    generated: list[int] = field(default_factory=list)


def as_cache(kv: KV | None):
    """A transformers ``DynamicCache`` holding ``kv`` as it is (no copy); empty when ``kv`` is None."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for keys, values in kv or []:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def cache_tensors(cache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(t: torch.Tensor, to: int, dim: int) -> torch.Tensor:
    missing = to - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


class RunningBatch:
    """Rows, their stacked caches and the attention mask over the cache entries."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.kv: KV = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def join(self, groups: Sequence[tuple[list[Row], KV, torch.Tensor]]) -> None:
        """Add groups of rows, each with its cache (one batch row per row) and its attention mask
        (rows x entries: 0 where a row has padding, as after a batched prefill)."""
        groups = [g for g in groups if g[0]]
        if not groups:
            return
        if self.rows:
            groups = [(self.rows, self.kv, self.mask), *groups]
        rows = [row for group, _, _ in groups for row in group]
        width = max(mask.shape[1] for _, _, mask in groups)
        order = sorted(range(len(rows)), key=lambda i: rows[i].adapter_key)
        index = torch.tensor(order, device=groups[0][2].device)
        mask = torch.cat([_pad_left(m, width, 1) for _, _, m in groups]).index_select(0, index)
        kv = []
        for layer in range(len(groups[0][1])):
            keys = torch.cat([_pad_left(g[1][layer][0], width, 2) for g in groups]).index_select(0, index)
            values = torch.cat([_pad_left(g[1][layer][1], width, 2) for g in groups]).index_select(0, index)
            kv.append((keys, values))
        self.rows, self.kv, self.mask = [rows[i] for i in order], kv, mask

    def drop(self, rows: Sequence[Row]) -> None:
        """Remove finished rows, then the padding that all remaining rows have in front."""
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.__init__()
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        mask = self.mask.index_select(0, index)
        cut = int(mask.any(dim=0).long().argmax())  # first column some row uses
        self.mask = mask[:, cut:]
        self.kv = [(k.index_select(0, index)[:, :, cut:], v.index_select(0, index)[:, :, cut:]) for k, v in self.kv]

    @staticmethod
    def select(kv: KV, mask: torch.Tensor, keep: Sequence[int]) -> tuple[KV, torch.Tensor]:
        """Rows ``keep`` of a group's cache and mask."""
        index = torch.tensor(list(keep), device=mask.device)
        return [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv], mask.index_select(0, index)

    def step_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Inputs of one decode step: each row's last token at its own next position."""
        tokens = torch.tensor([[r.last_token] for r in self.rows], device=device)
        positions = torch.tensor([[r.length] for r in self.rows], device=device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        return {"input_ids": tokens, "position_ids": positions, "attention_mask": self.mask}

    def after_step(self, kv: KV) -> None:
        self.kv = kv
        for row in self.rows:
            row.length += 1
