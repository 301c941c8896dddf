"""The LoRA core on tiny random models: arithmetic, merging, adapters as objects, targets, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from adaptune import LoraConfig, PeftModel, TaskType, get_peft_model
from adaptune.errors import AdaptuneError, ConfigError, TargetError
from adaptune.tuners.lora.layer import AdapterSpec, LoraLayer
from tests.tiny import tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5

IDS = torch.tensor([[5, 9, 17, 33, 41, 7, 8, 60], [3, 11, 12, 50, 70, 90, 4, 6]])


def _perturb(model: torch.nn.Module, scale: float = 0.5) -> None:
    """Make every adapter non-trivial (a fresh LoRA has B = 0 and changes nothing)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


CASES = {
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"])),
    "gpt2-slices": (tiny_gpt2, dict(target_modules=["q_attn", "v_attn"])),
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-dora": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], use_dora=True)),
    "llama-rslora": (tiny_llama, dict(target_modules="all-linear", use_rslora=True)),
    "llama-embedding": (tiny_llama, dict(target_modules=["embed_tokens", "q_proj"])),
    "gpt2-dora": (tiny_gpt2, dict(target_modules=["c_attn"], use_dora=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fresh_adapter_is_noop_and_merge_matches_unmerged(case):
    build, kw = CASES[case]
    base = build()
    reference = _logits(base)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = _quiet(get_peft_model, base, LoraConfig(r=4, lora_alpha=8, **kw))
    torch.testing.assert_close(_logits(model), reference, atol=1e-6, rtol=0)

    _perturb(model)
    adapted = _logits(model)
    assert (adapted - reference).abs().max() > 1e-2, "perturbed adapter must change the output"
    with model.disable_adapter():
        assert torch.equal(_logits(model), reference), "disabled must be exactly the base"
    model.merge_adapter()
    torch.testing.assert_close(_logits(model), adapted, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model), adapted, atol=1e-4, rtol=1e-4)
    for key, value in model.get_base_model().state_dict().items():
        if "lora_" in key or "modules_to_save" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        torch.testing.assert_close(value, base_weights[plain], atol=1e-5, rtol=1e-5)

    with model.disable_adapter():  # after a merge/unmerge cycle: equal up to float rounding
        torch.testing.assert_close(_logits(model), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_no_grad_forward_adds_in_place_and_matches_autograd_and_merged(dropout):
    """Generation's path (no autograd: scaling on addmm's alpha, the sum into the base output in
    place) gives what the autograd path and merged weights give, with two adapters stacked."""
    torch.manual_seed(0)
    layer = LoraLayer(torch.nn.Linear(16, 12))
    layer.add("a", AdapterSpec(r=4, alpha=8, dropout=dropout))
    layer.add("b", AdapterSpec(r=2, alpha=3, dropout=dropout, use_rslora=True))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    layer.set_active(["a", "b"])
    layer.eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        base = layer.base_layer(x)
        fast = layer(x)
    slow = layer(x)
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), atol=1e-6, rtol=1e-6)
    expected = base + sum(layer.scaling(n) * x @ layer.lora_A[n].weight.T @ layer.lora_B[n].weight.T for n in "ab")
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
    layer.merge()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), fast, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_returns_plain_model_with_same_logits():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    _perturb(model)
    adapted = _logits(model)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), adapted, atol=1e-4, rtol=1e-4)


def test_unload_gives_base_logits_even_after_merge():
    base = tiny_llama()
    reference = _logits(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    _perturb(model)
    model.merge_adapter()
    plain = model.unload()
    torch.testing.assert_close(_logits(plain), reference, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_nan_and_leaves_model_unmerged():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    _perturb(model)
    before = _logits(model)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert not layer.merged_adapters
    assert torch.isfinite(layer.base_layer.weight).all()
    assert before.shape == _logits(model).shape


def test_disable_adapter_restores_merged_state():
    base = tiny_gpt2()
    reference = _logits(base)
    model = _quiet(get_peft_model, base, LoraConfig(r=4, target_modules=["c_attn"]))
    _perturb(model)
    adapted = _logits(model)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), reference, atol=1e-5, rtol=1e-5)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(_logits(model), adapted, atol=1e-4, rtol=1e-4)


def test_gpt2_q_v_slices_leave_k_exact():
    base = tiny_gpt2()
    model = _quiet(get_peft_model, base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_attn", "v_attn"],
                                                    task_type=TaskType.CAUSAL_LM))
    _perturb(model)
    layer = model.get_base_model().transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLayer)
    e = layer.out_features // 3
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        out, ref = layer(x), layer.base_layer(x)
    assert torch.equal(out[..., e:2 * e], ref[..., e:2 * e]), "k slice must be exactly the base output"
    assert (out[..., :e] - ref[..., :e]).abs().max() > 1e-3
    assert (out[..., 2 * e:] - ref[..., 2 * e:]).abs().max() > 1e-3
    # parameter count: per slice r*(in) + (out/3)*r, two slices, two layers
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 2 * 2 * (4 * layer.in_features + e * 4)


def test_training_step_changes_only_adapter_and_saved_heads():
    base = tiny_bert_cls()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["query", "value"], task_type=TaskType.SEQ_CLS))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    loss = model(input_ids=IDS, labels=torch.tensor([0, 2])).loss
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "a step must change something"
    assert all("lora_" in n or ".modules_to_save." in n for n in changed), changed
    assert any(".modules_to_save.default." in n and "classifier" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at 0, so A gets no gradient on step 1


def test_trainable_parameter_line_matches_peft(capsys):
    peft = pytest.importorskip("peft")
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ours = get_peft_model(tiny_llama(), LoraConfig(**cfg))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == lines[1]
    assert lines[0].startswith("trainable params: ")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_several_named_adapters_and_mixed_batches():
    base = tiny_llama()
    reference = _logits(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _perturb(model)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "v_proj"]))
    assert model.active_adapter == "default", "add_adapter must not activate"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".other." in n:
                p.add_(torch.randn_like(p))
    default_out = _logits(model)
    model.set_adapter("other")
    other_out = _logits(model)
    assert (other_out - default_out).abs().max() > 1e-2
    assert all(p.requires_grad == (".other." in n) for n, p in model.named_parameters() if "lora_" in n)

    mixed = _logits(model, adapter_names=["other", "__base__"])
    torch.testing.assert_close(mixed[0], other_out[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], reference[1], atol=1e-5, rtol=1e-5)
    mixed = _logits(model, adapter_names=["default", "other"])
    torch.testing.assert_close(mixed[0], default_out[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], other_out[1], atol=1e-5, rtol=1e-5)

    gen_mixed = model.generate(input_ids=IDS[:, :4], max_new_tokens=4, do_sample=False,
                               adapter_names=["default", "__base__"], pad_token_id=0)
    model.set_adapter("default")
    gen_default = model.generate(input_ids=IDS[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    with model.disable_adapter():
        gen_base = model.generate(input_ids=IDS[1:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen_mixed[0], gen_default[0])
    assert torch.equal(gen_mixed[1], gen_base[0])

    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert not any(".other." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model), default_out, atol=1e-6, rtol=0)


def test_add_weighted_adapter_cat_is_exact_and_svd_full_rank_is_exact():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj"]))
    _perturb(model)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    expected = 0.7 * layer.delta_weight("default") + 0.3 * layer.delta_weight("b")
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "cat", combination_type="cat")
    torch.testing.assert_close(layer.delta_weight("cat"), expected, atol=1e-5, rtol=1e-5)
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "svd", combination_type="svd", svd_rank=5)
    torch.testing.assert_close(layer.delta_weight("svd"), expected, atol=1e-4, rtol=1e-4)
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "svd1", combination_type="svd", svd_rank=1)
    err1 = (layer.delta_weight("svd1") - expected).norm()
    assert 0 < err1 < expected.norm()
    with pytest.raises(ConfigError, match="equal rank"):
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "lin", combination_type="linear")


def test_add_weighted_adapter_cat_of_adapters_on_different_layers_is_exact():
    """An adapter that does not touch a layer adds nothing there: its rank block is zeros."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj"]))
    _perturb(model)
    attn = model.get_base_model().model.layers[0].self_attn
    want_q = 0.7 * attn.q_proj.delta_weight("default") + 0.3 * attn.q_proj.delta_weight("b")
    want_v = 0.3 * attn.v_proj.delta_weight("b")
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "cat", combination_type="cat")
    torch.testing.assert_close(attn.q_proj.delta_weight("cat"), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.v_proj.delta_weight("cat"), want_v, atol=1e-5, rtol=1e-5)


def test_targets_list_regex_all_linear_and_defaults():
    def names(model):
        return {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}

    m = get_peft_model(tiny_llama(), LoraConfig(target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj"))
    assert names(m) == {"base_model.model.model.layers.1.self_attn.q_proj",
                        "base_model.model.model.layers.1.self_attn.k_proj"}
    m = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    found = names(m)
    assert not any(n.endswith("lm_head") for n in found)
    assert sum(n.endswith("gate_proj") for n in found) == 2 and len(found) == 14
    m = get_peft_model(tiny_llama(), LoraConfig())  # llama default: q_proj, v_proj
    assert {n.rsplit(".", 1)[-1] for n in names(m)} == {"q_proj", "v_proj"}
    m = _quiet(get_peft_model, tiny_gpt2(), LoraConfig())
    assert {n.rsplit(".", 1)[-1] for n in names(m)} == {"c_attn"}
    m = get_peft_model(tiny_t5(), LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM))
    assert {n.rsplit(".", 1)[-1] for n in names(m)} == {"q", "v"}
    m = get_peft_model(tiny_bert_cls(), LoraConfig(task_type=TaskType.SEQ_CLS))
    assert {n.rsplit(".", 1)[-1] for n in names(m)} == {"query", "value"}
    m = get_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"],
                                                layers_to_transform=[1]))
    found = names(m)
    assert found and all(".layers.1." in n for n in found) and not any("o_proj" in n for n in found)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "gemma", "opt", "roberta", "bart", "phi"])
def test_default_targets_exist_for_common_architectures(model_type):
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, d_model=32,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                               ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64)
    model = AutoModel.from_config(cfg)
    peft_model = get_peft_model(model, LoraConfig(r=2))
    adapted = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert adapted, model_type


def test_rank_and_alpha_patterns_apply_per_module():
    model = get_peft_model(tiny_llama(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 1}))
    layers = model.get_base_model().model.layers
    assert layers[0].self_attn.v_proj.specs["default"].r == 2
    assert layers[0].self_attn.q_proj.specs["default"].scaling == 2.0
    assert layers[1].self_attn.q_proj.specs["default"].scaling == 0.25
    rs = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert rs.get_base_model().model.layers[0].self_attn.q_proj.specs["default"].scaling == pytest.approx(4.0)


def test_gradient_checkpointing_trains_adapters():
    model = _quiet(get_peft_model, tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)


# ---- bad input ---------------------------------------------------------------------------------
def test_no_matching_target_lists_real_layers_and_suggests():
    with pytest.raises(TargetError) as err:
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_prj", "value"]))
    text = str(err.value)
    assert "q_proj" in text and "did you mean" in text and "embed_tokens" in text
    assert isinstance(err.value, AdaptuneError)


def test_failed_injection_leaves_model_untouched():
    base = tiny_llama()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(TargetError):
        get_peft_model(base, LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    assert base.state_dict().keys() == before.keys()


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=-2), dict(r=2.5), dict(lora_dropout=1.5), dict(bias="some"),
                                 dict(target_modules=[1, 2]), dict(use_dora="yes"), dict(rank_pattern={"q": 0}),
                                 dict(task_type="CLASSIFY")])
def test_bad_config_values_are_clear_errors(bad):
    with pytest.raises(ConfigError):
        LoraConfig(**bad)


@pytest.mark.parametrize("task, build", [(TaskType.CAUSAL_LM, tiny_bert_cls), (TaskType.SEQ_2_SEQ_LM, tiny_llama),
                                         (TaskType.SEQ_CLS, tiny_llama), (TaskType.QUESTION_ANS, tiny_gpt2)])
def test_task_type_that_does_not_fit_the_model(task, build):
    with pytest.raises(ConfigError, match="task_type"):
        get_peft_model(build(), LoraConfig(task_type=task, target_modules="all-linear"))


def test_inference_loaded_adapter_is_frozen_and_eval(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    _perturb(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not loaded.training
    assert loaded.get_nb_trainable_parameters()[0] == 0
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-6, rtol=0)
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("how", ["linear", "cat"])
def test_add_weighted_adapter_matches_peft(how):
    peft = pytest.importorskip("peft")
    ranks = (2, 2) if how == "linear" else (2, 3)
    ours = get_peft_model(tiny_llama(), LoraConfig(r=ranks[0], lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    ours.add_adapter("b", LoraConfig(r=ranks[1], lora_alpha=3, target_modules=["q_proj", "v_proj"]))
    _perturb(ours)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=ranks[0], lora_alpha=4,
                                                               target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("b", peft.LoraConfig(r=ranks[1], lora_alpha=3, target_modules=["q_proj", "v_proj"]))
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(mine[name])
    ours.add_weighted_adapter(["default", "b"], [0.7, 0.5], "mix", combination_type=how)
    theirs.add_weighted_adapter(["default", "b"], [0.7, 0.5], "mix", combination_type=how)
    ours.set_adapter("mix")
    theirs.set_adapter("mix")
    reference = _logits(tiny_llama())
    mixed = _logits(ours)
    assert (mixed - reference).abs().max() > 1e-3
    torch.testing.assert_close(mixed, _logits(theirs), atol=1e-5, rtol=1e-5)


def test_plain_transformers_trainer_checkpoints_and_resumes_a_tied_model(tmp_path):
    """transformers.Trainer (not adaptune's) saves our PeftModel's state dict with safetensors."""
    import transformers

    def run(max_steps, resume=None):
        torch.manual_seed(0)
        model = _quiet(get_peft_model, tiny_gpt2(), LoraConfig(r=4, target_modules=["q_attn", "v_attn"],
                                                                task_type=TaskType.CAUSAL_LM))
        rows = [{"input_ids": r, "labels": r} for r in torch.randint(5, 100, (16, 12),
                                                                     generator=torch.Generator().manual_seed(1))]
        args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=max_steps, save_steps=2,
                                              per_device_train_batch_size=4, report_to="none", use_cpu=True,
                                              learning_rate=0.01, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train(resume_from_checkpoint=resume)
        return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}

    full = run(4)
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    resumed = run(4, resume=str(tmp_path / "out" / "checkpoint-2"))
    for key in full:
        torch.testing.assert_close(full[key], resumed[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("task, auto_name, head", [
    (TaskType.TOKEN_CLS, "BertForTokenClassification", "classifier"),
    (TaskType.QUESTION_ANS, "BertForQuestionAnswering", "qa_outputs"),
    (TaskType.FEATURE_EXTRACTION, "BertModel", None),
])
def test_other_task_classes_train_and_save_their_heads(task, auto_name, head, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from adaptune.peft_model import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    def build():
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=160, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)
        return getattr(transformers, auto_name)(cfg).eval()

    model = get_peft_model(build(), LoraConfig(r=4, task_type=task))
    assert type(model) is MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task]
    _perturb(model)
    if head:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f"{head}.modules_to_save.default" in name:
                    p.add_(1.0)
    out = model(input_ids=IDS)
    first = out[0] if not hasattr(out, "logits") else out.logits
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any("lora_A" in k for k in keys)
    assert any(f".{head}." in k for k in keys) == bool(head)
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    assert type(loaded) is MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task]
    again = loaded(input_ids=IDS)
    torch.testing.assert_close(again[0] if not hasattr(again, "logits") else again.logits, first, atol=1e-5, rtol=0)


def test_loading_onto_another_base_warns_with_both_names(tmp_path):
    base = tiny_llama()
    base.config.name_or_path = "org/model-a"
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    other = tiny_llama()
    other.config.name_or_path = "org/model-b"
    with pytest.warns(UserWarning, match="model-a.*model-b"):
        PeftModel.from_pretrained(other, tmp_path)
