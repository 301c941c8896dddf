"""Packing inside each batch: the same examples per optimizer step as padded batches, less padding.

``adaptune.data.build_datasets(packing=True)`` packs the whole dataset before batching, so a batch
of ``B`` rows holds ~``B * max_length / mean_length`` examples: fewer, larger optimizer steps than
the same ``batch_size`` of padded examples. :class:`BatchPackingCollator` keeps the batch a set of
``B`` *examples* (the sampler's) and packs just those into rows of at most ``max_length`` tokens
(the row width and order that waste least: never more tokens than padding the batch), with
restarting ``position_ids`` and no attention mask, as
``DataCollator(packing=True)`` does. The loss (mean over label tokens) and the gradient of each
step are then those of the padded batch; only the padding compute is gone. The model must run with
``use_cache=False`` (``transformers.Trainer`` does), so that packed examples do not see each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .collate import DataCollator
from .packing import pack_examples
from .records import Example

__all__ = ["BatchPackingCollator"]


def _example(feature: Example | dict[str, Any]) -> Example:
    if isinstance(feature, Example):
        return feature
    ids = feature["input_ids"]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    labels = feature.get("labels", ids)
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    if "position_ids" in feature:
        raise ValueError("BatchPackingCollator takes unpacked examples; features with position_ids are "
                         "already packed (use DataCollator(packing=True) for those)")
    return Example(ids, labels)


class BatchPackingCollator:
    """Pack each batch's examples into rows of at most ``max_length`` tokens (first fit).

    Each example keeps its tokens and labels, except that its first label becomes -100 (nothing
    before it in its row predicts it; a padded batch never predicts a row's first token either).
    """

    def __init__(self, pad_token_id: int, max_length: int, pad_to_multiple_of: int | None = None) -> None:
        self.max_length = int(max_length)
        self.inner = DataCollator(pad_token_id, packing=True, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, features: Sequence[Example | dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = [_example(f) for f in features]
        return self.inner(self.pack(examples))

    def pack(self, examples: Sequence[Example]) -> list[dict[str, list[int]]]:
        """The rows for one batch: every row width from the longest example to ``max_length``, each
        with first fit in the batch's order and in decreasing length; the packing with the fewest
        tokens (rows x widest row; ties: fewer rows) wins. At worst one example a row at the
        longest example's width: never more tokens than padding the batch."""
        lengths = [len(e) for e in examples]
        longest = max(lengths)
        widths = list(range(longest, max(longest, self.max_length) + 1))
        if len(widths) * len(lengths) ** 2 > 200_000:  # big batches: 32 widths, evenly spread
            widths = sorted({widths[round(i * (len(widths) - 1) / 31)] for i in range(32)})
        orders = [list(range(len(examples))), sorted(range(len(examples)), key=lambda i: -lengths[i])]
        best: tuple[tuple[int, int], list[int], int] | None = None
        for width in widths:
            for order in orders:
                fills = _first_fit_fills([lengths[i] for i in order], width)
                cost = (len(fills) * max(fills), len(fills))
                if best is None or cost < best[0]:
                    best = (cost, order, width)
        _, order, width = best
        return pack_examples([examples[i] for i in order], width)


def _first_fit_fills(lengths: Sequence[int], capacity: int) -> list[int]:
    """Tokens in each row after first fit (the rows ``pack_examples`` makes for this order)."""
    fills: list[int] = []
    for n in lengths:
        for j, used in enumerate(fills):
            if used + n <= capacity:
                fills[j] += n
                break
        else:
            fills.append(n)
    return fills
