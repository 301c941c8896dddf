"""LoftQ initialisation and in-memory quantization (``loftq.py``, ``quant.quantize_linears``).

The tiny Llama has layer sizes that are multiples of 64 (bitsandbytes' block size), as in
``test_qlora.py``. References are computed here from definitions: the plain quantization of a
weight, a full SVD of its error, the full-precision model's logits.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM  # noqa: E402

from adaptune import LoftQConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from adaptune.errors import ConfigError  # noqa: E402
from adaptune.quant.bnb import bnb_config, quantize_linears, quantized_linear_from  # noqa: E402
from adaptune.quant.dequant import dequantize_weight  # noqa: E402
from adaptune.quant.kbit import keep_trainable_layout  # noqa: E402
from adaptune.training.job import TrainJob  # noqa: E402
from adaptune.tuners.lora.loftq import loftq_layer  # noqa: E402
from tests.test_qlora import ids, load_fp32, logits  # noqa: E402  (the same tiny model helpers)
from tests.tiny import tiny_gpt2, tiny_llama  # noqa: E402

SIZES = dict(hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_loftq")
    tiny_llama(**SIZES).save_pretrained(path)
    return path


def weight_like_a_model(rows=128, cols=192, seed=0):
    """Gaussian weights plus a few strong directions, as trained layers have."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(rows, 4, generator=g) @ torch.randn(4, cols, generator=g)
    return 0.02 * torch.randn(rows, cols, generator=g) + 0.01 * low


def linear_with(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight.clone()
    return layer


# ---- one layer ------------------------------------------------------------------------------------
def test_one_iteration_keeps_the_plain_quantization_and_fits_its_error():
    weight = weight_like_a_model()
    linear = linear_with(weight)
    start = loftq_layer(linear, rank=8, scaling=2.0, num_iter=1)
    plain = quantized_linear_from(linear, "nf4")
    assert type(start.base_layer).__name__ == "Linear4bit"
    assert torch.equal(start.base_layer.weight.data, plain.weight.data)  # same 4-bit codes
    error = weight - dequantize_weight(plain)
    # the adapter's applied update (scaling * B @ A) is the best rank-8 fit of that error
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    applied = 2.0 * start.lora_B @ start.lora_A
    assert start.lora_A.shape == (8, 192) and start.lora_B.shape == (128, 8)
    assert (applied - best).norm() < 1e-3 * best.norm()
    assert (error - applied).norm() < error.norm()


def test_more_iterations_bring_base_plus_adapter_closer_to_the_weight():
    weight = weight_like_a_model(seed=1)
    linear = linear_with(weight)

    def gap(start):
        return (weight - dequantize_weight(start.base_layer) - start.lora_B @ start.lora_A).norm()

    one, five = (loftq_layer(linear, rank=8, scaling=1.0, num_iter=n) for n in (1, 5))
    assert not torch.equal(one.base_layer.weight.data, five.base_layer.weight.data)  # the stored base moved
    assert gap(five) < gap(one)


def test_int8_bits_give_an_int8_layer_with_a_smaller_error():
    weight = weight_like_a_model(seed=2)
    linear = linear_with(weight)
    four, eight = (loftq_layer(linear, rank=4, scaling=1.0, num_bits=b) for b in (4, 8))
    assert type(eight.base_layer).__name__ == "Linear8bitLt"

    def gap(start):
        return (weight - dequantize_weight(start.base_layer) - start.lora_B @ start.lora_A).norm()

    assert gap(eight) < gap(four) / 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_bits=3), "loftq_bits"), (dict(num_iter=0), "loftq_iter"), (dict(rank=200), "exceeds"),
])
def test_loftq_layer_rejects_bad_settings(kwargs, message):
    settings = dict(rank=4, scaling=1.0) | kwargs
    with pytest.raises(ConfigError, match=message):
        loftq_layer(linear_with(weight_like_a_model()), **settings)


# ---- quantizing a model in memory -------------------------------------------------------------------
def test_quantize_linears_equals_quantized_loading_and_mixes_int8(folder):
    loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config("nf4")).eval()
    model = load_fp32(folder)
    assert quantize_linears(model) == 2 * 7  # every projection of both layers; the head stays
    assert type(model.lm_head) is nn.Linear
    for (name, ours), (_, theirs) in zip(model.named_modules(), loaded.named_modules()):
        if type(theirs).__name__ == "Linear4bit":
            assert type(ours).__name__ == "Linear4bit", name
            assert torch.equal(ours.weight.data, theirs.weight.data), name
            assert torch.equal(dequantize_weight(ours), dequantize_weight(theirs)), name
    x = ids()
    keep_trainable_layout(model), keep_trainable_layout(loaded)  # the computation adaptune trains with
    assert torch.equal(logits(model, x), logits(loaded, x))

    mixed = load_fp32(folder)
    quantize_linears(mixed, "nf4", int8_modules=["down_proj", "v_proj"])
    kinds = {n.rsplit(".", 1)[-1]: type(m).__name__ for n, m in mixed.named_modules() if n.endswith("_proj")}
    assert kinds == {"q_proj": "Linear4bit", "k_proj": "Linear4bit", "v_proj": "Linear8bitLt",
                     "o_proj": "Linear4bit", "gate_proj": "Linear4bit", "up_proj": "Linear4bit",
                     "down_proj": "Linear8bitLt"}


def test_int8_layers_evaluate_as_they_train_on_cpu():
    layer = nn.Sequential(quantized_linear_from(linear_with(weight_like_a_model(64, 128)), "int8"))
    x = torch.randn(4, 128) * 3

    def output(mode):
        layer.train(mode)
        with torch.no_grad():
            return layer(x)

    def input_grad():
        layer.train(True)
        xg = x.clone().requires_grad_(True)
        (layer(xg) * torch.linspace(-1, 1, 64)).sum().backward()
        return xg.grad

    bnb_trained, bnb_grad = output(True), input_grad()
    assert not torch.equal(output(False), bnb_trained)  # bitsandbytes: int8 activations in eval only
    assert keep_trainable_layout(layer) == 1
    trained = output(True)
    assert torch.equal(output(False), trained)
    assert not layer[0].training  # the module's own mode is left as it was
    assert torch.allclose(trained, bnb_trained, atol=1e-6)  # bitsandbytes' training formula
    assert torch.allclose(input_grad(), bnb_grad, atol=1e-6)


# ---- through get_peft_model / from_pretrained ------------------------------------------------------
def loftq_config(**loftq):
    return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="loftq",
                      loftq_config=LoftQConfig(**loftq))


def test_get_peft_model_with_loftq_starts_closer_to_full_precision(folder):
    x = ids()
    reference = logits(load_fp32(folder), x)
    plain = load_fp32(folder)
    quantize_linears(plain)
    plain_gap = (logits(plain, x) - reference).abs().mean()

    model = get_peft_model(load_fp32(folder), loftq_config(loftq_iter=3, loftq_bits_pattern={"down_proj": 8}))
    layers = model.base_model.model.model.layers
    assert (layers[0].self_attn.q_proj.kind, layers[1].mlp.down_proj.kind) == ("linear4bit", "linear8bitlt")
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    gap = (logits(model, x) - reference).abs().mean()
    assert gap < 0.7 * plain_gap
    with model.disable_adapter():  # the stored base alone: the adapter's start carries part of the weights
        assert (logits(model, x) - reference).abs().mean() > 1.2 * gap

    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_loftq_adapter_reloads_onto_the_full_precision_model(folder, tmp_path):
    model = get_peft_model(load_fp32(folder), loftq_config(loftq_iter=2))
    model.train()
    x = ids(seed=3, rows=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    expected = logits(model, ids())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq"
    assert saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}  # peft's fields only, when unused

    # the same base is rebuilt from the full-precision weights, then the trained adapter loaded on it
    reloaded = PeftModel.from_pretrained(load_fp32(folder), tmp_path)
    assert torch.allclose(logits(reloaded, ids()), expected, atol=1e-5)
    with pytest.warns(UserWarning, match="dequantizes"):
        merged = reloaded.merge_and_unload()
    assert not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in merged.modules())
    assert torch.allclose(logits(merged, ids()), expected, atol=1e-4)


def test_peft_reads_the_loftq_adapter_config(folder, tmp_path):
    peft = pytest.importorskip("peft")
    get_peft_model(load_fp32(folder), loftq_config(loftq_iter=2)).save_pretrained(tmp_path)
    config = peft.LoraConfig.from_pretrained(tmp_path)
    assert config.init_lora_weights == "loftq"
    assert config.loftq_config["loftq_bits"] == 4 and config.loftq_config["loftq_iter"] == 2


def test_loftq_on_an_already_quantized_base_warns_and_starts_plain(folder):
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config("nf4"))
    with pytest.warns(UserWarning, match="already quantized"):
        model = get_peft_model(base, loftq_config(loftq_iter=2))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0  # LoRA's zero start


def test_loftq_config_checks():
    with pytest.raises(ConfigError, match="needs loftq_config"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ConfigError, match="use_dora"):
        LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(), use_dora=True)
    with pytest.raises(ConfigError, match="loftq_bits"):
        LoftQConfig(loftq_bits=2)
    with pytest.raises(ConfigError, match=r"loftq_bits_pattern\['down_proj'\]"):
        LoftQConfig(loftq_bits_pattern={"down_proj": 16})
    with pytest.raises(ConfigError, match="loftq_iter"):
        LoftQConfig(loftq_iter=0)
    with pytest.warns(UserWarning, match="ignored"):
        assert LoraConfig(loftq_config=LoftQConfig()).loftq_config == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read = LoraConfig.from_dict({"peft_type": "LORA", "init_lora_weights": "loftq",
                                     "loftq_config": {"loftq_bits": 8, "loftq_iter": 3}})
    assert read.loftq == LoftQConfig(loftq_bits=8, loftq_iter=3)
    with pytest.raises(ConfigError, match="nn.Linear"):
        get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], init_lora_weights="loftq",
                                               loftq_config=LoftQConfig()))


# ---- the training job ------------------------------------------------------------------------------
def test_train_job_quantization_options():
    job = TrainJob(method="qlora", lora_init="loftq", int8_modules="down_proj, v_proj")
    assert job.int8_modules == ["down_proj", "v_proj"] and job.quantize_kind == "nf4"
    with pytest.raises(ConfigError, match="lora-init loftq"):
        TrainJob(method="lora", lora_init="loftq")  # no quantized base to start from
    with pytest.raises(ConfigError, match="lora-init loftq"):
        TrainJob(method="dora", quantize="nf4", lora_init="loftq")
    with pytest.raises(ConfigError, match="int8-modules"):
        TrainJob(method="lora", int8_modules="down_proj")
    with pytest.raises(ConfigError, match="loftq-iter"):
        TrainJob(method="qlora", lora_init="loftq", loftq_iter=0)


def test_cli_trains_qlora_with_loftq_and_mixed_layers(model_dir, tmp_path):
    from adaptune.cli import main
    from tests.tiny import write_words_file

    data = write_words_file(tmp_path / "words.txt", 60)
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
                 "--method", "qlora", "--lora-init", "loftq", "--loftq-iter", "2", "--int8-modules", "down_proj",
                 "--targets", "all-linear", "--max-steps", "6", "--lr", "1e-2", "--max-length", "32",
                 "--batch-size", "4", "--eval-every", "0"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq"
    assert config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2, "loftq_bits_pattern": {"down_proj": 8}}
    result = json.loads((out / "train_result.json").read_text())
    assert result["ppl_after"] < result["ppl_before"]
