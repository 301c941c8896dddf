"""Preference pairs from the embedded Shakespeare, no download: the benchmark's and the demonstration's data.

Each pair: ``prompt`` = a passage of consecutive lines of verse; ``chosen`` = the line(s) that truly
follow it; ``rejected`` = as many lines from far elsewhere in the plays (a plausible wrong
continuation: the same style, of about the same length, but not what comes next). Training pairs
come from the first 80% of the text, held-out pairs from the last 20%.
"""

from __future__ import annotations

import random


def _lines() -> list[str]:
    from adaptune.data.files import default_data_path

    text = default_data_path().read_text(encoding="utf-8")
    # verse and prose lines; a speaker's name alone ("MARCIUS:") is not a line of the play's text
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().endswith(":")]


def make_pairs(n: int, seed: int = 0, held_out: bool = False, prompt_lines: tuple[int, int] = (2, 5),
               answer_lines: tuple[int, int] = (1, 2)) -> list[dict[str, str]]:
    """``n`` pairs {prompt, chosen, rejected} (strings; answers start with a newline)."""
    lines = _lines()
    cut = int(len(lines) * 0.8)
    lo, hi = (cut, len(lines)) if held_out else (0, cut)
    rng = random.Random(seed + (10_000 if held_out else 0))
    pairs = []
    while len(pairs) < n:
        k, m = rng.randint(*prompt_lines), rng.randint(*answer_lines)
        start = rng.randrange(lo, hi - k - m)
        chosen = lines[start + k:start + k + m]
        far = rng.randrange(lo, hi - m)
        if abs(far - start) < 200:  # "elsewhere": not the same scene
            continue
        rejected = lines[far:far + m]
        if " ".join(chosen) == " ".join(rejected):
            continue
        pairs.append({"prompt": "\n".join(lines[start:start + k]), "chosen": "\n" + "\n".join(chosen),
                      "rejected": "\n" + "\n".join(rejected)})
    return pairs
