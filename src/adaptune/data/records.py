"""Records of the data pipeline: a token example, the report of what reading a file did, and the
one reason a row cannot be used (counted in the report, never a crash)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

IGNORE_INDEX = -100  # the label of a token that gets no loss
MAX_BAD_LINES = 5  # line numbers kept in the report


@dataclass
class Example:
    """One training example; ``labels`` is ``-100`` where the token gets no loss."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataReport:
    """What loading a file did: counts the user can check, so nothing is dropped unseen."""

    path: str
    fmt: str = ""
    name: str = ""                      # how the summary names the source (default: the file's name)
    rows_read: int = 0                  # JSON rows, or lines of a plain-text file
    examples_kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated: int = 0                  # examples cut to max_length (overlong="truncate")
    bad_lines: list[int] = field(default_factory=list)     # first few bad rows' line numbers
    line_unit: str = "line"             # "item" for rows of a JSON array (1-based)
    tokens: int = 0                     # tokens in kept examples
    trained_tokens: int = 0             # of those, tokens whose label is not -100
    limited_to: int | None = None       # build_datasets(max_examples=...) cut the examples to this
    train_examples: int | None = None
    val_examples: int | None = None
    train_blocks: int | None = None     # features after packing (== examples when not packed)
    cached: bool = False                # the tokens came from the tokenization cache

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, where: int | None = None) -> None:
        """Count one unusable row (or tail) under ``reason``; remember where the first few were."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if where is not None and len(self.bad_lines) < MAX_BAD_LINES and where not in self.bad_lines:
            self.bad_lines.append(where)

    def skipped_text(self) -> str:
        """'3 invalid JSON, 1 missing 'text' (first at lines 2, 5)', most frequent reason first."""
        parts = [f"{n} {reason}" for reason, n in Counter(self.skipped).most_common()]
        text = ", ".join(parts)
        if self.bad_lines:
            text += f" (first at {self.line_unit}s {', '.join(map(str, self.bad_lines))})"
        return text

    def summary(self) -> str:
        """One or two lines for people: what was read, kept, skipped and trained on."""
        share = 100.0 * self.trained_tokens / max(self.tokens, 1)
        line = (f"{self.name or Path(self.path).name} ({self.fmt}): {self.rows_read:,} rows -> "
                f"{self.examples_kept:,} examples, {self.tokens:,} tokens ({share:.0f}% trained)")
        if self.cached:
            line += " (tokens from the cache)"
        if self.truncated:
            line += f"; {self.truncated:,} truncated"
        if self.limited_to is not None:
            line += f"; limited to the first {self.limited_to:,}"
        if self.train_examples is not None:
            line += f"; train {self.train_examples:,} / val {self.val_examples:,}"
            if self.train_blocks is not None and self.train_blocks != self.train_examples:
                line += f" (train packed into {self.train_blocks:,} blocks)"
        if self.skipped:
            line += f"\nskipped {self.n_skipped:,}: {self.skipped_text()}"
        return line


class BadRow(Exception):
    """A row that cannot become an example; its message is the reason counted in the report."""


@dataclass
class MixtureReport:
    """What several sources gave a mixture: each source's own report, and how many of its training
    examples it had and gave (more than it had: its examples repeat, as its weight asks)."""

    sources: list[DataReport]
    had: list[int]
    gave: list[int]
    weights: list[float] | None = None
    train_examples: int | None = None
    val_examples: int | None = None
    train_blocks: int | None = None

    def shares_text(self) -> str:
        total = sum(self.weights) if self.weights else None
        parts = []
        for i, report in enumerate(self.sources):
            share = f" (weight {self.weights[i]:g}, {100 * self.weights[i] / total:.0f}%)" if total else ""
            parts.append(f"{report.name or Path(report.path).name} gave {self.gave[i]:,} of its "
                         f"{self.had[i]:,} training examples{share}")
        return "; ".join(parts)

    def summary(self) -> str:
        lines = [r.summary() for r in self.sources]
        line = f"mixture: {self.shares_text()}"
        if self.train_examples is not None:
            line += f"; train {self.train_examples:,} / val {self.val_examples:,}"
            if self.train_blocks is not None and self.train_blocks != self.train_examples:
                line += f" (train packed into {self.train_blocks:,} blocks)"
        return "\n".join([*lines, line])
