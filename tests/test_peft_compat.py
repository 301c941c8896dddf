"""peft's file format, both ways: adapters saved by adaptune load in peft and vice versa.

peft 0.21.2 is the oracle here (a test-only dependency; src/adaptune never imports it). Every
comparison is made on two identical tiny random base models (same seed), one per library, in fp32.
A fresh LoRA is a no-op (B = 0), so every adapter is perturbed before it is saved, and each test
checks that the adapted logits are clearly away from the base logits: a no-op cannot pass.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import adaptune
from adaptune.errors import AdapterFileError
from adaptune.tuners.lora.layer import LoraLayer
from tests.tiny import VOCAB, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5

peft = pytest.importorskip("peft")

pytestmark = [
    # peft's own notes on behaviour these tests exercise on purpose
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Careful, disabling adapter layers with bias:UserWarning"),
]

ATOL = 1e-5
MARGIN = 1e-2  # adapted logits must differ from the base logits by at least this much

# Fields peft writes into every LoRA adapter_config.json that a reader relies on (the spec's list).
PEFT_CONFIG_FIELDS = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out",
    "bias", "use_rslora", "use_dora", "modules_to_save", "init_lora_weights", "rank_pattern",
    "alpha_pattern", "layers_to_transform", "layers_pattern", "base_model_name_or_path", "revision",
    "inference_mode", "peft_version",
}
# Fields whose values must agree between the two libraries' files for the same config.
SAME_VALUE_FIELDS = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "fan_in_fan_out",
                     "bias", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "inference_mode")

FACTORIES = {"gpt2": tiny_gpt2, "llama": tiny_llama, "bert": tiny_bert_cls, "t5": tiny_t5}


# ---- helpers -----------------------------------------------------------------------------------
def inputs_for(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return batch


@torch.no_grad()
def logits(model: torch.nn.Module, kind: str) -> torch.Tensor:
    return model(**inputs_for(kind)).logits.float()


def base_logits(kind: str) -> torch.Tensor:
    return logits(FACTORIES[kind](seed=0), kind)


@torch.no_grad()
def perturb(model: torch.nn.Module, adapter: str = "default", seed: int = 0, scale: float = 0.2) -> int:
    """Add noise to adapter ``adapter``'s tensors and to whatever else trains (biases, saved heads).

    Returns how many tensors were changed, so a test can check that the adapter really exists.
    """
    g = torch.Generator().manual_seed(seed)
    tag = re.compile(rf"\.{re.escape(adapter)}(\.|$)")
    changed = 0
    for name, p in model.named_parameters():
        if tag.search(name) or (p.requires_grad and adapter == "default"):
            p.add_(torch.randn(p.shape, generator=g) * scale)
            changed += 1
    return changed


def build(lib, kind: str, **config) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both libraries warn about fan_in_fan_out on GPT-2
        model = lib.get_peft_model(FACTORIES[kind](seed=0), lib.LoraConfig(**config))
    assert perturb(model) > 0
    return model.eval()


def load(lib, kind: str, folder: Path, **kwargs) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lib.PeftModel.from_pretrained(FACTORIES[kind](seed=0), str(folder), **kwargs)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def assert_adapted(adapted: torch.Tensor, kind: str) -> None:
    gap = (adapted - base_logits(kind)).abs().max().item()
    assert gap > MARGIN, f"adapter is (nearly) a no-op: max |adapted - base| = {gap:.2e}"


def saved_tensors(folder: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str] | None]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


def peft_only_key(key: str) -> bool:
    """Tensors peft writes and adaptune deliberately does not (adaptune reads them all).

    ``save_embedding_layers="auto"`` makes peft store the whole frozen base weight of an adapted
    ``embed_tokens`` / ``lm_head`` (``...embed_tokens.base_layer.weight``); ``bias="all"`` makes it
    store a head's ``original_module`` bias and a duplicate ``modules_to_save.bias``.
    """
    return bool(re.search(r"\.(embed_tokens|lm_head)\.base_layer\.weight$", key)) or bool(
        re.search(r"\.(original_module|modules_to_save)\.bias$", key))


def read_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


# ---- both ways, one config at a time -----------------------------------------------------------
CASES = {
    # id: (model kind, LoraConfig kwargs, identical for both libraries)
    "gpt2-default-targets": ("gpt2", dict(task_type="CAUSAL_LM", r=4, lora_alpha=8)),
    "llama-plain": ("llama", dict(task_type="CAUSAL_LM", r=4, lora_alpha=16,
                                  target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-dora": ("llama", dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True,
                                 target_modules=["q_proj", "k_proj", "gate_proj"])),
    "gpt2-dora-conv1d": ("gpt2", dict(task_type="CAUSAL_LM", r=2, lora_alpha=4, use_dora=True,
                                      target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "llama-rslora": ("llama", dict(task_type="CAUSAL_LM", r=4, lora_alpha=6, use_rslora=True,
                                   target_modules=["q_proj", "v_proj", "o_proj"])),
    "llama-modules-to-save-lm-head": ("llama", dict(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                    target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=["lm_head"])),
    "bert-seq-cls-head": ("bert", dict(task_type="SEQ_CLS", r=4, lora_alpha=8)),
    "llama-embedding": ("llama", dict(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                      target_modules=["embed_tokens", "q_proj"])),
    "gpt2-embedding-wte": ("gpt2", dict(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                        target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    "gpt2-bias-lora-only": ("gpt2", dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, bias="lora_only",
                                         target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "bert-bias-all": ("bert", dict(task_type="SEQ_CLS", r=4, lora_alpha=8, bias="all",
                                   target_modules=["query", "value"])),
    "llama-rank-alpha-pattern": ("llama", dict(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
        alpha_pattern={"up_proj": 3.0, "model.layers.0.self_attn.v_proj": 12.0})),
    "t5-seq2seq": ("t5", dict(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, use_rslora=True)),
    # T5's MLP reads ``self.wo.weight.dtype``: the wrapped wo must pass its base weight through
    "t5-all-linear": ("t5", dict(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules="all-linear")),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_file_format_both_ways(case: str, tmp_path: Path) -> None:
    kind, config = CASES[case]
    ours, theirs = tmp_path / "adaptune", tmp_path / "peft"

    a_model = build(adaptune, kind, **config)
    a_logits = logits(a_model, kind)
    assert_adapted(a_logits, kind)
    a_model.save_pretrained(ours)

    p_model = build(peft, kind, **config)
    p_logits = logits(p_model, kind)
    assert_adapted(p_logits, kind)
    p_model.save_pretrained(theirs)

    # files: exactly peft's set, safetensors with {"format": "pt"}, the same keys and shapes
    assert {f.name for f in ours.iterdir()} <= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in ours.iterdir()}
    our_keys, our_meta = saved_tensors(ours)
    peft_keys, _ = saved_tensors(theirs)
    assert our_meta == {"format": "pt"}
    assert set(our_keys) <= set(peft_keys), sorted(set(our_keys) - set(peft_keys))
    assert {k: peft_keys[k] for k in our_keys} == our_keys  # shapes too
    assert all(peft_only_key(k) for k in set(peft_keys) - set(our_keys)), sorted(set(peft_keys) - set(our_keys))

    # config: the fields peft writes are there, with the same values, and peft reads ours cleanly
    our_cfg, peft_cfg = read_config(ours), read_config(theirs)
    assert PEFT_CONFIG_FIELDS <= set(our_cfg), PEFT_CONFIG_FIELDS - set(our_cfg)
    for name in SAME_VALUE_FIELDS:
        assert our_cfg[name] == peft_cfg[name], (name, our_cfg[name], peft_cfg[name])
    assert isinstance(our_cfg["target_modules"], list)
    if config.get("target_modules") == "all-linear":  # the layers chosen, as names both libraries match
        chosen = {n for n, m in FACTORIES[kind](seed=0).named_modules() if isinstance(m, torch.nn.Linear)}
        def matched(names: list[str]) -> set[str]:
            return {n for n in chosen if any(n == t or n.endswith("." + t) for t in names)}
        assert matched(our_cfg["target_modules"]) == matched(peft_cfg["target_modules"])
    else:
        assert set(our_cfg["target_modules"]) == set(peft_cfg["target_modules"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_view = peft.LoraConfig.from_pretrained(str(ours))
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)], [str(w.message) for w in caught]
    assert (peft_view.r, peft_view.lora_alpha, peft_view.use_dora) == (config["r"], config["lora_alpha"],
                                                                         config.get("use_dora", False))

    # adaptune -> peft
    assert_same(logits(load(peft, kind, ours), kind), a_logits)
    # peft -> adaptune, also with the adapter disabled (bias="all" changes the base biases in both)
    from_peft = load(adaptune, kind, theirs)
    assert_same(logits(from_peft, kind), p_logits)
    with from_peft.disable_adapter(), p_model.disable_adapter():
        assert_same(logits(from_peft, kind), logits(p_model, kind))
    # and adaptune's own round trip
    assert_same(logits(load(adaptune, kind, ours), kind), a_logits)


# ---- GPT-2 q/v slices of the fused c_attn --------------------------------------------------------
SLICE_VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    # per-layer rank/alpha on a sliced layer: the leaf key alone cannot say it
    "per-layer-pattern": dict(rank_pattern={"transformer.h.1.attn.c_attn": 2},
                              alpha_pattern={"transformer.h.0.attn.c_attn": 12.0}),
}


@pytest.mark.parametrize("variant", list(SLICE_VARIANTS), ids=list(SLICE_VARIANTS))
def test_gpt2_fused_slices_round_trip(variant: str, tmp_path: Path) -> None:
    r, alpha, n_embd = 4, 8, 32
    extra = SLICE_VARIANTS[variant]
    model = build(adaptune, "gpt2", task_type="CAUSAL_LM", r=r, lora_alpha=alpha,
                  target_modules=["q_attn", "v_attn"], **extra)
    layers = {n: m for n, m in model.base_model.lora_layers()}
    assert sorted(layers) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    ranks = {n: layer.specs["default"].r for n, layer in layers.items()}
    scalings = {n: layer.scaling("default") for n, layer in layers.items()}
    if "rank_pattern" in extra:
        assert ranks == {"transformer.h.0.attn.c_attn": 4, "transformer.h.1.attn.c_attn": 2}
    # only q and v rows move: the k slice is exactly the base's output
    k = slice(n_embd, 2 * n_embd)
    for layer in layers.values():
        x = torch.randn(2, 5, n_embd)
        with torch.no_grad():
            out, base_out = layer(x), layer.base_layer(x)
        assert torch.equal(out[..., k], base_out[..., k])
        assert (out[..., :n_embd] - base_out[..., :n_embd]).abs().max() > MARGIN
        assert (out[..., 2 * n_embd:] - base_out[..., 2 * n_embd:]).abs().max() > MARGIN

    a_logits = logits(model, "gpt2")
    assert_adapted(a_logits, "gpt2")
    trainable = model.get_nb_trainable_parameters()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "peft will read another rank" warning
        model.save_pretrained(tmp_path)

    # on disk: a plain c_attn LoRA of rank 2r with zero k rows, scaling kept through alpha
    cfg = read_config(tmp_path)
    assert set(cfg["target_modules"]) == {"c_attn"}
    assert cfg["fused_slices"] == {"c_attn": ["q_attn", "v_attn"]}
    if variant == "lora":
        assert cfg["rank_pattern"] == {"c_attn": 2 * r}
        assert cfg["alpha_pattern"] == {"c_attn": 2 * alpha}
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    for name, rank in ranks.items():
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        assert b.shape == (3 * n_embd, 2 * rank)
        assert torch.count_nonzero(b[k]) == 0
        assert torch.count_nonzero(b[:n_embd, rank:]) == 0 and torch.count_nonzero(b[2 * n_embd:, :rank]) == 0

    # peft reads it (ignoring fused_slices with a warning, never failing) with identical logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p_model = peft.PeftModel.from_pretrained(tiny_gpt2(seed=0), str(tmp_path))
    assert any("fused_slices" in str(w.message) for w in caught)
    for name, rank in ranks.items():
        p_layer = p_model.base_model.model.get_submodule(name)
        assert p_layer.r["default"] == 2 * rank
        assert p_layer.scaling["default"] == pytest.approx(scalings[name])
    assert_same(logits(p_model, "gpt2"), a_logits)

    # adaptune reads it back as the same sliced adapter
    again = load(adaptune, "gpt2", tmp_path, is_trainable=True)
    again_layers = {n: m for n, m in again.base_model.lora_layers()}
    assert sorted(again_layers) == sorted(layers)
    for name, layer in again_layers.items():
        assert layer.specs["default"].slices == layers[name].specs["default"].slices
        assert layer.specs["default"].r == ranks[name]
        assert layer.scaling("default") == pytest.approx(scalings[name])
    assert again.get_nb_trainable_parameters()[0] == trainable
    assert_same(logits(again, "gpt2"), a_logits)
    # and saving it again writes the same file
    again.save_pretrained(tmp_path / "again")
    again_cfg = read_config(tmp_path / "again")
    assert (again_cfg["rank_pattern"], again_cfg["alpha_pattern"]) == (cfg["rank_pattern"], cfg["alpha_pattern"])
    assert saved_tensors(tmp_path / "again")[0] == saved_tensors(tmp_path)[0]


# ---- two named adapters --------------------------------------------------------------------------
SECOND = dict(task_type="CAUSAL_LM", r=2, lora_alpha=6, use_rslora=True, target_modules=["k_proj", "o_proj"])


@pytest.mark.parametrize("writer", ["adaptune", "peft"])
def test_two_named_adapters(writer: str, tmp_path: Path) -> None:
    src_lib, dst_lib = (adaptune, peft) if writer == "adaptune" else (peft, adaptune)
    src = build(src_lib, "llama", task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    src.add_adapter("second", src_lib.LoraConfig(**SECOND))
    assert perturb(src, adapter="second", seed=1) > 0
    assert src.active_adapter == "default"  # add_adapter does not activate
    first_logits = logits(src, "llama")
    src.set_adapter("second")
    second_logits = logits(src, "llama")
    assert_adapted(first_logits, "llama")
    assert_adapted(second_logits, "llama")
    assert (first_logits - second_logits).abs().max() > MARGIN
    src.save_pretrained(tmp_path)

    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert {f.name for f in (tmp_path / "second").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert read_config(tmp_path / "second")["r"] == 2

    dst = load(dst_lib, "llama", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dst.load_adapter(str(tmp_path / "second"), adapter_name="second")
    assert_same(logits(dst, "llama"), first_logits)  # loading does not activate
    dst.set_adapter("second")
    assert_same(logits(dst, "llama"), second_logits)
    dst.set_adapter("default")
    assert_same(logits(dst, "llama"), first_logits)


# ---- merge_and_unload agrees across the libraries -------------------------------------------------
MERGE_CASES = {
    "gpt2-conv1d": ("gpt2", dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                 fan_in_fan_out=True)),
    "gpt2-slices": ("gpt2", dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_attn", "v_attn"])),
    "llama-dora": ("llama", dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True,
                                           target_modules=["q_proj", "v_proj"])),
    "llama-embedding-lm-head": ("llama", dict(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                              target_modules=["embed_tokens", "o_proj"],
                                              modules_to_save=["lm_head"])),
}


@pytest.mark.parametrize("case", list(MERGE_CASES), ids=list(MERGE_CASES))
def test_merge_and_unload_matches_peft(case: str, tmp_path: Path) -> None:
    kind, config = MERGE_CASES[case]
    model = build(adaptune, kind, **config)
    adapted = logits(model, kind)
    assert_adapted(adapted, kind)
    model.save_pretrained(tmp_path)

    ours = load(adaptune, kind, tmp_path).merge_and_unload()
    theirs = load(peft, kind, tmp_path).merge_and_unload()
    assert type(ours) is type(FACTORIES[kind](seed=0))
    assert not any(isinstance(m, LoraLayer) for m in ours.modules())
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in ours.named_parameters())
    ours_logits, theirs_logits = logits(ours, kind), logits(theirs, kind)
    assert_same(ours_logits, theirs_logits)
    assert_same(ours_logits, adapted)
    assert set(ours.state_dict()) == set(theirs.state_dict())


def test_unload_keeps_the_trained_head_as_peft_does(tmp_path: Path) -> None:
    """unload() drops the LoRA layers unmerged but keeps a modules_to_save copy (the trained head)."""
    build(adaptune, "bert", task_type="SEQ_CLS", r=4, lora_alpha=8).save_pretrained(tmp_path)
    ours = load(adaptune, "bert", tmp_path).unload()
    theirs = load(peft, "bert", tmp_path).unload()
    assert not any(isinstance(m, LoraLayer) for m in ours.modules())
    torch.testing.assert_close(ours.classifier.weight, theirs.classifier.weight, rtol=0, atol=0)
    assert not torch.equal(ours.classifier.weight, FACTORIES["bert"](seed=0).classifier.weight)
    assert_same(logits(ours, "bert"), logits(theirs, "bert"))


# ---- loading behaviour ---------------------------------------------------------------------------
@pytest.mark.parametrize("is_trainable", [False, True], ids=["frozen", "trainable"])
def test_from_pretrained_mode_and_trainable_params(is_trainable: bool, tmp_path: Path) -> None:
    config = dict(task_type="SEQ_CLS", r=4, lora_alpha=8)
    build(adaptune, "bert", **config).save_pretrained(tmp_path)
    counts = {}
    for lib in (adaptune, peft):
        base = tiny_bert_cls(seed=0).train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lib.PeftModel.from_pretrained(base, str(tmp_path), is_trainable=is_trainable)
        counts[lib.__name__] = model.get_nb_trainable_parameters()
        if not is_trainable:
            assert not model.training
            assert not any(m.training for m in model.modules())
    ours, theirs = counts["adaptune"], counts["peft"]
    assert ours == theirs
    if is_trainable:
        assert ours[0] > 0
    else:
        assert ours[0] == 0


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_parameter_names_in_memory_match_peft(use_dora: bool) -> None:
    """Scripts filter named_parameters() and move state dicts by name, not only through files."""
    config = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=use_dora)
    ours = build(adaptune, "llama", **config)
    theirs = peft.get_peft_model(FACTORIES["llama"](seed=0), peft.LoraConfig(**config)).eval()
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert names == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector.default.weight" in n for n in names) == use_dora
    ours_state = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    result = theirs.load_state_dict(ours_state, strict=False)
    assert not result.unexpected_keys
    assert_same(logits(theirs, "llama"), logits(ours, "llama"))


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_trainable_counts_with_bias_and_a_saved_head_match_peft(bias: str) -> None:
    config = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], bias=bias)
    ours = adaptune.get_peft_model(FACTORIES["bert"](seed=0), adaptune.LoraConfig(**config))
    theirs = peft.get_peft_model(FACTORIES["bert"](seed=0), peft.LoraConfig(**config))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in theirs.named_parameters() if p.requires_grad}


def test_set_adapter_makes_the_adapter_trainable_unless_inference_mode(tmp_path: Path) -> None:
    build(adaptune, "llama", task_type="CAUSAL_LM", r=4, lora_alpha=8).save_pretrained(tmp_path)
    counts = {}
    for lib in (adaptune, peft):
        model = load(lib, "llama", tmp_path)
        model.load_adapter(str(tmp_path), adapter_name="other")
        seen = [model.get_nb_trainable_parameters()[0]]
        model.set_adapter("other")
        seen.append(model.get_nb_trainable_parameters()[0])
        model.set_adapter("other", inference_mode=True)
        seen.append(model.get_nb_trainable_parameters()[0])
        counts[lib.__name__] = seen
    assert counts["adaptune"] == counts["peft"]
    assert counts["adaptune"][0] == 0 and counts["adaptune"][1] > 0 and counts["adaptune"][2] == 0


def test_unknown_config_field_is_ignored_with_a_warning(tmp_path: Path) -> None:
    model = build(adaptune, "llama", task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj"])
    expected = logits(model, "llama")
    model.save_pretrained(tmp_path)
    cfg = read_config(tmp_path)
    cfg["some_future_field"] = {"enabled": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="some_future_field"):
        loaded = adaptune.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path))
    assert_same(logits(loaded, "llama"), expected)


def test_pickle_adapter_needs_allow_pickle(tmp_path: Path) -> None:
    model = build(peft, "llama", task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    expected = logits(model, "llama")
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(AdapterFileError, match="allow_pickle=True") as info:
        adaptune.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path))
    assert "adapter_model.bin" in str(info.value)
    loaded = adaptune.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path), allow_pickle=True)
    assert_same(logits(loaded, "llama"), expected)


def test_wrong_tensor_shape_names_module_and_shapes(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    build(adaptune, "llama", task_type="CAUSAL_LM", r=4, lora_alpha=8,
          target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    assert tuple(tensors[key].shape) == (4, 32)
    tensors[key] = torch.zeros(5, 32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(AdapterFileError) as info:
        adaptune.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path))
    message = str(info.value)
    assert "model.layers.1.self_attn.v_proj" in message
    assert "(5, 32)" in message and "(4, 32)" in message


# ---- 16-bit base models ----------------------------------------------------------------------------
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_base_gets_fp32_adapters_and_peft_logits(use_dora: bool, tmp_path: Path) -> None:
    """peft keeps adapter weights in fp32 on an fp16/bf16 model (``autocast_adapter_dtype=True``), so
    that small updates are not rounded away, and adds their output in fp32 before rounding once."""
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                  use_dora=use_dora)
    ours = adaptune.get_peft_model(tiny_llama(seed=0).to(torch.bfloat16), adaptune.LoraConfig(**config))
    theirs = peft.get_peft_model(tiny_llama(seed=0).to(torch.bfloat16), peft.LoraConfig(**config))
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.save_pretrained(tmp_path)
    loaded = adaptune.PeftModel.from_pretrained(tiny_llama(seed=0).to(torch.bfloat16), str(tmp_path))
    assert all(p.dtype == torch.float32 for n, p in loaded.named_parameters() if "lora_" in n)
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, theirs(input_ids=ids).logits
        base = tiny_llama(seed=0).to(torch.bfloat16)(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    assert (want.float() - base.float()).abs().max() > MARGIN
    assert torch.equal(got, want)

    kept = adaptune.get_peft_model(tiny_llama(seed=0).to(torch.bfloat16), adaptune.LoraConfig(**config),
                                   autocast_adapter_dtype=False)
    assert all(p.dtype == torch.bfloat16 for p in kept.parameters() if p.requires_grad)


# ---- peft's helper functions and Auto classes --------------------------------------------------------
def test_peft_model_state_dict_functions_match_peft(tmp_path: Path) -> None:
    config = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ours = build(adaptune, "llama", **config)
    theirs = peft.get_peft_model(FACTORIES["llama"](seed=0), peft.LoraConfig(**config)).eval()
    peft.set_peft_model_state_dict(theirs, adaptune.get_peft_model_state_dict(ours))
    assert_same(logits(theirs, "llama"), logits(ours, "llama"))
    assert_adapted(logits(ours, "llama"), "llama")
    got = adaptune.get_peft_model_state_dict(ours)
    want = peft.get_peft_model_state_dict(theirs)
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)

    fresh = adaptune.get_peft_model(FACTORIES["llama"](seed=0), adaptune.LoraConfig(**config)).eval()
    adaptune.set_peft_model_state_dict(fresh, want)
    assert_same(logits(fresh, "llama"), logits(ours, "llama"))
    with pytest.raises(AdapterFileError):
        adaptune.set_peft_model_state_dict(fresh, {k: v for k, v in want.items() if "v_proj" not in k})


def test_auto_peft_model_loads_the_base_the_adapter_names(tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    FACTORIES["llama"](seed=0).save_pretrained(base_dir)
    model = adaptune.get_peft_model(transformers_auto(base_dir),
                                    adaptune.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
    perturb(model)
    model.eval().save_pretrained(tmp_path / "adapter")
    assert read_config(tmp_path / "adapter")["base_model_name_or_path"] == str(base_dir)

    loaded = adaptune.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(loaded, adaptune.PeftModel) and not loaded.training
    assert_same(logits(loaded, "llama"), logits(model, "llama"))
    assert_adapted(logits(loaded, "llama"), "llama")
    assert isinstance(adaptune.AutoPeftModel.from_pretrained(str(tmp_path / "adapter")), adaptune.PeftModelForCausalLM)
    with pytest.raises(adaptune.AdaptuneError, match="CAUSAL_LM adapter"):
        adaptune.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter"))


def transformers_auto(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def test_active_adapters_lists_every_active_adapter_as_peft() -> None:
    seen = {}
    for lib in (adaptune, peft):
        model = lib.get_peft_model(FACTORIES["llama"](seed=0), lib.LoraConfig(r=4, target_modules=["q_proj"]))
        model.add_adapter("b", lib.LoraConfig(r=4, target_modules=["q_proj"]))
        model.base_model.set_adapter(["default", "b"])
        both = list(model.active_adapters)
        model.delete_adapter("b")
        seen[lib.__name__] = (both, list(model.active_adapters), model.active_adapter)
    assert seen["adaptune"] == seen["peft"] == (["default", "b"], ["default"], "default")


def test_set_peft_model_state_dict_on_a_prompt_model_keeps_it_training() -> None:
    model = adaptune.get_peft_model(FACTORIES["llama"](seed=0),
                                    adaptune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    trainable = model.get_nb_trainable_parameters()
    assert trainable[0] > 0
    shifted = {k: v + 1 for k, v in adaptune.get_peft_model_state_dict(model).items()}
    adaptune.set_peft_model_state_dict(model, shifted)
    assert model.get_nb_trainable_parameters() == trainable
    for key, value in adaptune.get_peft_model_state_dict(model).items():
        torch.testing.assert_close(value, shifted[key], rtol=0, atol=0)
