"""Adapters saved from a gathered state dict (what FSDP and DeepSpeed ZeRO-3 hand to a save) and
from models whose modules are wrapped (activation checkpointing, FSDP1): the same files as a
plain save of the model that state dict came from."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from adaptune import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from adaptune.errors import AdapterFileError
from tests.tiny import make_tokenizer, tiny_gpt2, tiny_llama

CASES = {
    "lora-dora-bias-head": (tiny_llama, lambda: LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True, bias="lora_only",
        modules_to_save=["lm_head"])),
    "lora-gpt2-slices-bias-all": (tiny_gpt2, lambda: LoraConfig(r=2, target_modules=["q_attn", "v_attn"], bias="all",
                                                                fan_in_fan_out=True)),
    "prompt-tuning": (tiny_llama, lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "p-tuning-lstm": (tiny_llama, lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                              encoder_reparameterization_type="LSTM")),
    "prefix-tuning": (tiny_gpt2, lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                            prefix_projection=True)),
}


def _adapter(make, config_fn, seed: int):
    """The same base model each time; adapter weights that depend on ``seed``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(make(), config_fn())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _files(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_from_a_state_dict_writes_that_state_dicts_adapter(case, tmp_path):
    make, config_fn = CASES[case]
    trained, other = _adapter(make, config_fn, seed=1), _adapter(make, config_fn, seed=2)
    trained.save_pretrained(tmp_path / "plain")
    other.save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "from-dict", state_dict=trained.state_dict())

    want, got, own = _files(tmp_path / "plain"), _files(tmp_path / "from-dict"), _files(tmp_path / "other")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert any(not torch.equal(own[k], want[k]) for k in want), "the dict's tensors were written, not the model's"
    assert (tmp_path / "from-dict" / "adapter_config.json").read_text() == \
        (tmp_path / "plain" / "adapter_config.json").read_text()


def test_a_state_dict_without_the_adapter_is_refused_by_name(tmp_path):
    model = _adapter(*CASES["lora-dora-bias-head"], seed=1)
    state = {k: v for k, v in model.state_dict().items() if "layers.1.self_attn.v_proj.lora_B" not in k}
    with pytest.raises(AdapterFileError, match=r"layers\.1\.self_attn\.v_proj\.lora_B\.default\.weight"):
        model.save_pretrained(tmp_path / "out", state_dict=state)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_wrapped_layers_save_under_their_plain_names(tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = _adapter(*CASES["lora-dora-bias-head"], seed=1)
    model.save_pretrained(tmp_path / "plain")
    layers = model.base_model.model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    model.save_pretrained(tmp_path / "wrapped")
    model.save_pretrained(tmp_path / "wrapped-from-dict", state_dict=model.state_dict())

    want = _files(tmp_path / "plain")
    for folder in ("wrapped", "wrapped-from-dict"):
        got = _files(tmp_path / folder)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key])


def test_trainer_save_with_a_gathered_state_dict_writes_the_adapter(tmp_path):
    """transformers' Trainer.save_model under FSDP (full state dict) calls ``_save(dir, state_dict=...)``;
    it would write that whole dict as model.safetensors for a model it does not know."""
    from adaptune import Trainer, TrainingArguments

    trained, other = _adapter(*CASES["lora-dora-bias-head"], seed=1), _adapter(*CASES["lora-dora-bias-head"], seed=2)
    trained.save_pretrained(tmp_path / "plain")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    trainer = Trainer(model=other, args=args, processing_class=make_tokenizer())
    trainer._save(str(tmp_path / "saved"), state_dict=trained.state_dict())

    saved = sorted(p.name for p in (tmp_path / "saved").iterdir())
    assert "model.safetensors" not in saved and "adapter_config.json" in saved, saved
    want, got = _files(tmp_path / "plain"), _files(tmp_path / "saved")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)

    # Sharded, with nothing gathered (FSDP's SHARDED_STATE_DICT, ZeRO-3 without its 16-bit gather):
    # the modules hold shards, so no adapter is written from them; transformers' own save runs.
    trainer.is_fsdp_enabled = True
    for i, state in enumerate([None, {}]):
        trainer._save(str(tmp_path / f"sharded-{i}"), state_dict=state)
        assert not (tmp_path / f"sharded-{i}" / "adapter_model.safetensors").exists()
    trainer._save(str(tmp_path / "sharded-gathered"), state_dict=trained.state_dict())
    got = _files(tmp_path / "sharded-gathered")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_fsdp_asked_for_on_a_cpu_says_it_trains_with_ddp(monkeypatch, tmp_path):
    """accelerate launch --use_fsdp on a CPU-only machine silently runs DDP; adaptune says so."""
    from adaptune import TrainingArguments
    from adaptune.errors import AdaptuneWarning

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])  # built alone: no process group
    monkeypatch.setattr("adaptune.device.accelerator_type", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.warns(AdaptuneWarning, match="FSDP .* DDP"):
        args._cpu_distributed_defaults()
    assert args.use_cpu and args.ddp_backend == "gloo"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdaptuneWarning)
        args._cpu_distributed_defaults()  # DDP asked for: nothing to say
        monkeypatch.setenv("RANK", "1")
        args.fsdp = "full_shard"
        args._cpu_distributed_defaults()  # said by rank 0 only
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(AdaptuneWarning, match="FSDP"):
        args._cpu_distributed_defaults()
