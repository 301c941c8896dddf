"""adaptune.speedups.applied: the one switch the Trainer uses, and the model given back as it came."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from adaptune import LoraConfig, get_peft_model
from adaptune.speedups import Speedups, applied
from adaptune.speedups.swiglu import fuse_gated_mlps
from tests.tiny import tiny_llama

EVERYTHING = Speedups(fused_mlp_activation=True, fused_rms_norm=True, lean_autocast=True, packed_attention=True,
                      compile_layers=True)


def _instance_forwards(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in vars(m)]


def _compiled(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]


def _attention(model: torch.nn.Module) -> set[str]:
    return {m.config._attn_implementation for m in model.modules() if getattr(m, "config", None) is not None}


def test_applied_switches_for_the_block_and_restores_after():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert _instance_forwards(model) == [] and _attention(model) == {"sdpa"}
    with applied(model, EVERYTHING) as counts:
        layers = model.get_base_model().config.num_hidden_layers
        assert counts["fused_mlp_activation"] == layers
        assert counts["fused_rms_norm"] == 2 * layers + 1
        assert counts["lean_autocast"] > 0 and counts["compile_layers"] == layers
        assert counts["packed_attention"] >= 1 and _attention(model) == {"adaptune_packed_sdpa"}
        assert len(_instance_forwards(model)) > 0 and len(_compiled(model)) == layers
    assert _instance_forwards(model) == [] and _compiled(model) == [] and _attention(model) == {"sdpa"}


def test_applied_restores_after_an_error_and_keeps_what_was_switched_before():
    model = tiny_llama()
    assert fuse_gated_mlps(model) == 2  # the user's own switch, before the block
    before = _instance_forwards(model)
    with pytest.raises(RuntimeError, match="boom"), applied(model, Speedups()) as counts:
        assert counts["fused_mlp_activation"] == 0  # already switched: nothing new
        raise RuntimeError("boom")
    assert _instance_forwards(model) == before and _attention(model) == {"sdpa"}


class _Seen(TrainerCallback):
    def __init__(self):
        self.forwards = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.forwards = _instance_forwards(model)


def test_trainer_gives_the_model_back_as_it_came(tmp_path):
    from adaptune import Trainer, TrainingArguments
    from adaptune.data import DataCollator

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(3, 150, (8, 12))
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    seen = _Seen()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, save_strategy="no",
                             disable_tqdm=True, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollator(0), callbacks=[seen])
    trainer.train()
    assert seen.forwards  # the fused paths ran while training
    assert _instance_forwards(model) == [] and _attention(model) == {"sdpa"}
    assert trainer.speedups_applied["fused_mlp_activation"] == 2
