"""One LoRA training run for test_distributed's FSDP2 test: ``python -m tests.fsdp2_worker OUT``
alone, or under ``torchrun --nproc_per_node 2`` with each decoder layer and the whole model
sharded by FSDP2 (``fully_shard``, gloo on a CPU). Writes the adapter and each step's loss."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from adaptune import LoraConfig, get_peft_model
from adaptune.errors import AdapterFileError
from adaptune.speedups.loss import supports_chunked_loss
from tests.tiny import nonzero_lora_b, tiny_llama

STEPS, ROWS, LENGTH = 3, 4, 16


def main(out: Path) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["q_proj", "v_proj"]))
    nonzero_lora_b(model, std=0.02)  # a non-zero B, so that A's gradient is not zero either
    ids = torch.randint(0, model.config.vocab_size, (ROWS, LENGTH), generator=torch.Generator().manual_seed(1))
    record = {"chunked_loss_before": supports_chunked_loss(model)}
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        share = ROWS // world
        ids = ids[rank * share:(rank + 1) * share]
    record["chunked_loss_after"] = supports_chunked_loss(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        gathered = [None] * world
        dist.all_gather_object(gathered, losses)
        losses = [sum(step) / world for step in zip(*gathered)]  # equal shares: the global mean
    else:
        state = model.state_dict()
    if rank == 0:
        if world > 1:  # the modules hold shards: saving from them is refused, with what to do
            try:
                model.save_pretrained(out / "from-shards")
            except AdapterFileError as exc:
                record["save_from_shards"] = str(exc)
        model.save_pretrained(out / "adapter", state_dict=state)
        (out / "run.json").write_text(json.dumps({**record, "losses": losses}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # After FSDP2 on gloo, about one run in eight aborted *at interpreter exit*, after its group was
    # destroyed ("terminate called without an active exception", SIGABRT; 3 of 26 runs). Ending
    # the process here skips that teardown: 0 of 30 runs aborted.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
