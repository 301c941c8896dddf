"""adaptune.training.trainer / adaptune.callbacks: transformers' Trainer with adaptune's fallbacks and callbacks.

The adapter models here are adaptune's own (the tutorial's GPT-2 q/v slices), with the
same API as peft.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset
from transformers import TrainerCallback
from transformers import trainer_callback as hf_callbacks

from adaptune import device
from adaptune.atomic import read_jsonl
from adaptune.data import LabelsAndTuplesCollator
from adaptune.errors import AdaptuneWarning, ConfigError, DataError, EnvironmentProblem
from adaptune.training.arguments import TrainingArguments
from adaptune.training.callbacks import DivergenceGuard, MetricsLogger, ProgressCallback, TrainingDiverged
from adaptune.training.checkpoints import last_complete_checkpoint
from adaptune.training.trainer import Trainer
from tests.tiny import tiny_gpt2

ON_CPU_ONLY = device.accelerator_type() is None
# For tests about something else than the fallback warnings themselves.
quiet = pytest.mark.filterwarnings("ignore::adaptune.errors.AdaptuneWarning")



def peft_gpt2(lora_seed: int = 0):
    """The same tiny GPT-2 base every time, with adaptune's LoRA on the tutorial's q/v slices;
    ``lora_seed`` picks the LoRA A init."""
    from adaptune import LoraConfig, TaskType, get_peft_model

    base = tiny_gpt2(seed=0)
    torch.manual_seed(lora_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Conv1D fan_in_fan_out note
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_attn", "v_attn"],
                                               lora_dropout=0.05, task_type=TaskType.CAUSAL_LM))


def token_rows(n: int = 48, length: int = 16, seed: int = 0, pad_tail: int = 3):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(7, 150, (n, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    if pad_tail:
        input_ids[:, -pad_tail:] = 0
        attention_mask[:, -pad_tail:] = 0
    return input_ids, attention_mask


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def fallback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, AdaptuneWarning)]


# ---- the tutorial script -----------------------------------------------------------------------


def test_tutorial_script_runs_and_says_each_fallback_once(tmp_path, tokenizer):
    peft_model = peft_gpt2()
    input_ids, attention_mask = token_rows(48)
    before = lora_weights(peft_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # --- the classic script, imports changed to adaptune ---
        training_args = TrainingArguments(output_dir=str(tmp_path / "results"), num_train_epochs=1,
                                          per_device_train_batch_size=4, save_steps=10, logging_steps=10,
                                          learning_rate=2e-4, fp16=True)
        trainer = Trainer(model=peft_model, args=training_args,
                          train_dataset=TensorDataset(input_ids, attention_mask), tokenizer=tokenizer)
        output = trainer.train()
        # ---
    said = fallback_warnings(caught)
    expected = ["processing_class", "tuples", "no labels"] + (["fp16=True"] if ON_CPU_ONLY else [])
    for key in expected:
        assert sum(key in m for m in said) == 1, (key, said)
    assert len(said) == len(expected), said
    if ON_CPU_ONLY:
        assert not training_args.fp16 and not training_args.bf16

    assert output.global_step == 12 and math.isfinite(output.training_loss)
    after = lora_weights(peft_model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert trainer.processing_class is tokenizer

    # tokens: every micro-batch counted; padding (3 of 16 per row) is not a useful token
    assert trainer.step_stats.tokens == 12 * 4 * 16
    assert trainer.step_stats.useful_tokens == 12 * 4 * 13

    # checkpoints are adapter folders, not whole models
    ckpt = tmp_path / "results" / "checkpoint-10"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json",
            "tokenizer.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin", "training_args.bin"}

    records = read_jsonl(tmp_path / "results" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [10]
    assert "train_loss" in records[-1]
    assert (tmp_path / "results" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_callbacks_replace_transformers_progress_bar(tmp_path):
    trainer = Trainer(model=peft_gpt2(), args=TrainingArguments(output_dir=str(tmp_path)))
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert hf_callbacks.ProgressCallback not in kinds
    assert ProgressCallback in kinds and MetricsLogger in kinds and DivergenceGuard in kinds
    assert trainer.args.report_to == [] or trainer.args.report_to in ("none", ["none"])


@quiet
def test_metrics_and_plot_with_eval_and_learning(tmp_path):
    row = torch.arange(10, 26).repeat(32, 1)  # one sentence, learnable
    ds = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in row]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4,
                             logging_steps=1, eval_strategy="steps", eval_steps=6, save_strategy="no",
                             learning_rate=5e-3)
    Trainer(model=peft_gpt2(), args=args, train_dataset=ds, eval_dataset=ds[:8]).train()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


# ---- fallbacks one by one ----------------------------------------------------------------------


@pytest.mark.parametrize("asked, accelerator, native_bf16, expect", [
    ("fp16", None, False, "fp32"),
    ("bf16", None, False, "fp32"),
    ("fp16", "cuda", True, "fp16"),   # fp16 works where bf16 does: kept as asked
    ("bf16", "cuda", False, "fp16"),  # pre-Ampere GPU
])
def test_precision_fallback(tmp_path, monkeypatch, asked, accelerator, native_bf16, expect):
    monkeypatch.setattr("adaptune.device.accelerator_type", lambda: accelerator)
    monkeypatch.setattr("adaptune.device.bf16_native", lambda d: native_bf16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = TrainingArguments(output_dir=str(tmp_path), **{asked: True})
    assert (args.fp16, args.bf16) == (expect == "fp16", expect == "bf16")
    said = fallback_warnings(caught)
    assert len(said) == (0 if expect == asked else 1)
    if said:
        assert f"{asked}=True" in said[0] and f"uses {expect}" in said[0]
        assert caught[0].filename == __file__  # points at the user's line


def test_bf16_with_use_cpu_is_kept(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaptuneWarning)
        args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True)
    assert args.bf16


def test_tokenizer_and_processing_class_together_is_an_error(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="once"):
        Trainer(model=peft_gpt2(), args=TrainingArguments(output_dir=str(tmp_path)), tokenizer=tokenizer,
                processing_class=tokenizer)


def test_collator_tuples_labels_and_padding():
    from transformers import default_data_collator

    collate = LabelsAndTuplesCollator(default_data_collator)
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids != 0).long()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collate([(ids[0], mask[0]), (ids[1], mask[1])])
        collate([(ids[0], mask[0])])
    assert torch.equal(batch["labels"], torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]]))
    assert torch.equal(batch["input_ids"], ids)
    assert len(fallback_warnings(caught)) == 2  # once each, not once per batch

    given = torch.tensor([-100, 6, 7, -100])
    batch = collate([(ids[0], mask[0], given)])
    assert torch.equal(batch["labels"][0], given)

    not_lm = LabelsAndTuplesCollator(default_data_collator, causal_lm=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdaptuneWarning)
        assert "labels" not in not_lm([(ids[0], mask[0])])
    with pytest.raises(DataError, match="tuples of 4 items"):
        collate([(ids[0], mask[0], ids[0], ids[0])])


@quiet
def test_custom_collator_keeps_its_columns_default_collator_drops_strings(tmp_path, tokenizer):
    seen = []

    def my_collator(features):
        seen.append(sorted(features[0]))
        ids = torch.stack([f["input_ids"] for f in features])
        return {"input_ids": ids, "labels": ids}

    ids, mask = token_rows(4, pad_tail=0)
    rows = [{"input_ids": i, "attention_mask": m, "prompt_len": 3, "text": "the king"} for i, m in zip(ids, mask)]
    args = TrainingArguments(output_dir=str(tmp_path / "a"), max_steps=1, per_device_train_batch_size=4,
                             save_strategy="no")
    Trainer(model=peft_gpt2(), args=args, train_dataset=rows, data_collator=my_collator).train()
    assert seen[0] == ["attention_mask", "input_ids", "prompt_len", "text"]
    assert args.remove_unused_columns is False

    args = TrainingArguments(output_dir=str(tmp_path / "b"), max_steps=1, per_device_train_batch_size=4,
                             save_strategy="no")
    Trainer(model=peft_gpt2(), args=args, train_dataset=rows, processing_class=tokenizer).train()
    assert args.remove_unused_columns is True


def test_unwritable_output_dir_fails_before_training(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(EnvironmentProblem, match="cannot create output directory"):
        Trainer(model=peft_gpt2(), args=TrainingArguments(output_dir=str(tmp_path / "a_file" / "out")))


# ---- divergence --------------------------------------------------------------------------------


@quiet
def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    model = peft_gpt2()
    at = {"step": 0}

    class TrackStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            at["step"] = state.global_step + 1

    def poison(module, inputs, output):  # every forward of the 5th training step gives NaN
        return output * float("nan") if at["step"] == 5 else output

    # the final norm, not lm_head: the chunked loss applies the head's weight without calling it
    model.get_base_model().transformer.ln_f.register_forward_hook(poison)
    ids, mask = token_rows(40)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4,
                             save_steps=2, logging_steps=1, learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=TensorDataset(ids, mask), callbacks=[TrackStep()])
    with pytest.raises(TrainingDiverged, match=r"nan at step 5.*checkpoint-4"):
        trainer.train()
    assert at["step"] == 5  # stopped right there
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all(torch.isfinite(w).all() for w in lora_weights(model).values())  # the bad batch was not applied
    assert (tmp_path / "loss.png").exists()
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert max(steps) == 5


# ---- resume ------------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Simulates a run killed right after the checkpoint at ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _resume_args(out: Path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, save_steps=3,
                             logging_steps=1, learning_rate=1e-2, seed=7, dataloader_drop_last=True)


@quiet
def test_resume_from_adapter_checkpoint_matches_uninterrupted_run(tmp_path):
    ids, mask = token_rows(40)
    data = TensorDataset(ids, mask)

    full = peft_gpt2()
    Trainer(model=full, args=_resume_args(tmp_path / "full"), train_dataset=data).train()

    first = peft_gpt2()
    Trainer(model=first, args=_resume_args(tmp_path / "cut"), train_dataset=data, callbacks=[StopAt(3)]).train()
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-3"]
    torn = tmp_path / "cut" / "checkpoint-9"  # a checkpoint a kill interrupted: must be skipped
    torn.mkdir()
    (torn / "trainer_state.json").write_text('{"global_st')

    resumed = peft_gpt2(lora_seed=1)  # other LoRA init: the adapter must come from the checkpoint
    trainer = Trainer(model=resumed, args=_resume_args(tmp_path / "cut"), train_dataset=data)
    trainer.train(resume_from_checkpoint=True)

    a, b = lora_weights(full), lora_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert any(w.abs().sum() > 0 for k, w in b.items() if "lora_B" in k)
    steps = [r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicate records from the cut run


def test_last_complete_checkpoint(tmp_path):
    from safetensors.torch import save_file

    assert last_complete_checkpoint(tmp_path / "missing") is None
    for step, state in [(2, "{}"), (10, "{}"), (12, '{"glo'), (3, None)]:
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        save_file({"w": torch.zeros(1)}, str(d / "adapter_model.safetensors"))
        for name in ("optimizer.pt", "scheduler.pt"):
            torch.save({}, d / name)
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-99.tmp").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


# ---- adaptune's own PeftModel ------------------------------------------------------------------


@quiet
def test_adaptune_peft_model_checkpoints_and_resumes(tmp_path):
    """A wrapper transformers does not recognise, with forward(*args, **kwargs) (no task_type)."""
    from adaptune import LoraConfig, get_peft_model

    def make():
        return get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))

    ids, mask = token_rows(24)
    ds = [{"input_ids": i, "attention_mask": m, "labels": i.masked_fill(m == 0, -100)} for i, m in zip(ids, mask)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, save_steps=2,
                             eval_strategy="steps", eval_steps=2, logging_steps=2, learning_rate=1e-2)
    model = make()
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds[:4], callbacks=[StopAt(2)])
    assert trainer.label_names == ["labels"]
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval_loss" in r] == [2]
    trained = lora_weights(model)

    resumed = make()
    trainer = Trainer(model=resumed, args=args, train_dataset=ds, eval_dataset=ds[:4])
    loaded = []
    trainer.add_callback(type("Peek", (TrainerCallback,), {
        "on_train_begin": lambda self, a, s, c, model=None, **k: loaded.append(lora_weights(model))}))
    trainer.train(resume_from_checkpoint=str(ckpt))
    for k in trained:
        torch.testing.assert_close(loaded[0][k], trained[k], rtol=0, atol=0)
    assert json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


def test_plain_transformers_trainer_saves_and_resumes_an_adaptune_adapter(tmp_path):
    """A peft script that only changed its import line: transformers' own Trainer, save_model and
    resume must give adapter folders (peft's format), not a full model.safetensors."""
    import transformers

    from adaptune import LoraConfig, PeftModel, get_peft_model

    def make(seed: int):
        torch.manual_seed(seed)
        return get_peft_model(tiny_gpt2(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                            fan_in_fan_out=True, task_type="CAUSAL_LM"))

    ids, mask = token_rows(24)
    ds = [{"input_ids": i, "attention_mask": m, "labels": i.masked_fill(m == 0, -100)} for i, m in zip(ids, mask)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                                          save_steps=2, learning_rate=1e-2, report_to="none", use_cpu=True)
    model = make(0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds)
    assert type(trainer) is transformers.Trainer
    trainer.train()
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"):
        assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
        assert not (folder / "model.safetensors").exists()
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()
    trained = lora_weights(model)
    assert any(w.abs().sum() > 0 for k, w in trained.items() if "lora_B" in k)

    loaded = PeftModel.from_pretrained(tiny_gpt2(seed=0), str(tmp_path / "final"))
    for k, w in lora_weights(loaded).items():
        torch.testing.assert_close(w, trained[k], rtol=0, atol=0)

    # resume: the adapter of checkpoint-2 comes back into a model with another LoRA init
    at_two = lora_weights(PeftModel.from_pretrained(tiny_gpt2(seed=0), str(tmp_path / "run" / "checkpoint-2")))
    resumed = make(1)
    seen = []
    trainer = transformers.Trainer(model=resumed, args=args, train_dataset=ds)
    trainer.add_callback(type("Peek", (TrainerCallback,), {
        "on_train_begin": lambda self, a, s, c, model=None, **k: seen.append(lora_weights(model))}))
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for k, w in at_two.items():
        torch.testing.assert_close(seen[0][k], w, rtol=0, atol=0)


# ---- what a run says --------------------------------------------------------------------------


def test_log_records_become_one_short_line_each():
    from adaptune.training.callbacks import format_log_record

    line = format_log_record({"loss": 4.2019, "grad_norm": 0.5312, "learning_rate": 0.001, "epoch": 0.08}, 5, 60)
    assert line == "step 5/60  loss 4.202  grad norm 0.5312  lr 0.001"
    assert format_log_record({"eval_loss": 3.5, "eval_runtime": 1.2, "epoch": 1.0}, 30, 60) == \
        "step 30/60  validation loss 3.5"
    done = format_log_record({"train_runtime": 12.34, "train_loss": 4.1, "train_samples_per_second": 9.0}, 60, 60)
    assert done == "training done: 60 steps in 12.3 s, mean loss 4.1"


@quiet
def test_a_gradient_stuck_at_zero_is_said_once(tmp_path, caplog, monkeypatch):
    """A far too high learning rate can saturate the activations: the loss stays finite, the
    gradient is exactly 0, and the run changes nothing. That is said once, with the step."""
    import logging

    plain_loss = Trainer.compute_loss
    monkeypatch.setattr(Trainer, "compute_loss", lambda self, *a, **k: plain_loss(self, *a, **k) * 0.0)
    ids, mask = token_rows(n=32, pad_tail=0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, logging_steps=1,
                             save_strategy="no", disable_tqdm=True, use_cpu=True, learning_rate=1e3)
    trainer = Trainer(model=peft_gpt2(), args=args, train_dataset=TensorDataset(ids, mask))
    with caplog.at_level(logging.WARNING, logger="adaptune"):
        trainer.train()
    said = [r.getMessage() for r in caplog.records if "gradient norm has been exactly 0" in r.getMessage()]
    assert len(said) == 1 and "since step 1" in said[0] and "1000" in said[0]
