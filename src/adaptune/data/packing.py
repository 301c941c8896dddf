"""Packing: several examples in one row, never split, with ``position_ids`` restarting at 0 for each
(first fit over the whole dataset; :mod:`.batch_packing` packs within each batch instead). The
model must keep packed examples apart: :func:`supports_packing` checks that on the model itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .records import IGNORE_INDEX, Example


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit bin packing in O(n log n): the leftmost bin with room gets each item.

    A max-tree over the room left in each bin finds that bin; bins not yet opened have full room,
    so the first of them is found exactly when no open bin fits.
    """
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    room = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for item, need in enumerate(lengths):
        if need > capacity:
            raise ValueError(f"example of {need} tokens does not fit max_length {capacity}")
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        if node - size == len(bins):
            bins.append([])
        bins[node - size].append(item)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def _block(examples: list[Example]) -> dict[str, list[int]]:
    """One packed block. Each example's first label is -100: its logits would be predicted from
    the previous example's last token, which cannot see it (the same loss as unpacked)."""
    block: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        block["input_ids"] += example.input_ids
        block["labels"] += [IGNORE_INDEX] + list(example.labels[1:])
        block["position_ids"] += list(range(len(example)))
    return block


def pack_examples(examples: Sequence[Example], max_length: int) -> list[dict[str, list[int]]]:
    """Pack examples first-fit into blocks of at most max_length tokens, never splitting one."""
    bins = _first_fit([len(e) for e in examples], max_length)
    return [_block([examples[i] for i in b]) for b in bins]


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether ``model`` keeps packed examples apart (restarting position_ids, no mask).

    Checked on the model itself with a 4-token probe: two 2-token examples packed in one row must
    give the second the same logits as running it alone. False for any model that errors on
    position_ids or ignores them, so callers can fall back to
    ``packing=False``. Runs without a KV cache, as training does.
    """
    was_training = model.training
    try:
        param = next(model.parameters())
        vocab = model.get_input_embeddings().num_embeddings
        a, b = 1 % vocab, 2 % vocab
        ids = torch.tensor([[a, b, b, a]], device=param.device)
        model.eval()
        with torch.no_grad():
            positions = torch.tensor([[0, 1, 0, 1]], device=param.device)
            packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 2:]
            packed = packed.float()
            alone = model(input_ids=ids[:, 2:], use_cache=False).logits[0].float()
    except Exception:
        return False
    finally:
        model.train(was_training)
    tol = (1e-4 if param.dtype == torch.float32 else 2e-2) * max(1.0, alone.abs().max().item())
    return packed.shape == alone.shape and bool((packed - alone).abs().max() <= tol)
