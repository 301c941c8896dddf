"""Mixtures: several sources' examples in the shares their weights ask for, the same for a seed."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def mixture_counts(sizes: Sequence[int], weights: Sequence[float] | None) -> list[int]:
    """How many examples each source gives: the mixture is as large as all sources together, and
    source i gives ``weights[i] / sum(weights)`` of it (largest remainders rounded up, so the counts
    add up exactly); without weights each gives all it has."""
    if weights is None:
        return list(sizes)
    total, wsum = sum(sizes), float(sum(weights))
    exact = [total * w / wsum for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def _take(items: Sequence[T], count: int, rng: random.Random) -> list[T]:
    """``count`` items: the whole list as many times as it fits, then a random subset (in order)."""
    whole, rest = divmod(count, len(items)) if items else (0, 0)
    chosen = sorted(rng.sample(range(len(items)), rest))
    return list(items) * whole + [items[i] for i in chosen]


def mix(parts: Sequence[Sequence[T]], weights: Sequence[float] | None, seed: int) -> tuple[list[T], list[int]]:
    """The mixed examples (shuffled with ``seed``, so packed blocks mix the sources) and how many
    each source gave."""
    counts = mixture_counts([len(p) for p in parts], weights)
    mixed: list[T] = []
    for i, (part, count) in enumerate(zip(parts, counts)):
        mixed += _take(part, count, random.Random(f"{seed}:mixture:{i}"))
    random.Random(f"{seed}:mixture").shuffle(mixed)
    return mixed, counts
