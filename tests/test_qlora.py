"""QLoRA: LoRA on a bitsandbytes 4-bit (and 8-bit) base, on CPU.

The base is a tiny llama whose layer sizes are multiples of 64 (bitsandbytes' block size), saved
once and re-loaded with ``quantization_config=bnb_config(...)``: loading the same fp32 weights
twice quantizes them identically, so two copies are the same 4-bit model.
"""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM  # noqa: E402

from adaptune import (  # noqa: E402
    LoraConfig,
    PeftModel,
    device,  # noqa: E402
    get_peft_model,
)
from adaptune.errors import ConfigError, EnvironmentProblem  # noqa: E402
from adaptune.quant import bnb as quant  # noqa: E402
from adaptune.quant.bnb import bnb_config, weight_bytes  # noqa: E402
from adaptune.quant.dequant import dequantize_weight  # noqa: E402
from adaptune.quant.kbit import keep_trainable_layout, prepare_model_for_kbit_training  # noqa: E402
from tests.tiny import tiny_llama  # noqa: E402

SIZES = dict(hidden_size=64, intermediate_size=128)
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_fp32")
    tiny_llama(**SIZES).save_pretrained(path)
    return path


def load4(folder, quantize="nf4", **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(quantize, **kwargs)).eval()


def load_fp32(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def ids(seed=1, rows=2, cols=12):
    return torch.randint(3, 150, (rows, cols), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def trained_4bit(folder, steps=2, lr=1e-2):
    """A 4-bit model with a LoRA adapter trained a few steps (so the adapter is not a no-op)."""
    model = get_peft_model(prepare_model_for_kbit_training(load4(folder), use_gradient_checkpointing=False),
                           LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = ids(seed=7, rows=4)
    for _ in range(steps):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def lora_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ---- configs and environment -----------------------------------------------------------------------
def test_bnb_config_choices_and_cpu_default_dtype():
    nf4 = bnb_config("nf4")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.float32  # CPU here
    fp4 = bnb_config("fp4", compute_dtype="bf16", double_quant=False)
    assert fp4.bnb_4bit_quant_type == "fp4" and fp4.bnb_4bit_compute_dtype == torch.bfloat16
    assert not fp4.bnb_4bit_use_double_quant
    assert bnb_config("int8").load_in_8bit
    assert device.default_compute_dtype("cpu") == torch.float32


@pytest.mark.parametrize("kwargs", [dict(quantize="int4"), dict(quantize="nf4", compute_dtype="int8"),
                                    dict(quantize="nf4", compute_dtype=torch.int8)])
def test_bnb_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        bnb_config(**kwargs)


def test_missing_bitsandbytes_is_a_clear_environment_problem(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(EnvironmentProblem, match="bitsandbytes package, which is not installed"):
        bnb_config("nf4")


def test_platform_that_cannot_run_bitsandbytes(monkeypatch):
    import bitsandbytes.functional as bf

    def no_kernel(*_a, **_k):
        raise NotImplementedError("Could not run 'bitsandbytes::quantize_4bit' with arguments from the 'CPU' backend")

    quant._probe.cache_clear()
    monkeypatch.setattr(bf, "quantize_4bit", no_kernel)
    try:
        with pytest.raises(EnvironmentProblem, match="cannot run quantized layers on cpu.*NotImplementedError"):
            bnb_config("nf4")
    finally:
        quant._probe.cache_clear()


# ---- forward, dtypes, training ---------------------------------------------------------------------
def test_zero_init_lora_on_4bit_equals_4bit_base(folder):
    base = load4(folder)
    keep_trainable_layout(base)  # the computation adaptune uses once LoRA wraps a 4-bit layer
    x = ids()
    expected = logits(base, x)
    model = get_peft_model(load4(folder), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.kind == "linear4bit"
    assert layer.lora_A["default"].weight.dtype == torch.float32  # as peft: fp32 on integer storage
    assert torch.equal(logits(model, x), expected)
    with model.disable_adapter():
        assert torch.equal(logits(model, x), expected)


def test_bf16_compute_and_bf16_model_with_fp32_lora(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                 quantization_config=bnb_config("nf4", compute_dtype="bf16"))
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.compute_dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    hidden = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    out = layer(hidden)  # LoRA branch in fp32, cast back to the layer's output dtype
    assert out.dtype == torch.bfloat16
    x = ids()
    peft_model.train()
    loss = peft_model(input_ids=x, labels=x).loss
    loss.backward()
    assert layer.lora_B["default"].weight.grad is not None and layer.lora_B["default"].weight.grad.abs().sum() > 0


def test_prepare_model_for_kbit_training(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=bnb_config("nf4"))
    packed_before = {n: p.data.clone() for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"}
    assert model.model.norm.weight.dtype == torch.bfloat16
    out = prepare_model_for_kbit_training(model)
    assert out is model
    assert not any(p.requires_grad for p in model.parameters())
    for name, p in model.named_parameters():
        if type(p).__name__ == "Params4bit":
            assert torch.equal(p.data, packed_before[name])  # 4-bit storage untouched
        else:
            assert p.dtype == torch.float32, name  # norms, embeddings, head upcast
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = model.is_gradient_checkpointing
    assert checkpointing
    emb = model.get_input_embeddings()(ids())
    assert emb.requires_grad  # frozen embeddings still pass gradients under checkpointing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_prepare_releases_the_mapped_checkpoint(tmp_path):
    import gc

    tiny_llama(**SIZES).save_pretrained(tmp_path)
    mapped = lambda: any(str(tmp_path) in line for line in open("/proc/self/maps"))  # noqa: E731
    model = load4(tmp_path)
    gc.collect()
    assert mapped()  # the fp32 embeddings and norms are views of the mapped file
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    gc.collect()
    assert not mapped()
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings


def test_one_optimizer_step_updates_only_lora_params(folder):
    model = get_peft_model(prepare_model_for_kbit_training(load4(folder)),
                           LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    before = {k: v.clone() for k, v in model.state_dict().items()}  # includes 4-bit data and its quant state
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(rows=4)
    model(input_ids=x, labels=x).loss.backward()
    first_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert first_b.grad is not None and first_b.grad.abs().sum() > 0  # gradient reaches the first layer
    opt.step()
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was updated"
    assert all("lora_" in k for k in changed), sorted(k for k in changed if "lora_" not in k)
    assert any("lora_B" in k for k in changed)


def test_eval_pass_between_steps_keeps_gradients_and_layout(folder):
    """bitsandbytes re-packs 4-bit weights on a CPU eval forward; training after it would drop gradients."""
    x = ids(rows=4)

    def first_layer_grad(run_eval_first: bool):
        torch.manual_seed(0)  # the same random (non-zero) adapter both times
        model = get_peft_model(load4(folder), LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
        if run_eval_first:
            model.eval()
            logits(model, x)
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        packed = [m for m in model.modules() if getattr(getattr(getattr(m, "weight", None), "quant_state", None),
                                                            "packing_format_for_cpu", False)]
        assert not packed
        return model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad

    assert torch.allclose(first_layer_grad(True), first_layer_grad(False), atol=1e-7)


# ---- files -----------------------------------------------------------------------------------------
def test_save_load_round_trip_on_4bit(folder, tmp_path):
    model = trained_4bit(folder)
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load4(folder), tmp_path)
    assert torch.equal(logits(loaded, x), expected)
    saved = lora_tensors(model)
    assert {k: torch.equal(v, saved[k]) for k, v in lora_tensors(loaded).items()} == {k: True for k in saved}


def test_adapter_moves_between_4bit_and_fp32_bases(folder, tmp_path):
    # 4-bit -> fp32: same tensors, same LoRA function of each layer's input
    model = trained_4bit(folder)
    model.save_pretrained(tmp_path / "from4")
    on_fp32 = PeftModel.from_pretrained(load_fp32(folder), tmp_path / "from4")
    ours, theirs = lora_tensors(model), lora_tensors(on_fp32)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    h = torch.randn(3, 64)
    for (name, a), (_, b) in zip(model.base_model.lora_layers(), on_fp32.base_model.lora_layers()):
        assert (a.kind, b.kind) == ("linear4bit", "linear"), name
        assert torch.equal(a._lora_out(h, "default", None), b._lora_out(h, "default", None))
    # the adapted models differ only by the base's quantization error
    x = ids()
    gap_adapted = (logits(model, x) - logits(on_fp32, x)).abs().max()
    with model.disable_adapter(), on_fp32.disable_adapter():
        gap_base = (logits(model, x) - logits(on_fp32, x)).abs().max()
    assert gap_adapted < 3 * gap_base + 1e-3

    # fp32 -> 4-bit
    fp32_model = get_peft_model(load_fp32(folder), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    fp32_model.save_pretrained(tmp_path / "from32")
    on_4bit = PeftModel.from_pretrained(load4(folder), tmp_path / "from32")
    ours, theirs = lora_tensors(fp32_model), lora_tensors(on_4bit)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert on_4bit.base_model.model.model.layers[1].self_attn.v_proj.kind == "linear4bit"


def test_merge_and_unload_gives_a_plain_float_model(folder, tmp_path):
    model = trained_4bit(folder)
    x = ids()
    expected = logits(model, x)
    with pytest.warns(UserWarning, match="dequantizes"):
        merged = model.merge_and_unload()
    kinds = {type(m).__name__ for m in merged.modules()}
    assert not kinds & {"Linear4bit", "Linear8bitLt", "LoraLayer"}
    assert not any(type(p).__name__ in ("Params4bit", "Int8Params") for p in merged.parameters())
    assert not getattr(merged, "is_quantized", False) and not hasattr(merged.config, "quantization_config")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    got = logits(merged, x)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()

    merged.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain transformers, no adaptune layers
    assert type(reloaded.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert torch.equal(logits(reloaded, x), got)


def test_dora_on_4bit_matches_peft_and_merges(folder, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = get_peft_model(load4(folder), LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    x = ids()
    base = load4(folder)
    keep_trainable_layout(base)
    assert torch.allclose(logits(model.eval(), x), logits(base, x), atol=1e-6)  # fresh DoRA: a no-op
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    expected = logits(model.eval(), x)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert torch.allclose(logits(theirs, x), expected, atol=1e-5)
    with pytest.warns(UserWarning, match="dequantizes"):
        merged = model.merge_and_unload()
    assert torch.allclose(logits(merged, x), expected, atol=1e-4)


def test_int8_base_lora_forward_and_merge(folder):
    model = get_peft_model(load4(folder, "int8"), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.kind == "linear8bitlt"
    fp32_w = load_fp32(folder).model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(dequantize_weight(layer.base_layer), fp32_w, atol=fp32_w.abs().max().item() / 100)
    x = ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = logits(model.eval(), x)
        merged = model.merge_and_unload()
        got = logits(merged, x)
    assert not any(type(m).__name__ == "Linear8bitLt" for m in merged.modules())
    # int8 matmul quantizes activations too, the merged float model does not: close, not equal
    assert (got - expected).abs().max() < 0.05


# ---- bitsandbytes' CPU inference layout --------------------------------------------------------------
def test_dequantize_weight_reads_the_cpu_inference_layout(folder):
    import bitsandbytes.functional as bf

    model = load4(folder)
    layer = model.model.layers[0].mlp.up_proj
    before = bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps the standard layout")
    h = torch.randn(3, 64)
    with torch.no_grad():
        y = layer(h)  # eval + no grad: bitsandbytes re-packs the weight in place
    assert layer.weight.quant_state.packing_format_for_cpu
    w = dequantize_weight(layer)
    assert torch.allclose(w, before, rtol=1e-2, atol=1e-6)  # absmax rounded to bf16 by the re-packing
    assert torch.allclose(y, h @ w.T, atol=3e-2)  # the kernel computes in bf16
    assert keep_trainable_layout(model) > 0 and not layer.weight.quant_state.packing_format_for_cpu
    assert torch.allclose(dequantize_weight(layer), before, rtol=1e-2, atol=1e-6)


def test_weight_bytes_counts_4bit_storage(folder):
    fp32, nf4 = load_fp32(folder), load4(folder)
    linear = lambda m: sum(weight_bytes(mod) for n, mod in m.named_modules()  # noqa: E731
                           if n.endswith(("_proj",)) and "." in n)
    assert weight_bytes(nf4) < weight_bytes(fp32)
    assert linear(nf4) < 0.2 * linear(fp32)


# ---- peft and transformers' Trainer -----------------------------------------------------------------
def test_peft_loads_adaptune_qlora_adapter_with_identical_logits(folder, tmp_path):
    peft = pytest.importorskip("peft")
    model = trained_4bit(folder)
    x = ids()
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    base = load4(folder)
    keep_trainable_layout(base)  # same bitsandbytes layer setting on both copies (see quant.py)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    assert torch.equal(logits(theirs, x), expected)


def test_transformers_trainer_accepts_a_4bit_adaptune_model(folder, tmp_path):
    import transformers

    model = get_peft_model(prepare_model_for_kbit_training(load4(folder)), LoraConfig(r=4, target_modules=TARGETS))
    assert model.is_quantized  # passed through from the transformers model
    rows = [{"input_ids": ids(seed=i, rows=1, cols=16)[0].tolist()} for i in range(4)]
    for row in rows:
        row["labels"] = row["input_ids"]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no",
                                          remove_unused_columns=False, learning_rate=1e-2)
    before = lora_tensors(model)
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()  # no "purely quantized" refusal
    after = lora_tensors(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
