"""Where a streamed run stands, saved with each checkpoint and read back by ``--resume``.

``stream_state.json`` in ``checkpoint-N`` holds the stream position after the blocks the first N
steps trained on (seed, window, block, each source's row and pass: see
:mod:`adaptune.data.streaming`). It is written atomically before transformers writes the
checkpoint, whose ``trainer_state.json`` is written last: a checkpoint that reads whole always has
its position.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..atomic import atomic_write_json
from ..errors import ConfigError

STREAM_STATE = "stream_state.json"


def blocks_trained(args: Any, global_step: int) -> int:
    """Stream blocks the first ``global_step`` optimizer steps consumed (every batch is full: the
    stream never ends)."""
    return global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)


class StreamPositionSaver(TrainerCallback):
    """Writes ``stream_state.json`` into the checkpoint folder the step is about to save.

    Runs at the end of the step, after the callbacks that decide whether to save (transformers'
    flow callback, adaptune's divergence guard), before transformers saves.
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_step_end(self, args, state, control, **kwargs):
        if not (control.should_save and args.should_save):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / STREAM_STATE, self.dataset.position_at(blocks_trained(args, state.global_step)))


def resume_stream(dataset: Any, checkpoint: str | Path, say: Callable[[str], None]) -> None:
    """Make the stream go on where ``checkpoint`` left it."""
    path = Path(checkpoint) / STREAM_STATE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the stream position ({exc}); train into a new --output") from None
    position = dataset.resume(saved)
    say(f"--resume: the stream goes on at block {position.block:,} (block {position.offset:,} of window "
        f"{position.window:,})")
