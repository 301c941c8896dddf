"""The model card (``README.md``) ``adaptune train`` writes beside the adapter: the command that
trained it, the data, what it measured, and every setting, so the folder says how it was made."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .job import TrainJob

__all__ = ["data_names", "model_card"]


def model_card(job: TrainJob, result: dict) -> str:
    """The card's Markdown: YAML front matter the hub reads, then the command, data and results."""
    from ..hub import portable_name

    command = "adaptune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "adaptune train"
    tags = ["peft", "adaptune", job.method] + ([job.objective] if job.objective != "sft" else [])
    what = f"{job.method} adapter" + (f", preference-tuned ({job.objective})," if job.objective != "sft" else "")
    return "\n".join([
        "---", "library_name: adaptune", f"base_model: {portable_name(job.model)}",
        f"tags: [{', '.join(tags)}]", "---", "",
        f"# {what} trained with adaptune", "",
        "Trained with:", "", "```", command, "```", "",
        f"Data: {data_names(job)}; {_size(job, result)}; {result.get('steps')} steps.", "",
        _results(job, result), "",
        "Load with `adaptune generate --adapter <this folder>`, or in Python with "
        "`adaptune.PeftModel.from_pretrained(base, folder)` (peft reads it too).", "",
        "Full settings:", "", "```json", json.dumps(dataclasses.asdict(job), indent=2, default=str), "```", "",
    ])


def _size(job: TrainJob, result: dict) -> str:
    if job.objective == "sft":
        return f"{result.get('train_blocks')} training blocks of up to {job.max_length} tokens"
    rows = "rows" if job.objective == "kto" else "pairs"
    return f"{result.get('train_examples')} training {rows} of up to {job.max_length} tokens"


def _results(job: TrainJob, result: dict) -> str:
    nan = float("nan")
    if job.objective == "sft":
        return (f"Validation perplexity: {result.get('ppl_before', nan):.2f} before, "
                f"{result.get('ppl_after', nan):.2f} after.")
    before, after = result.get("eval_before") or {}, result.get("eval_after") or {}
    return (f"Held-out reward accuracy: {before.get('rewards/accuracies', nan):.3f} before, "
            f"{after.get('rewards/accuracies', nan):.3f} after; reward margin "
            f"{before.get('rewards/margins', nan):.3f} before, {after.get('rewards/margins', nan):.3f} after.")


def data_names(job: TrainJob) -> str:
    """The data as the card names it: the file, folder or hub id of each source."""
    if job.data is None:
        return "embedded Shakespeare"
    items = job.data if isinstance(job.data, list) else [job.data]
    return ", ".join(f"`{item.get('path') if isinstance(item, dict) else item}`" for item in items)
