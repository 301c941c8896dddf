"""Mixed batches: each row of a batch with its own adapters (peft's ``adapter_names``), or with
(name, scale) pairs whose scaled outputs add up, as ``adaptune serve`` asks for one request.

The base layer's product runs once for all rows; each adapter then works at its own rank, on its
own rows (a slice when they sit together), or, in a decoding step, stacked with the batch's other
plain LoRAs. :class:`RowPlan` groups the rows once per forward for every layer, and
:func:`row_adapters` sets a batch's rows on the layers for the length of a forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ...errors import ConfigError
from ...speedups.dropout import dropout_active

if TYPE_CHECKING:
    from .layer import LoraLayer

BASE_ROW = "__base__"  # adapter name meaning "no adapter" in mixed batches (peft's)

RowAdapters = str | Sequence[tuple[str, float]]

__all__ = ["BASE_ROW", "MixedBatchForward", "RowAdapters", "RowPlan", "expand_row_names", "row_adapters",
           "row_groups"]


class MixedBatchForward:
    """The mixed-batch forward of :class:`~adaptune.tuners.lora.layer.LoraLayer` (its methods, kept
    here with the row bookkeeping they use)."""

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Each batch row gets its own adapters (``__base__`` = none), as peft's adapter_names; a row
        may also carry (name, scale) pairs. The base output is computed once for all rows; each adapter
        then works at its own rank: on its own rows (a slice when they sit together), or, in a decoding
        step, stacked with the batch's other plain LoRAs (``_add_stacked``)."""
        if self.merged_adapters:
            raise ConfigError("mixed adapter batches need unmerged adapters; call unmerge_adapter() first")
        plan = self._row_plan
        if plan is None or plan.names is not self.row_adapters:  # row_adapters set by hand
            plan = RowPlan(self.row_adapters)
        out = result.clone()
        groups = plan.groups(x.shape[0])
        stacked = self._add_stacked(x, out, [n for n in groups if n in self.specs], plan)
        for name, (rows, scales, span) in groups.items():
            if name not in self.specs or name in stacked:
                continue  # this adapter does not touch this layer (or is __base__), or is done
            if span is not None and not torch.is_grad_enabled() and self._is_plain(name, out.dtype):
                self._addmm_rows(x, out, name, span, scales)
                continue
            index = torch.tensor(rows, device=x.device)
            delta = self._lora_out(x.index_select(0, index), name, result.index_select(0, index)).to(out.dtype)
            if any(s != 1 for s in scales):
                delta = delta * torch.tensor(scales, dtype=delta.dtype, device=delta.device).view(
                    -1, *([1] * (delta.dim() - 1)))
            out[index] = out[index] + delta
        return out

    def _add_stacked(self, x: torch.Tensor, out: torch.Tensor, names: list[str], plan: RowPlan) -> list[str]:
        """Decoding (one token a row, no autograd): every plain LoRA of the batch in three products.

        The adapters' A's are stacked (each at its own rank, no padding) and applied to all rows; a
        row-by-rank coefficient matrix keeps each row's own ranks (times scaling and scale) and zeroes
        the rest; the stacked B's add the result. With a few rows a step, the waste is a few
        thousand multiply-adds, and it saves the per-adapter launches that dominate a decoding step.
        Returns the adapters it handled."""
        if torch.is_grad_enabled() or x.dim() != 3 or x.shape[1] != 1:
            return []
        names = [n for n in names if self._is_plain(n, out.dtype)]
        if len(names) < 2:
            return []
        a_cat, b_cat = self._stacked_weights(names)
        coeff = plan.coefficients(names, [self.specs[n].r for n in names], [self.specs[n].scaling for n in names],
                                  x.shape[0], a_cat)
        rows_x = x.reshape(-1, x.shape[-1])
        hidden = torch.mm(rows_x if rows_x.dtype == a_cat.dtype else rows_x.to(a_cat.dtype), a_cat.t()).mul_(coeff)
        out.view(-1, out.shape[-1]).addmm_(hidden, b_cat.t())
        return names

    def _stacked_weights(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapters' A's stacked by rows and B's by columns, kept until an adapter or weight changes."""
        a, b = [self.lora_A[n].weight for n in names], [self.lora_B[n].weight for n in names]
        key = tuple((n, id(wa), wa._version, id(wb), wb._version) for n, wa, wb in zip(names, a, b))
        if self._stacked is None or self._stacked[0] != key:
            self._stacked = (key, torch.cat(a, 0), torch.cat(b, 1))
        return self._stacked[1], self._stacked[2]

    def _is_plain(self, name: str, dtype: torch.dtype) -> bool:
        """A LoRA whose output is ``scaling * B A x`` in ``dtype`` (no DoRA, slices, bias, dropout)."""
        spec = self.specs[name]
        if spec.use_dora or spec.slices or name not in self.lora_A or dropout_active(self.lora_dropout[name]):
            return False
        a, b = self.lora_A[name], self.lora_B[name]
        return a.bias is None and b.bias is None and b.weight.dtype == dtype

    def _addmm_rows(self, x: torch.Tensor, out: torch.Tensor, name: str, span: tuple[int, int],
                    scales: Sequence[float]) -> None:
        """Rows ``span`` of ``out`` += their scale * this adapter's output, in place on a slice: the
        same two products a single-adapter forward does, with no gather or scatter of rows."""
        start, stop = span
        a_weight, b_weight = self.lora_A[name].weight, self.lora_B[name].weight
        rows_x = x[start:stop].reshape(-1, x.shape[-1])
        if rows_x.dtype != a_weight.dtype:
            rows_x = rows_x.to(a_weight.dtype)
        hidden = torch.mm(rows_x, a_weight.t())
        alpha = self.specs[name].scaling
        if len(set(scales)) == 1:
            alpha *= scales[0]
        else:  # per-row scales: one factor per token of each row
            per_token = torch.tensor(scales, dtype=hidden.dtype, device=hidden.device)
            hidden = hidden * per_token.repeat_interleave(hidden.shape[0] // len(scales)).unsqueeze(1)
        out[start:stop].view(-1, out.shape[-1]).addmm_(hidden, b_weight.t(), alpha=alpha)


def expand_row_names(names: Sequence[RowAdapters], batch: int) -> list[RowAdapters]:
    """Repeat per-row adapter names when generation expands rows (beams, num_return_sequences)."""
    names = list(names)
    if len(names) == batch:
        return names
    if batch % len(names) == 0:
        factor = batch // len(names)
        return [n for n in names for _ in range(factor)]
    raise ConfigError(f"adapter_names has {len(names)} entries for a batch of {batch} rows")


def row_groups(rows: Sequence[RowAdapters]) -> dict[str, tuple[list[int], list[float]]]:
    """adapter name -> (the rows that use it, each row's scale), in order of first use."""
    groups: dict[str, tuple[list[int], list[float]]] = {}
    for i, entry in enumerate(rows):
        pairs = ((entry, 1.0),) if isinstance(entry, str) else entry
        for pair in pairs:
            if not _is_name_and_scale(pair):
                raise ConfigError(f"row {i}: expected (adapter name, finite scale) pairs, got {entry!r}")
            name, scale = pair
            if name == BASE_ROW:
                continue
            index, scales = groups.setdefault(name, ([], []))
            if index and index[-1] == i:
                raise ConfigError(f"row {i} names adapter {name!r} twice")
            index.append(i)
            scales.append(float(scale))
    return groups


class RowPlan:
    """One batch's per-row adapters, grouped by adapter once and shared by every layer of the forward
    (grouping in each layer would repeat the same Python loop a hundred times per decoding step)."""

    def __init__(self, names: Sequence[RowAdapters]) -> None:
        self.names = names
        self._by_batch: dict[int, dict[str, tuple[list[int], list[float], tuple[int, int] | None]]] = {}
        self._coefficients: dict[tuple, torch.Tensor] = {}

    def groups(self, batch: int) -> dict[str, tuple[list[int], list[float], tuple[int, int] | None]]:
        """name -> (rows, scales, (start, stop) when the rows sit together) for a batch of ``batch`` rows."""
        found = self._by_batch.get(batch)
        if found is None:
            found = {name: (rows, scales, _consecutive(rows))
                     for name, (rows, scales) in row_groups(expand_row_names(self.names, batch)).items()}
            self._by_batch[batch] = found
        return found

    def coefficients(self, names: list[str], ranks: list[int], scalings: list[float], batch: int,
                     like: torch.Tensor) -> torch.Tensor:
        """(batch, sum of ranks): row i, adapter n's rank columns hold scaling_n * row i's scale of n."""
        key = (tuple(names), tuple(ranks), tuple(scalings), batch, like.dtype, like.device)
        found = self._coefficients.get(key)
        if found is None:
            groups = self.groups(batch)
            table = [[0.0] * sum(ranks) for _ in range(batch)]
            offset = 0
            for name, r, scaling in zip(names, ranks, scalings):
                rows, scales, _ = groups[name]
                for row, scale in zip(rows, scales):
                    table[row][offset:offset + r] = [scaling * scale] * r
                offset += r
            found = self._coefficients[key] = torch.tensor(table, dtype=like.dtype, device=like.device)
        return found


def _is_name_and_scale(pair: object) -> bool:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        return False
    name, scale = pair
    return isinstance(name, str) and isinstance(scale, (int, float)) and not isinstance(scale, bool) \
        and math.isfinite(scale)


def _consecutive(rows: Sequence[int]) -> tuple[int, int] | None:
    """(start, stop) when ``rows`` is start, start+1, ..., stop-1; else None."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return rows[0], rows[-1] + 1
    return None


@contextmanager
def row_adapters(layers: Sequence[LoraLayer], names: Sequence[RowAdapters] | None) -> Iterator[None]:
    """Within the block, every LoRA layer applies ``names[i]`` to batch row i: an adapter name, or
    (name, scale) pairs whose scaled outputs add up."""
    if names is None:
        yield
        return
    names = list(names)
    plan = RowPlan(names)
    for layer in layers:
        layer.row_adapters, layer._row_plan = names, plan
    try:
        yield
    finally:
        for layer in layers:
            layer.row_adapters, layer._row_plan = None, None
