"""``adaptune train --method prompt-tuning | p-tuning | prefix-tuning | full`` end to end on a tiny Llama.

Each method: a few training steps through the CLI, peft-format files (one ``prompt_embeddings``
tensor for the prompt methods), the trainable-parameter line the method implies, and
``generate`` / ``eval`` on the result (``--adapter`` for the prompt methods, ``--model
<output>/model`` for full fine-tuning).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from adaptune.cli import main
from tests.tiny import tiny_llama, write_words_file

HIDDEN, LAYERS, KV_HEADS, HEAD_DIM = 32, 2, 2, 8  # tiny_llama()
NVT = 4

# what each method trains on the tiny Llama (hidden 32, 2 layers, 2 key/value heads of 8 dims)
EXPECTED_TRAINABLE = {
    "prompt-tuning": NVT * HIDDEN,
    # P-tuning: the virtual token inputs + the MLP (hidden -> hidden -> hidden -> hidden, with biases)
    "p-tuning": NVT * HIDDEN + 3 * (HIDDEN * HIDDEN + HIDDEN),
    # prefix tuning: keys and values of every layer, grouped-query sized
    "prefix-tuning": NVT * LAYERS * 2 * KV_HEADS * HEAD_DIM,
}
PEFT_TYPES = {"prompt-tuning": "PROMPT_TUNING", "p-tuning": "P_TUNING", "prefix-tuning": "PREFIX_TUNING"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_words_file(tmp_path_factory.mktemp("data") / "words.txt", 120)


def _train(model_dir, text_file, out, method, *extra):
    return main(["train", "--model", str(model_dir), "--data", str(text_file), "--output", str(out),
                 "--method", method, "--max-steps", "4", "--save-every", "2", "--max-length", "32",
                 "--batch-size", "4", "--virtual-tokens", str(NVT), *extra])


def _trainable(out: str) -> tuple[int, int]:
    found = re.findall(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", out)
    assert len(found) == 1, out
    return tuple(int(n.replace(",", "")) for n in found[0])


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning", "prefix-tuning"])
def test_prompt_methods_train_save_peft_files_and_generate(method, model_dir, text_file, tmp_path, capsys):
    out = tmp_path / method
    assert _train(model_dir, text_file, out, method) == 0
    printed = capsys.readouterr().out
    trainable, total = _trainable(printed)
    base_params = sum(p.numel() for p in tiny_llama().parameters())
    assert trainable == EXPECTED_TRAINABLE[method] and total == base_params + trainable
    assert "not packed" in printed  # virtual tokens go in front of each row: packing is off, and said so

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPES[method] and config["num_virtual_tokens"] == NVT
    assert config["task_type"] == "CAUSAL_LM"
    tensors = load_file(out / "adapter_model.safetensors")
    assert set(tensors) == {"prompt_embeddings"}  # peft's one tensor: the encoder's output
    width = LAYERS * 2 * KV_HEADS * HEAD_DIM if method == "prefix-tuning" else HIDDEN
    assert tuple(tensors["prompt_embeddings"].shape) == (NVT, width)
    result = json.loads((out / "train_result.json").read_text())
    assert result["steps"] == 4 and result["trainable_params"] == trainable
    assert 1 < result["ppl_after"] < 1e4 and result["ppl_after"] != result["ppl_before"]

    # (the base defaults to the one the adapter names; what the random model says may be ids the
    # small tokenizer has no text for, so only the finished stream is checked)
    assert main(["generate", "--adapter", str(out), "--prompt", "the king", "--max-new-tokens", "5",
                 "--greedy", "--no-chat"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["eval", "--adapter", str(out), "--data", str(text_file), "--max-length", "32",
                 "--max-examples", "8"]) == 0
    assert float(capsys.readouterr().out.split()[1]) > 1


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning"])
def test_resume_ends_where_an_uninterrupted_run_does(method, model_dir, text_file, tmp_path):
    """P-tuning's peft file holds only the MLP's output; its checkpoints also keep the MLP, so the
    resumed run goes on training the MLP (and the saved optimizer state fits it)."""
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _train(model_dir, text_file, whole, method) == 0
    assert _train(model_dir, text_file, part, method) == 0
    if method == "p-tuning":
        assert (part / "checkpoint-2" / "prompt_encoder_state.safetensors").is_file()
    shutil.rmtree(part / "checkpoint-4")  # killed after step 2
    (part / "adapter_model.safetensors").unlink()
    assert _train(model_dir, text_file, part, method, "--resume") == 0
    a = load_file(whole / "adapter_model.safetensors")["prompt_embeddings"]
    b = load_file(part / "adapter_model.safetensors")["prompt_embeddings"]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_full_fine_tuning_changes_base_weights_and_writes_a_loadable_model(model_dir, text_file, tmp_path,
                                                                              capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    assert _train(model_dir, text_file, out, "full", "--lr", "0.01") == 0
    printed = capsys.readouterr().out
    trainable, total = _trainable(printed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert trainable == total == sum(p.numel() for p in base.parameters())
    assert f"model saved to {out / 'model'}" in printed
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()

    tuned = AutoModelForCausalLM.from_pretrained(out / "model")
    before, after = base.state_dict(), tuned.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("layers.0.self_attn.q_proj" in k for k in changed) and "model.embed_tokens.weight" in changed
    assert (out / "model" / "tokenizer_config.json").is_file()

    assert main(["generate", "--model", str(out / "model"), "--prompt", "the king", "--max-new-tokens", "5",
                 "--greedy", "--no-chat"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["eval", "--model", str(out / "model"), "--data", str(text_file), "--max-length", "32",
                 "--max-examples", "8"]) == 0
    assert float(capsys.readouterr().out.split()[1]) > 1


def test_perplexity_skips_the_virtual_tokens_logits():
    """Prompt tuning returns logits for its virtual tokens first; perplexity scores the input's only."""
    from adaptune import PromptTuningConfig, get_peft_model
    from adaptune.data import DataCollator
    from adaptune.tools.evaluation import perplexity

    model = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=NVT, task_type="CAUSAL_LM"))
    ids = torch.randint(3, 150, (3, 12))
    features = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    labels = ids.clone()
    labels[:, 0] = -100  # perplexity does not score the first token (nothing real comes before it)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss  # the virtual tokens' labels are -100 inside
    ppl = perplexity(model, features, DataCollator(0, packing=False), batch_size=2)
    assert ppl == pytest.approx(torch.exp(loss).item(), rel=1e-4)


def test_method_defaults_and_bad_combinations(model_dir, capsys):
    from adaptune.training.job import TrainJob
    from adaptune.training.methods import DEFAULT_LR

    assert TrainJob(method="full").lr == DEFAULT_LR["full"] < TrainJob().lr < TrainJob(method="prompt-tuning").lr
    assert TrainJob(method="full", lr=0.5).lr == 0.5
    assert main(["train", "--model", str(model_dir), "--method", "prefix-tuning", "--gradient-checkpointing"]) == 2
    assert "gradient-checkpointing" in capsys.readouterr().err.splitlines()[-1]


def test_prefix_starts_as_the_keys_and_values_of_real_tokens():
    """The recipe's prefix init: the untrained adapter is exactly the base model with those tokens in front."""
    from adaptune import PrefixTuningConfig, get_peft_model
    from adaptune.tuners.prompt.init import init_prefix_from_text

    model = get_peft_model(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=NVT, task_type="CAUSAL_LM"))
    init_prefix_from_text(model, [5, 9, 17])  # shorter than NVT: repeated
    ids = torch.tensor([[20, 21, 22, 23, 24]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        base = model.get_base_model()(input_ids=torch.tensor([[5, 9, 17, 5, 20, 21, 22, 23, 24]])).logits[:, NVT:]
    torch.testing.assert_close(adapted, base, atol=1e-5, rtol=1e-5)
