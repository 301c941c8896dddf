"""Preference tuning without TRL: data, the chunked log-probs, packing, the reference and its cache,
resume, the CLI (``adaptune train --objective ...``) and the loss plot."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adaptune
from adaptune.cli import main
from adaptune.data.preference import PreferenceCollator, load_preference_data
from adaptune.errors import ConfigError, DataError
from adaptune.speedups.loss import sequence_log_probs, token_log_probs
from tests.tiny import WORDS, make_tokenizer, tiny_llama


def _words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(k))


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": _words(rng, rng.randint(2, 5)), "chosen": " the king " + _words(rng, rng.randint(1, 3)),
             "rejected": " " + _words(rng, rng.randint(1, 5))} for _ in range(n)]


def _write(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))
    return path


# ---- data ------------------------------------------------------------------------------------------


def test_pairs_file_counts_bad_rows_by_reason_with_line_numbers(tmp_path):
    path = _write(tmp_path / "p.jsonl", _pairs(5), [
        "{not json", json.dumps({"prompt": "a", "chosen": " b"}), json.dumps({"prompt": "a", "chosen": " b",
                                                                            "rejected": " b"}),
        json.dumps({"prompt": 3, "chosen": " b", "rejected": " c"}), json.dumps({"prompt": "a", "chosen": " ",
                                                                               "rejected": " c"})])
    features, report = load_preference_data(path, make_tokenizer(), "pairs", max_length=64)
    assert len(features) == 5 and report.rows_read == 10
    assert report.skipped == {"invalid JSON": 1, "missing 'rejected'": 1, "chosen and rejected are the same": 1,
                              "'prompt' is not a string or a non-empty list of messages": 1, "empty 'chosen'": 1}
    assert report.bad_lines == [6, 7, 8, 9, 10]
    tok = make_tokenizer()
    first = features[0]
    row = _pairs(5)[0]
    assert tok.decode(first["prompt_ids"]) == row["prompt"]
    assert tok.decode(first["chosen_ids"]) == (row["chosen"] + " </s>").strip()  # EOS appended, as TRL does


def test_chat_pairs_with_and_without_prompt_use_the_template(tmp_path):
    tok = make_tokenizer()
    user = [{"role": "user", "content": "the king"}]
    good, bad = [{"role": "assistant", "content": "a lord"}], [{"role": "assistant", "content": "the water"}]
    path = _write(tmp_path / "chat.jsonl", [{"prompt": user, "chosen": good, "rejected": bad},
                                            {"chosen": user + good, "rejected": user + bad}])
    features, _ = load_preference_data(path, tok, "pairs")
    assert features[0] == features[1]
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert tok.decode(features[0]["prompt_ids"]).split() == prompt.split()
    assert tok.decode(features[0]["chosen_ids"]).split() == ["a", "lord", "</s>"]


def test_kto_rows_and_pairs_unpaired_for_kto(tmp_path):
    tok = make_tokenizer()
    kto = _write(tmp_path / "k.jsonl", [{"prompt": "the king", "completion": " a lord", "label": True},
                                        {"prompt": "the king", "completion": " water", "label": "yes"}])
    features, report = load_preference_data(kto, tok, "kto")
    assert [f["label"] for f in features] == [True] and report.skipped == {"'label' is not true or false": 1}
    features, report = load_preference_data(_write(tmp_path / "p.jsonl", _pairs(3)), tok, "kto")
    assert [f["label"] for f in features] == [True, False] * 3 and report.fmt == "pairs, unpaired for KTO"
    with pytest.raises(DataError, match="holds KTO rows"):
        load_preference_data(kto, tok, "pairs")
    with pytest.raises(DataError, match="not preference data"):
        load_preference_data(_write(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}]), tok, "pairs")


def test_long_rows_keep_their_start_and_a_prompt_filling_max_length_is_skipped(tmp_path):
    rows = [{"prompt": "the king", "chosen": " a " * 20, "rejected": " b"},
            {"prompt": "the " * 12, "chosen": " a", "rejected": " b"}]
    features, report = load_preference_data(_write(tmp_path / "p.jsonl", rows), make_tokenizer(), "pairs",
                                            max_length=10)
    assert len(features) == 1 and report.truncated == 1 and report.skipped == {"prompt fills max_length 10": 1}
    assert len(features[0]["prompt_ids"]) + len(features[0]["chosen_ids"]) == 10


def _scored(batch, prefix=""):
    """(flat position, target, sequence, is answer) of each scored prediction."""
    return list(zip(*(batch[prefix + k].tolist() for k in ("target_index", "target_ids", "target_sequence",
                                                            "target_answer"))))


FEATURES = [{"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9], "index": 3},
            {"prompt_ids": [10], "chosen_ids": [11, 12], "rejected_ids": [13], "index": 4}]


def test_collator_shares_each_prompt_in_one_row():
    batch = PreferenceCollator(0, "shared")(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3, 0, 1, 2, 1]]  # rejected goes on from the prompt
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9, -100, 11, 12, 13]]
    # pair 0: chosen (seq 0) and rejected (seq 2) are both first predicted by the prompt's last token (col 1)
    assert _scored(batch) == [(0, 6, 0, False), (1, 7, 0, True), (1, 8, 2, True), (3, 9, 2, True),
                              (5, 11, 1, True), (6, 12, 1, True), (5, 13, 3, True)]
    assert batch["answer_tokens"].tolist() == [1, 2, 2, 1] and batch["index"].tolist() == [3, 4]


def test_collator_packs_sequences_in_one_row_or_pads_them():
    packed = PreferenceCollator(0, "packed")(FEATURES)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 5, 6, 8, 9, 10, 11, 12, 10, 13]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 0, 1]]
    assert "attention_mask" not in packed
    assert _scored(packed)[:4] == [(0, 6, 0, False), (1, 7, 0, True), (3, 6, 2, False), (4, 8, 2, True)]
    padded = PreferenceCollator(0, packing=False)(FEATURES)
    assert padded["input_ids"].shape == (4, 4) and padded["attention_mask"].sum().item() == 12
    assert (4, 6, 2, False) in _scored(padded) and (6, 9, 2, True) in _scored(padded)  # row 1: flat 4 + col
    kto = PreferenceCollator(0, "shared")([{"prompt_ids": [5], "completion_ids": [6, 7], "label": True,
                                            "KL_completion_ids": [8]}])
    assert kto["label"].tolist() == [True] and _scored(kto, "KL_") == [(0, 8, 0, True)]


# ---- chunked log-probs -------------------------------------------------------------------------------


class _Largest(TorchDispatchMode):
    """The largest tensor any op returns inside the block."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("trainable_head", [False, True])
def test_token_log_probs_equal_log_softmax_without_the_full_logits(trainable_head):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    head = torch.nn.Linear(16, 120, bias=False).requires_grad_(trainable_head)
    targets = torch.randint(0, 120, (50,))
    weights = torch.randn(50)
    full = torch.log_softmax(head(hidden), dim=-1).gather(1, targets[:, None]).squeeze(1)
    expected = torch.autograd.grad((full * weights).sum(), [hidden, *head.parameters()] if trainable_head
                                   else [hidden])
    with _Largest() as seen:
        got = token_log_probs(hidden, head, targets, chunk_rows=8)
        grads = torch.autograd.grad((got * weights).sum(), [hidden, *head.parameters()] if trainable_head
                                    else [hidden])
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # one chunk of logits (8 x 120) at a time, or the weight (16 x 120): never all 50 rows' logits
    assert seen.largest <= max(8 * 120, head.weight.numel()) < 50 * 120
    sums = sequence_log_probs(hidden, head, targets, torch.arange(50) % 3, 3, chunk_rows=8)
    torch.testing.assert_close(sums, torch.stack([full[i::3].sum() for i in range(3)]), rtol=1e-5, atol=1e-4)


# ---- trainers ------------------------------------------------------------------------------------------


def _trainer(tmp_path, cls=None, config=None, model=None, **kw):
    cls, config = cls or adaptune.DPOTrainer, config or adaptune.DPOConfig
    args = config(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to="none",
                  disable_tqdm=True, **kw)
    return cls(model=model if model is not None else tiny_llama(), args=args, train_dataset=_pairs(8),
               processing_class=make_tokenizer(),
               peft_config=None if model is not None else adaptune.LoraConfig(r=4, target_modules=["q_proj"]))


def test_shared_packed_and_padded_batches_give_the_same_log_probs(tmp_path):
    from adaptune.speedups.attention import packed_attention
    from adaptune.training.preference.attention import shared_prompt_attention, supports_shared_prompts
    from adaptune.training.preference.logps import batch_log_probs

    trainer = _trainer(tmp_path)
    assert trainer.layout == "shared" and supports_shared_prompts(trainer.model)
    features, model = trainer.train_dataset, trainer.model
    with shared_prompt_attention(model):
        shared = batch_log_probs(model, PreferenceCollator(0, "shared")(features), nll_sequences=8, nll_prompt=True)
    with packed_attention(model):
        packed = batch_log_probs(model, PreferenceCollator(0, "packed")(features), nll_sequences=8, nll_prompt=True)
    padded = batch_log_probs(model, PreferenceCollator(0, "padded")(features), nll_sequences=8, nll_prompt=True)
    for got in (shared, packed):
        torch.testing.assert_close(got.logps, padded.logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.nll, padded.nll, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.answer_targets, padded.answer_targets)


def test_eager_attention_models_do_not_share_prompts(tmp_path):
    model = tiny_llama(attn_implementation="eager")
    trainer = _trainer(tmp_path, model=adaptune.get_peft_model(model, adaptune.LoraConfig(r=4,
                                                                                           target_modules=["q_proj"])))
    assert trainer.layout != "shared"


def test_the_adapter_reference_is_a_swapped_in_copy_and_the_weights_come_back(tmp_path):
    from adaptune.training.preference.reference import Reference

    model = adaptune.get_peft_model(tiny_llama(), adaptune.LoraConfig(r=4, target_modules=["q_proj"]))
    reference = Reference(model, "adapter")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with reference.active(model) as ref:
        assert all(torch.equal(p, before[n]) for n, p in ref.named_parameters())
        assert not ref.training
    assert all(torch.equal(p, moved[n]) for n, p in model.named_parameters())
    assert len(reference.snapshot) == sum(p.requires_grad for p in model.parameters())  # the adapter only


def test_full_fine_tuning_computes_every_reference_value_before_training(tmp_path):
    trainer = _trainer(tmp_path, model=tiny_llama(), max_steps=2, learning_rate=1e-3)
    assert trainer.reference.kind == "initial"
    trainer.train()
    assert trainer.ref_cache.known() == 8
    trainer.ref_cache.values[:] = float("nan")
    with pytest.raises(ConfigError, match="before training"):
        trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset)))


def test_dropout_is_off_while_training_and_back_after(tmp_path):
    model = adaptune.get_peft_model(tiny_llama(), adaptune.LoraConfig(r=4, target_modules=["q_proj"],
                                                                       lora_dropout=0.3))
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    seen = []
    trainer = _trainer(tmp_path, model=model, max_steps=1)
    original = trainer.get_batch_loss_metrics
    trainer.get_batch_loss_metrics = lambda *a: (seen.append([d.p for d in dropouts]), original(*a))[1]
    trainer.train()
    assert dropouts and seen == [[0.0] * len(dropouts)] and all(d.p == 0.3 for d in dropouts)


def test_configs_refuse_what_the_loss_would_ignore():
    with pytest.raises(ConfigError, match="label_smoothing"):
        adaptune.DPOConfig(output_dir="x", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="loss_type"):
        adaptune.DPOConfig(output_dir="x", loss_type="exo")
    with pytest.raises(ConfigError, match="sequential"):
        adaptune.KTOConfig(output_dir="x", train_sampling_strategy="random")
    with pytest.raises(ConfigError, match="beta"):
        adaptune.ORPOConfig(output_dir="x", beta=0)
    assert adaptune.DPOConfig(output_dir="x", loss_type="robust", label_smoothing=0.1).loss_type == ["robust"]


# ---- CLI ---------------------------------------------------------------------------------------------


def _train(model_dir, data, out, *extra):
    return main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--max-steps", "4",
                 "--batch-size", "4", "--save-every", "2", "--eval-every", "2", "--logging-steps", "1",
                 "--max-length", "32", "--val-fraction", "0.2", "--lr", "0.01", *extra])


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", _pairs(10))  # 8 train, 2 held out


@pytest.fixture(scope="module")
def dpo_run(model_dir, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "adapter"
    assert _train(model_dir, pairs_file, out, "--objective", "dpo") == 0
    return out


def test_cli_dpo_writes_an_adapter_metrics_and_a_reward_panel(dpo_run):
    assert (dpo_run / "adapter_config.json").is_file() and (dpo_run / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert len(train) == 4
    assert all(k in train[-1] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                        "rewards/accuracies"))
    assert any("eval_rewards/margins" in r for r in records)
    result = json.loads((dpo_run / "train_result.json").read_text())
    assert result["steps"] == 4 and result["eval_before"]["rewards/margins"] == 0.0
    assert result["eval_after"]["rewards/margins"] != 0.0
    png = (dpo_run / "loss.png").read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and height > width  # loss above, rewards below
    assert (dpo_run / "checkpoint-4" / "reference_logps.safetensors").is_file()


def test_cli_resume_reads_the_reference_from_the_checkpoint(model_dir, pairs_file, dpo_run, tmp_path, monkeypatch):
    """Two epochs of 4 pairs a step over 8 pairs: at checkpoint-2 every train pair's reference is
    cached; resuming from it computes none again and ends with the same adapter."""
    import shutil

    from adaptune.training.preference.base import PreferenceTrainer

    out = tmp_path / "adapter"
    shutil.copytree(dpo_run / "checkpoint-2", out / "checkpoint-2")
    computed = []
    original = PreferenceTrainer._compute_reference

    def counting(self, model, inputs):
        if model.training:  # training batches; evaluation has its own examples
            computed.append(inputs["index"].tolist())
        return original(self, model, inputs)

    monkeypatch.setattr(PreferenceTrainer, "_compute_reference", counting)
    assert _train(model_dir, pairs_file, out, "--objective", "dpo", "--resume") == 0
    assert not computed
    from safetensors.torch import load_file

    resumed, full = load_file(out / "adapter_model.safetensors"), load_file(dpo_run / "adapter_model.safetensors")
    for key, tensor in full.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-5, atol=1e-6)


def test_cli_resume_of_a_finished_run_trains_no_further(model_dir, pairs_file, dpo_run, tmp_path):
    import shutil

    out = tmp_path / "adapter"
    shutil.copytree(dpo_run / "checkpoint-4", out / "checkpoint-4")
    assert _train(model_dir, pairs_file, out, "--objective", "dpo", "--resume") == 0
    assert json.loads((out / "train_result.json").read_text())["steps"] == 4
    from safetensors.torch import load_file

    resumed, full = load_file(out / "adapter_model.safetensors"), load_file(dpo_run / "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], t) for k, t in full.items())


def test_cli_ref_adapter_continues_an_sft_adapter_against_itself(model_dir, pairs_file, dpo_run, tmp_path):
    sft = tmp_path / "sft"
    from tests.tiny import write_words_file

    text = write_words_file(tmp_path / "words.txt", 100)
    assert main(["train", "--model", str(model_dir), "--data", str(text), "--output", str(sft), "--max-steps", "3",
                 "--batch-size", "4", "--max-length", "32", "--lr", "0.01", "--eval-every", "0"]) == 0
    out = tmp_path / "dpo"
    assert _train(model_dir, pairs_file, out, "--objective", "dpo", "--ref-adapter", str(sft)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "loss" in r)
    # the policy starts as the SFT adapter and the reference is that adapter: step 1's rewards are 0
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)
    # ... and it is the SFT adapter, not the base: its held-out log-probs are not the base's
    before = json.loads((out / "train_result.json").read_text())["eval_before"]
    base = json.loads((dpo_run / "train_result.json").read_text())["eval_before"]
    assert before["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert before["logps/chosen"] != pytest.approx(base["logps/chosen"], abs=1e-3)


@pytest.mark.parametrize("objective", ["ipo", "orpo", "simpo", "kto"])
def test_cli_other_objectives_train(model_dir, pairs_file, tmp_path, objective):
    out = tmp_path / objective
    assert _train(model_dir, pairs_file, out, "--objective", objective) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == 4 and all(
        torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert any("rewards/chosen" in r for r in records)


@pytest.mark.parametrize("argv,text", [
    (["--objective", "dpo"], "needs --data"),
    (["--beta", "0.2"], "--beta is for preference objectives"),
    (["--objective", "dpo", "--loss-type", "exo"], "--loss-type for --objective dpo must be one of"),
    (["--objective", "orpo", "--loss-type", "sigmoid"], "it has no variants"),
    (["--objective", "dpo", "--label-smoothing", "0.1"], "--label-smoothing is used by"),
    (["--objective", "dpo", "--method", "prompt-tuning"], "LoRA-style adapters"),
    (["--objective", "dpo", "--ref-adapter", "nowhere"], "not an adapter folder"),
    (["--objective", "dpo", "--streaming"], "--streaming is for sft"),
    (["--objective", "kto", "--data-format", "chat"], "--data-format is for sft"),
])
def test_cli_bad_preference_options_are_one_line(model_dir, tmp_path, capsys, argv, text):
    assert main(["train", "--model", str(model_dir), "--output", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("adaptune: error:") and text in err and "\n" not in err


def test_pairs_from_a_parquet_file_with_other_column_names(tmp_path):
    """Preference data comes from anywhere SFT data does; --columns maps the data's names."""
    import datasets

    rows = _pairs(6)
    renamed = [{"question": r["prompt"], "better": r["chosen"], "worse": r["rejected"]} for r in rows]
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(renamed).to_parquet(str(path))
    tok = make_tokenizer()
    features, report = load_preference_data(path, tok, "pairs", columns="prompt=question,chosen=better,rejected=worse")
    expected, _ = load_preference_data(_write(tmp_path / "p.jsonl", rows), tok, "pairs")
    assert features == expected and report.examples_kept == 6 and report.line_unit == "row"
    with pytest.raises(DataError, match="not preference data"):
        load_preference_data(path, tok, "pairs")  # without the renames: no prompt/chosen/rejected


def test_cli_preference_run_reads_one_source_and_writes_a_model_card(model_dir, pairs_file, dpo_run, tmp_path,
                                                                     capsys):
    card = (dpo_run / "README.md").read_text()
    assert "preference-tuned (dpo)" in card and "Held-out reward accuracy" in card and "training pairs" in card
    mixture = tmp_path / "job.yaml"
    mixture.write_text(f"data:\n  - path: {pairs_file}\n    weight: 1\n  - path: {pairs_file}\n    weight: 1\n")
    assert main(["train", "--config", str(mixture), "--model", str(model_dir), "--objective", "dpo",
                 "--output", str(tmp_path / "o")]) == 2
    assert "reads one data source, not a mixture of 2" in capsys.readouterr().err


def test_cli_pair_objective_on_kto_rows_says_so(model_dir, tmp_path, capsys):
    data = _write(tmp_path / "k.jsonl", [{"prompt": "a", "completion": " b", "label": True}] * 4)
    assert _train(model_dir, data, tmp_path / "o", "--objective", "dpo") == 2
    assert "--objective kto" in capsys.readouterr().err


# ---- memory estimate -----------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_memory_estimate_matches_a_measured_preference_step(objective):
    """``estimate_training_memory(objective=...)`` against a measured step of the preference path
    (packed row, chunked head, cached reference; tensors counted by torch.profiler as in test_memory)."""
    from transformers import LlamaForCausalLM

    from adaptune.speedups.attention import packed_attention
    from adaptune.tools.memory import estimate_training_memory
    from adaptune.training.preference.logps import batch_log_probs
    from adaptune.training.preference.losses import dpo_loss, kto_loss
    from tests.test_memory import measured_peak, small_llama_config

    cfg, pairs, seq = small_llama_config(), 2, 256
    torch.manual_seed(0)
    model = adaptune.get_peft_model(LlamaForCausalLM(cfg), adaptune.LoraConfig(r=8, target_modules=["q_proj",
                                                                                                    "v_proj"]))
    model.train()

    def answer():
        return torch.randint(3, cfg.vocab_size, (seq - 1,)).tolist()

    if objective == "dpo":
        features = [{"prompt_ids": [1], "chosen_ids": answer(), "rejected_ids": answer()} for _ in range(pairs)]
    else:
        features = [{"prompt_ids": [1], "completion_ids": answer(), "label": bool(i % 2)} for i in range(pairs)]
    batch = PreferenceCollator(0, "packed")(features)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    zeros = torch.zeros(pairs)

    def step():
        with packed_attention(model):
            logps = batch_log_probs(model, batch).logps
        if objective == "dpo":
            loss = dpo_loss(logps[:pairs], logps[pairs:], zeros, zeros)[0].mean()
        else:
            loss = kto_loss(logps[1::2], logps[0::2], zeros[1::2], zeros[0::2], torch.zeros(()))[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    measured = measured_peak(model, opt, step)
    est = estimate_training_memory(cfg, "lora", pairs, seq, r=8, target_modules=("q_proj", "v_proj"),
                                   device="cpu", objective=objective)
    sft = estimate_training_memory(cfg, "lora", pairs, seq, r=8, target_modules=("q_proj", "v_proj"),
                                   device="cpu")
    report = f"{objective}: measured {measured / 2**20:.1f} MiB, estimated peak {est.peak / 2**20:.1f} MiB"
    assert abs(est.peak / measured - 1) <= 0.10, report
    assert (est.activations > sft.activations) == (objective == "dpo")  # two sequences a pair; no full logits


def test_cli_inspect_memory_covers_preference_objectives(model_dir, capsys):
    assert main(["inspect", str(model_dir), "--memory", "--objective", "dpo", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "batch 4 x 512 tokens, dpo: pairs" in out and "lora" in out
