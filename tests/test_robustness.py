"""Nothing lost, nothing trusted blindly: bad inputs through the CLI, code never run from a file,
a diverging run, an output folder that cannot be written, and an audit of every file writer.

Each bad input goes through ``adaptune.cli.main`` (the ``adaptune`` command, in-process) and must
give exit code 2 and ONE line on stderr, ``adaptune: error: <file>: <problem>``, no traceback.
Set ``ADAPTUNE_SHOW_ERRORS=1`` to print every message the tests saw.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adaptune
from adaptune import LoraConfig, get_peft_model
from adaptune.cli import main
from adaptune.errors import AdapterFileError, AdaptuneError
from tests.tiny import WORDS, nonzero_lora_b, tiny_llama, write_words_file

MARKER_ENV = "ADAPTUNE_TEST_MARKER"


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         task_type="CAUSAL_LM"))
    nonzero_lora_b(peft_model, std=0.1)
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return write_words_file(tmp_path_factory.mktemp("data") / "words.txt", 60)


def _run(capsys, argv: list) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


_PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")  # a tqdm bar (transformers' "Loading weights")


def _assert_one_line(code: int, err: str, names: list, phrase: str) -> str:
    """Exit 2, exactly one stderr line ``adaptune: error: ...`` naming the file, with ``phrase``."""
    lines = [line for line in err.splitlines() if line.strip() and not _PROGRESS.search(line)]
    assert code == 2, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("adaptune: error: ") and "Traceback" not in err, line
    for name in names:
        assert str(name) in line, (name, line)
    assert phrase in line, (phrase, line)
    if os.environ.get("ADAPTUNE_SHOW_ERRORS"):
        sys.__stdout__.write(f"\n    {line}")
    return line


# ---- bad adapters --------------------------------------------------------------------------------
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _key(tensors: dict, part: str) -> str:
    return sorted(k for k in tensors if part in k)[0]


def _drop_b(t):
    del t[_key(t, "lora_B")]


def _shape(t):
    k = _key(t, "lora_A")
    t[k] = torch.zeros(2, t[k].shape[1])


def _int_dtype(t):
    k = _key(t, "lora_A")
    t[k] = t[k].to(torch.int32)


def _nan(t):
    t[_key(t, "lora_B")][0, 0] = float("nan")


def _inf(t):
    t[_key(t, "lora_A")][0, 0] = float("inf")


def _extra(t):
    t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)


# name -> (what to change: "weights_bytes" | "config_text" | "config" | "tensors" | "files", change, file, phrase)
ADAPTER_CASES = {
    "truncated safetensors": ("weights_bytes", lambda b: b[: len(b) // 2], WEIGHTS,
                              "not a readable safetensors file"),
    "corrupt safetensors header": ("weights_bytes", lambda b: b"\xff" * 8 + b[8:], WEIGHTS,
                                   "not a readable safetensors file"),
    "empty safetensors": ("weights_bytes", lambda b: b"", WEIGHTS, "not a readable safetensors file"),
    "config not JSON": ("config_text", lambda s: s[: len(s) // 2], CONFIG, "not valid JSON"),
    "config is a list": ("config_text", lambda s: "[1, 2]", CONFIG, "expected a JSON object"),
    "config r is a string": ("config", lambda c: c.update(r="4"), CONFIG, "r must be"),
    "config lora_alpha is null": ("config", lambda c: c.update(lora_alpha=None), CONFIG, "lora_alpha must be"),
    "config target_modules of numbers": ("config", lambda c: c.update(target_modules=[1, 2]), CONFIG,
                                         "target_modules must"),
    "config unknown peft_type": ("config", lambda c: c.update(peft_type="LOHA"), CONFIG, "unknown peft_type 'LOHA'"),
    "config unknown task_type": ("config", lambda c: c.update(task_type="CAUSAL"), CONFIG, "task_type 'CAUSAL'"),
    "tensor missing": ("tensors", _drop_b, "", "adapter tensors this model needs are missing"),
    "tensor wrong shape": ("tensors", _shape, "", "has shape (2, 32)"),
    "tensor wrong dtype": ("tensors", _int_dtype, "", "has dtype torch.int32, expected a float dtype"),
    "NaN in weights": ("tensors", _nan, "", "holds NaN or inf values"),
    "inf in weights": ("tensors", _inf, "", "holds NaN or inf values"),
    "tensor of no adapted layer": ("tensors", _extra, "", "do not belong to any adapted layer"),
    "no weights file": ("files", lambda d: (d / WEIGHTS).unlink(), "", "no adapter_model.safetensors"),
    "no config file": ("files", lambda d: (d / CONFIG).unlink(), "", "no adapter config here"),
}


def _bad_adapter(good: Path, root: Path, name: str, kind: str, change) -> Path:
    bad = root / name.replace(" ", "_")
    shutil.copytree(good, bad)
    if kind == "weights_bytes":
        (bad / WEIGHTS).write_bytes(change((bad / WEIGHTS).read_bytes()))
    elif kind == "config_text":
        (bad / CONFIG).write_text(change((bad / CONFIG).read_text()))
    elif kind == "config":
        config = json.loads((bad / CONFIG).read_text())
        change(config)
        (bad / CONFIG).write_text(json.dumps(config))
    elif kind == "tensors":
        tensors = load_file(bad / WEIGHTS)
        change(tensors)
        save_file(tensors, bad / WEIGHTS)
    else:
        change(bad)
    return bad


@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_bad_adapter_gives_one_line_naming_the_file(case, good_adapter, model_dir, tmp_path, capsys):
    kind, change, file, phrase = ADAPTER_CASES[case]
    bad = _bad_adapter(good_adapter, tmp_path, case, kind, change)
    code, _, err = _run(capsys, ["generate", "--model", model_dir, "--adapter", bad, "--prompt", "the king",
                                 "--max-new-tokens", "1", "--greedy", "--no-chat"])
    _assert_one_line(code, err, [bad / file if file else bad], phrase)


def test_good_adapter_loads(good_adapter, model_dir, capsys):
    code, out, err = _run(capsys, ["generate", "--model", model_dir, "--adapter", good_adapter, "--prompt", "the",
                                   "--max-new-tokens", "2", "--greedy", "--no-chat"])
    assert code == 0, err


def test_bad_adapter_in_eval_and_merge_too_and_merge_writes_nothing(good_adapter, model_dir, text_file, tmp_path,
                                                                    capsys):
    bad = _bad_adapter(good_adapter, tmp_path, "nan", "tensors", _nan)
    code, _, err = _run(capsys, ["eval", "--model", model_dir, "--adapter", bad, "--data", text_file])
    _assert_one_line(code, err, [bad], "NaN or inf")
    merged = tmp_path / "merged"
    code, _, err = _run(capsys, ["merge", "--model", model_dir, "--adapter", bad, "--output", merged])
    _assert_one_line(code, err, [bad], "NaN or inf")
    assert not merged.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_debug_shows_the_traceback(good_adapter, model_dir, tmp_path):
    bad = _bad_adapter(good_adapter, tmp_path, "nan", "tensors", _nan)
    with pytest.raises(AdapterFileError, match="NaN"):
        main(["--debug", "generate", "--model", str(model_dir), "--adapter", str(bad), "--max-new-tokens", "1"])


def test_real_command_prints_the_error_as_its_last_line_without_traceback(good_adapter, model_dir, tmp_path):
    """The installed command in a subprocess: stderr ends with the one error line, no traceback
    (transformers' weight-loading progress bar may come before it)."""
    bad = _bad_adapter(good_adapter, tmp_path, "truncated", "weights_bytes", lambda b: b[:100])
    proc = subprocess.run([sys.executable, "-m", "adaptune.cli", "generate", "--model", str(model_dir),
                           "--adapter", str(bad), "--max-new-tokens", "1"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"adaptune: error: {bad / WEIGHTS}: not a readable safetensors file")
    assert "Traceback" not in proc.stderr and sum("error" in line for line in lines) == 1, proc.stderr
    assert all(_PROGRESS.search(line) or line is lines[-1] for line in lines), proc.stderr


# ---- pickles and code in files -------------------------------------------------------------------
class _RunsCode:
    """Unpickling this runs ``os.system``: a stand-in for a malicious pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_adapter(good: Path, root: Path, malicious: bool) -> tuple[Path, Path]:
    folder = root / ("evil_pickle" if malicious else "pickle")
    folder.mkdir()
    shutil.copy(good / CONFIG, folder / CONFIG)
    marker = root / "PWNED"
    tensors = load_file(good / WEIGHTS)
    if malicious:
        tensors[_key(tensors, "lora_A")] = _RunsCode(marker)
    torch.save(tensors, folder / "adapter_model.bin")  # torch's zip format, pickle protocol 2
    return folder, marker


def test_pickled_adapter_needs_the_flag(good_adapter, model_dir, tmp_path, capsys):
    folder, _ = _pickle_adapter(good_adapter, tmp_path, malicious=False)
    argv = ["generate", "--model", model_dir, "--adapter", folder, "--prompt", "the", "--max-new-tokens", "1",
            "--greedy", "--no-chat"]
    code, _, err = _run(capsys, argv)
    _assert_one_line(code, err, [folder / "adapter_model.bin"], "not loaded by default")
    assert "--allow-pickle" in err
    code, _, err = _run(capsys, argv + ["--allow-pickle"])
    assert code == 0, err


def test_malicious_pickle_never_runs_even_with_the_flag(good_adapter, model_dir, tmp_path, capsys):
    folder, marker = _pickle_adapter(good_adapter, tmp_path, malicious=True)
    argv = ["generate", "--model", model_dir, "--adapter", folder, "--max-new-tokens", "1"]
    code, _, err = _run(capsys, argv)
    _assert_one_line(code, err, [folder / "adapter_model.bin"], "not loaded by default")
    code, _, err = _run(capsys, argv + ["--allow-pickle"])
    line = _assert_one_line(code, err, [folder / "adapter_model.bin"], "cannot be read safely (torch.load("
                                                                      "weights_only=True) refused it: ")
    assert "system" in line and "weights_only` set to `False`" not in line, line
    assert not marker.exists(), "the pickle ran code"


def test_safetensors_win_over_a_pickle_next_to_them(good_adapter, model_dir, tmp_path, capsys):
    folder, marker = _pickle_adapter(good_adapter, tmp_path, malicious=True)
    shutil.copy(good_adapter / WEIGHTS, folder / WEIGHTS)
    code, _, err = _run(capsys, ["generate", "--model", model_dir, "--adapter", folder, "--allow-pickle",
                                 "--max-new-tokens", "1", "--greedy", "--no-chat"])
    assert code == 0, err
    assert not marker.exists()


def _custom_code_model(model_dir: Path, root: Path, model_type: str) -> tuple[Path, Path]:
    """A model folder whose config points at Python files that leave a marker when imported."""
    folder = root / f"custom_{model_type}"
    shutil.copytree(model_dir, folder)
    marker = root / f"RAN_{model_type}"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    touch = f"open({str(marker)!r}, 'w').close()\n"
    (folder / "configuration_evil.py").write_text(
        touch + "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n"
                f"    model_type = {model_type!r}\n")
    (folder / "modeling_evil.py").write_text(
        touch + "from transformers import LlamaForCausalLM\n\nclass EvilForCausalLM(LlamaForCausalLM):\n    pass\n")
    return folder, marker


def test_model_with_its_own_code_is_refused_without_the_flag(model_dir, tmp_path, capsys):
    folder, marker = _custom_code_model(model_dir, tmp_path, "evilllama")
    code, _, err = _run(capsys, ["generate", "--model", folder, "--max-new-tokens", "1"])
    _assert_one_line(code, err, [folder], "runs its own code")
    assert "--trust-remote-code" in err
    code, _, err = _run(capsys, ["inspect", folder])
    _assert_one_line(code, err, [folder], "runs its own code")
    assert not marker.exists(), "the model's own code ran without --trust-remote-code"


def test_known_architecture_with_an_auto_map_loads_without_running_its_code(model_dir, tmp_path, capsys):
    folder, marker = _custom_code_model(model_dir, tmp_path, "llama")
    code, _, err = _run(capsys, ["generate", "--model", folder, "--max-new-tokens", "1", "--greedy", "--no-chat"])
    assert code == 0, err
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_asked():
    import inspect

    from adaptune import hub as models
    from adaptune.cli import build_parser
    from adaptune.cli.train import job_from_args
    from adaptune.training.job import TrainJob

    for fn in (models.load_model, models.load_tokenizer, models.load_config):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False
    assert TrainJob().trust_remote_code is False
    parser = build_parser()
    # train leaves an unset flag to the job (a YAML may set it); the job's own default is off
    assert job_from_args(parser.parse_args(["train"])).trust_remote_code is False
    for argv in (["generate"], ["eval"], ["merge", "--adapter", "a", "--output", "b"], ["inspect"]):
        assert parser.parse_args(argv).trust_remote_code is False
    for argv in (["generate"], ["eval"], ["merge", "--adapter", "a", "--output", "b"]):
        assert parser.parse_args(argv).allow_pickle is False


def test_adapter_reader_never_unpickles_by_default(good_adapter, tmp_path, monkeypatch):
    from adaptune.tuners.files import read_adapter_tensors

    folder, _ = _pickle_adapter(good_adapter, tmp_path, malicious=False)

    def no_load(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(AdapterFileError, match="not loaded by default"):
        read_adapter_tensors(folder)


# ---- bad base models -----------------------------------------------------------------------------
def _edit_config(key, value):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return change


def _edit_weights(edit):
    def change(folder):
        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return change


def _remove_tokenizer(folder):
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(folder / name)


MODEL_CASES = {
    "no tokenizer": (_remove_tokenizer, "has no tokenizer"),
    "truncated weights": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:500]),
                          "truncated or corrupt"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text('{"model_type": "llama",'), "not a valid JSON"),
    "config.json wrong type": (_edit_config("hidden_size", "thirty-two"), "hidden_size"),
    "weight missing": (_edit_weights(lambda t: t.pop(_key(t, "q_proj"))), "lack 1 tensor(s) the model needs"),
    "weight of wrong shape": (_edit_weights(lambda t: t.update({_key(t, "q_proj"): torch.zeros(4, 4)})),
                              "other shapes than its config.json says"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_base_model_gives_one_line(case, model_dir, tmp_path, capsys):
    change, phrase = MODEL_CASES[case]
    folder = tmp_path / case.replace(" ", "_")
    shutil.copytree(model_dir, folder)
    change(folder)
    code, _, err = _run(capsys, ["generate", "--model", folder, "--max-new-tokens", "1"])
    _assert_one_line(code, err, [folder], phrase)


# ---- bad data ------------------------------------------------------------------------------------
DATA_CASES = {
    "empty file": ("data.txt", b"", "file is empty"),
    "only whitespace": ("data.txt", b"  \n\n\t\n", "file is empty"),
    "not UTF-8": ("data.txt", "caf\u00e9 au lait\n".encode("latin-1"), "not UTF-8 text (bad byte 0xe9 at offset 3)"),
    "binary junk": ("data.jsonl", b"\xff\xfe\x00\x00junk", "not UTF-8 text"),
    "jsonl of bad rows": ("data.jsonl", b'{"text": 5}\nnot json\n[1, 2]\n{"text": ""}\n',
                          "no usable rows in 4 read: 1 'text' is not a string, 1 invalid JSON, 1 not a JSON object, "
                          "1 empty 'text' (first at lines 1, 2, 3, 4)"),
    "chat without assistant turns": ("chat.jsonl", (json.dumps({"messages": [{"role": "user", "content": "the king"}]})
                                                    + "\n" + json.dumps({"messages": [
                                                        {"role": "system", "content": "be"},
                                                        {"role": "user", "content": "a lord"}]})).encode(),
                                     "no usable rows in 2 read: 2 no assistant turn (first at lines 1, 2)"),
    "rows of unknown shape": ("data.jsonl", b'{"question": "a", "answer": "b"}\n',
                              "cannot tell the data format (found keys ['answer', 'question'])"),
    "JSON nested too deeply": ("data.jsonl", b"[" * 100000 + b"]" * 100000 + b"\n",
                               "cannot tell the data format (found no JSON objects)"),
    "lone surrogates": ("data.jsonl", b'{"text": "the \\ud800 king"}\n',
                        "no usable rows in 1 read: 1 'text' holds a lone surrogate escape"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_file_gives_one_line(case, model_dir, tmp_path, capsys):
    name, raw, phrase = DATA_CASES[case]
    data = tmp_path / name
    data.write_bytes(raw)
    code, _, err = _run(capsys, ["train", "--model", model_dir, "--data", data, "--output", tmp_path / "out",
                                 "--max-steps", "1", "--max-length", "32", "--batch-size", "2"])
    _assert_one_line(code, err, [data], phrase)


def test_missing_data_file_fails_before_the_model_loads(model_dir, tmp_path, capsys):
    data = tmp_path / "nope.txt"
    code, out, err = _run(capsys, ["train", "--model", model_dir, "--data", data, "--output", tmp_path / "out"])
    _assert_one_line(code, err, [data], "no such data file")
    assert "loading" not in out


def test_jsonl_with_some_bad_rows_trains_and_reports_them(model_dir, tmp_path, capsys):
    rows = [json.dumps({"text": " ".join(WORDS[i:i + 12])}) for i in range(30)]
    rows[3], rows[7], rows[9] = "{bad", json.dumps({"text": 5}), json.dumps([1])
    data = tmp_path / "some_bad.jsonl"
    data.write_text("\n".join(rows))
    code, out, err = _run(capsys, ["train", "--model", model_dir, "--data", data, "--output", tmp_path / "out",
                                   "--max-steps", "1", "--max-length", "32", "--batch-size", "2"])
    assert code == 0, err
    assert ("skipped 3: 1 invalid JSON, 1 'text' is not a string, 1 not a JSON object (first at lines 4, 8, 10)"
            in out), out


YAML_CASES = {
    "number as text": ("lr: fast\n", "--lr must be a number or null, got 'fast'"),
    "list for an integer": ("r: [8]\n", "--r must be an integer, got [8]"),
    "unknown option": ("learning_rate: 0.1\n", "unknown options learning_rate"),
    "not a mapping": ("- 1\n- 2\n", "must be a mapping"),
    "not YAML": ("a: [1, 2\n", "cannot read YAML config"),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_bad_train_yaml_gives_one_line(case, tmp_path, capsys):
    text, phrase = YAML_CASES[case]
    config = tmp_path / "job.yaml"
    config.write_text(text)
    code, _, err = _run(capsys, ["train", "--config", config, "--output", tmp_path / "out"])
    _assert_one_line(code, err, [config], phrase)


def test_yaml_number_written_as_1e_minus_3_is_a_number(tmp_path):
    from adaptune.training.job import TrainJob

    config = tmp_path / "job.yaml"
    config.write_text("lr: 1e-3\n")  # YAML 1.1 (PyYAML) reads this as the string '1e-3'
    assert TrainJob.from_yaml(config).lr == pytest.approx(1e-3)


# ---- a diverging run -----------------------------------------------------------------------------
def test_diverging_training_stops_with_one_line_and_keeps_the_last_good_checkpoint(model_dir, text_file, tmp_path,
                                                                                   capsys, monkeypatch):
    # Whether --lr 1e12 overflows to NaN depends on the CPU's arithmetic (on some machines the
    # activations saturate and the gradient becomes exactly 0 instead): from step 4 on the loss is
    # made NaN, so the run diverges on every machine.
    import adaptune

    plain_loss = adaptune.Trainer.compute_loss

    def poisoned_loss(self, *args, **kwargs):
        loss = plain_loss(self, *args, **kwargs)
        training = self.model.training and not kwargs.get("return_outputs")
        return loss * float("nan") if training and self.state.global_step >= 3 else loss

    monkeypatch.setattr(adaptune.Trainer, "compute_loss", poisoned_loss)
    out = tmp_path / "out"
    code, _, err = _run(capsys, ["train", "--model", model_dir, "--data", text_file, "--output", out,
                                 "--max-steps", "10", "--save-every", "1", "--max-length", "32", "--batch-size", "4",
                                 "--lr", "1e12", "--dropout", "0"])
    line = _assert_one_line(code, err, [], "training diverged: ")
    assert "lower learning rate" in line and "last good checkpoint: " in line
    last = line.rsplit("last good checkpoint: ", 1)[1]
    assert last != "none was saved", line
    step = int(last.rsplit("-", 1)[1])
    assert f"at step {step + 1};" in line
    for checkpoint in out.glob("checkpoint-*"):  # every checkpoint on disk holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / WEIGHTS).values()), checkpoint
    assert int(checkpoint.name.rsplit("-", 1)[1]) <= step
    assert not (out / WEIGHTS).exists(), "a diverged run must not write a final adapter"


# ---- output folder problems ----------------------------------------------------------------------
def test_output_under_a_regular_file_fails_before_training(model_dir, text_file, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, out, err = _run(capsys, ["train", "--model", model_dir, "--data", text_file, "--output", blocker / "out"])
    _assert_one_line(code, err, [blocker / "out"], "cannot create output directory")
    assert "loading" not in out
    code, out, err = _run(capsys, ["train", "--model", model_dir, "--data", text_file, "--output", blocker])
    _assert_one_line(code, err, [blocker], "exists and is not a directory")


def test_merge_output_under_a_regular_file_fails_before_loading(good_adapter, model_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = _run(capsys, ["merge", "--model", model_dir, "--adapter", good_adapter,
                                 "--output", blocker / "merged"])
    _assert_one_line(code, err, [blocker], "output directory")


def test_disk_full_fails_before_training(model_dir, text_file, tmp_path, capsys, monkeypatch):
    from adaptune import atomic

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: usage(10 << 30, (10 << 30) - (3 << 20), 3 << 20))
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, ["train", "--model", model_dir, "--data", text_file, "--output", out])
    _assert_one_line(code, err, [out], "only 3.0 MiB free on the disk of")
    assert "loading" not in stdout and not list(out.iterdir())


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_fails_before_training(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        code, stdout, err = _run(capsys, ["train", "--model", model_dir, "--data", text_file, "--output", out])
    finally:
        out.chmod(0o700)
    _assert_one_line(code, err, [out], "is not writable")


# ---- temporary files a kill leaves ---------------------------------------------------------------
def test_a_new_run_removes_temporaries_a_killed_run_left(tmp_path):
    from adaptune.atomic import remove_temporaries

    (tmp_path / ".adapter_model.tmp-abc123.safetensors").write_bytes(b"half")
    (tmp_path / ".model.tmp-xyz").mkdir()
    (tmp_path / ".model.tmp-xyz" / "f").write_text("x")
    (tmp_path / ".model.old-keep").mkdir()  # an aside copy: kept
    (tmp_path / "adapter_model.safetensors").write_bytes(b"whole")
    removed = remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".adapter_model.tmp-abc123.safetensors", ".model.tmp-xyz"]
    assert sorted(os.listdir(tmp_path)) == [".model.old-keep", "adapter_model.safetensors"]


# ---- audit: every file adaptune writes goes through adaptune.atomic ------------------------------
WRITE_CALLS = {"write_text", "write_bytes", "savefig", "save_file", "dump", "save"}


def _writes(tree: ast.AST):
    """Calls that write files directly: open(..., 'w'/'a'/'x'...), x.write_text(), torch.save()..."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "open":
            keyword = next((k.value for k in node.keywords if k.arg == "mode"), None)
            mode = node.args[1] if len(node.args) > 1 else keyword
            if isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax+"):
                yield node
        elif isinstance(func, ast.Attribute) and func.attr in WRITE_CALLS:
            owner = ast.unparse(func.value)
            if func.attr in ("dump", "save") and owner not in ("json", "torch", "pickle", "np", "numpy"):
                continue
            yield node


def _inside_atomic_block(tree: ast.AST, call: ast.Call) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any("atomic_" in ast.unparse(item.context_expr) for item in node.items):
            if any(child is call for child in ast.walk(node)):
                return True
    return False


def test_every_direct_file_write_in_adaptune_is_atomic():
    package = Path(adaptune.__file__).parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        if path.name == "atomic.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in _writes(tree):
            if not _inside_atomic_block(tree, call):
                offenders.append(f"{path.name}:{call.lineno}: {ast.unparse(call)[:80]}")
    assert not offenders, "non-atomic writes:\n" + "\n".join(offenders)


def test_adaptune_error_is_the_one_base_class():
    from adaptune.training.callbacks import TrainingDiverged

    assert issubclass(TrainingDiverged, AdaptuneError)


# ---- a corrupt checkpoint is skipped on --resume -------------------------------------------------
def _truncate_optimizer(folder: Path) -> None:
    optimizer = folder / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])


@pytest.mark.parametrize("damage, said", [
    (_truncate_optimizer, "optimizer.pt is"),
    # a kill while transformers deletes an old checkpoint (rotation) can leave trainer_state.json
    # without the weights; here the newest one is damaged so the resume must fall back
    (lambda folder: (folder / WEIGHTS).unlink(), "it holds no weights file"),
], ids=["corrupt optimizer.pt", "weights deleted"])
def test_resume_skips_a_damaged_checkpoint_and_still_matches(damage, said, model_dir, text_file, tmp_path, capsys):
    common = ["train", "--model", model_dir, "--data", text_file, "--max-steps", "6", "--save-every", "2",
              "--max-length", "32", "--batch-size", "4", "--lr", "0.01", "--dropout", "0", "--seed", "3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _run(capsys, common + ["--output", full])[0] == 0
    assert _run(capsys, common + ["--output", cut])[0] == 0
    assert sorted(p.name for p in cut.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    (cut / WEIGHTS).unlink()  # as if killed before the final save, with checkpoint-6 damaged
    damage(cut / "checkpoint-6")
    code, out, err = _run(capsys, common + ["--output", cut, "--resume"])
    assert code == 0, err
    assert f"--resume: skipping {cut / 'checkpoint-6'}: {said}" in out, out
    a, b = load_file(full / WEIGHTS), load_file(cut / WEIGHTS)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)
