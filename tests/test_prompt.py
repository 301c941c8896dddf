"""Prompt tuning, P-tuning and prefix tuning: peft's files both ways, generate, training, adapters.

peft 0.21.2 is the oracle for the forward pass and the files (a test-only dependency). Its
*generate* is not an oracle here: under transformers 5 it re-inserts the virtual tokens at every
decoding step (decoder-only prompt tuning / P-tuning) and drops the prefix cache (prefix tuning),
so adaptune's generate is checked against step-by-step decoding with the full forward pass
instead (whose logits are checked against peft), and against peft where peft is right (T5
prompt tuning). Prompts are randomly initialised (N(0, 1) rows), so a no-op cannot pass: every
comparison also checks the adapted output is clearly away from the base output.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2ForSequenceClassification

import adaptune
from adaptune import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
    get_peft_model_state_dict,
)
from adaptune.errors import AdapterFileError, ConfigError
from tests.tiny import make_tokenizer, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5

peft = pytest.importorskip("peft")

ATOL = 1e-5
MARGIN = 1e-2
NVT = 3

ARCHS = {"gpt2": (tiny_gpt2, "CAUSAL_LM"), "llama": (tiny_llama, "CAUSAL_LM"), "t5": (tiny_t5, "SEQ_2_SEQ_LM")}
METHODS = {
    "prompt": ("PromptTuningConfig", {}),
    "ptuning_mlp": ("PromptEncoderConfig", {}),
    "ptuning_lstm": ("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM"}),
    "prefix": ("PrefixTuningConfig", {}),
    "prefix_proj": ("PrefixTuningConfig", {"prefix_projection": True}),
}
FILLED = ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules", "encoder_hidden_size")



def config(lib, method: str, task: str, **extra):
    cls_name, kw = METHODS[method]
    return getattr(lib, cls_name)(task_type=task, num_virtual_tokens=NVT, **kw, **extra)


def tiny_gpt2_cls(seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=160, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=3)
    return GPT2ForSequenceClassification(cfg).eval()


def batch(arch: str) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])  # left-padded (decoder-only)
    if arch == "t5":  # right-padded (encoder)
        ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    out = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    if arch == "t5":
        out["decoder_input_ids"] = torch.tensor([[0, 4, 5, 6], [0, 7, 8, 9]])
    return out


@torch.no_grad()
def logits(model, arch: str, strip_virtual: bool = False) -> torch.Tensor:
    out = model(**batch(arch)).logits
    return out[:, NVT:] if strip_virtual else out


def adapted_away_from_base(model, arch: str, method: str) -> bool:
    make = ARCHS[arch][0] if arch in ARCHS else None
    strip = arch != "t5" and method.startswith(("prompt", "ptuning"))
    return (logits(model, arch, strip) - logits(make(), arch)).abs().max() > MARGIN


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ---- peft's files, both ways ---------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_files_move_both_ways_with_peft(arch, method, tmp_path):
    make, task = ARCHS[arch]
    # peft -> adaptune
    torch.manual_seed(1)
    theirs = quiet(peft.get_peft_model, make(), config(peft, method, task)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = PeftModel.from_pretrained(make(), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, arch), logits(theirs, arch), atol=ATOL, rtol=0)
    assert adapted_away_from_base(ours, arch, method)
    assert not any(p.requires_grad for p in ours.parameters())
    # re-saved by adaptune: the same tensor, bit for bit, and the same filled-in config
    ours.save_pretrained(tmp_path / "resaved")
    a, b = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(
        tmp_path / "resaved" / "adapter_model.safetensors")
    assert list(a) == list(b) == ["prompt_embeddings"]
    assert torch.equal(a["prompt_embeddings"], b["prompt_embeddings"])
    # adaptune -> peft, on an adapter made and filled in by adaptune
    torch.manual_seed(2)
    mine = quiet(get_peft_model, make(), config(adaptune, method, task)).eval()
    mine.save_pretrained(tmp_path / "mine")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = peft.PeftModel.from_pretrained(make(), tmp_path / "mine")
    assert not [w for w in caught if "config" in str(w.message).lower()], [str(w.message) for w in caught]
    torch.testing.assert_close(logits(back, arch), logits(mine, arch), atol=ATOL, rtol=0)
    assert adapted_away_from_base(mine, arch, method)
    saved = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    peft_saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for field in FILLED:
        assert saved.get(field) == peft_saved.get(field), field
    assert load_file(tmp_path / "mine" / "adapter_model.safetensors")["prompt_embeddings"].shape == \
        a["prompt_embeddings"].shape


def test_prefix_shapes_follow_grouped_query_attention():
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT))
    cfg = model.peft_config["default"]
    assert (cfg.token_dim, cfg.num_attention_heads, cfg.num_layers) == (16, 2, 2)  # 2 kv heads x head_dim 8
    assert get_peft_model_state_dict(model)["prompt_embeddings"].shape == (NVT, 2 * 2 * 16)
    t5 = get_peft_model(tiny_t5(), PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=NVT))
    assert get_peft_model_state_dict(t5)["prompt_embeddings"].shape == (2 * NVT, 32)


@pytest.mark.parametrize("make", [tiny_bert_cls, tiny_gpt2_cls], ids=["bert", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp"])
def test_seq_cls_heads_are_saved_and_load_both_ways(make, method, tmp_path):
    torch.manual_seed(1)
    theirs = quiet(peft.get_peft_model, make(), config(peft, method, "SEQ_CLS")).eval()
    head = "classifier" if make is tiny_bert_cls else "score"
    with torch.no_grad():  # a trained head, not a copy of the base one
        for p in theirs.base_model.get_submodule(head).modules_to_save["default"].parameters():
            p.add_(0.5)
    quiet(theirs.save_pretrained, tmp_path / "peft")
    ours = PeftModel.from_pretrained(make(), tmp_path / "peft")
    x = batch("gpt2")
    with torch.no_grad():
        expected, got, base = theirs(**x).logits, ours(**x).logits, make()(**x).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > MARGIN
    quiet(ours.save_pretrained, tmp_path / "ours")
    a = load_file(tmp_path / "peft/adapter_model.safetensors")
    b = load_file(tmp_path / "ours/adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(**x).logits, got, atol=ATOL, rtol=0)


def test_seq_cls_prefix_tuning_works_where_peft_refuses(tmp_path):
    """peft 0.21.2 + transformers 5 raise "Model does not support past key values"; adaptune passes the
    prefix as the cache, which BERT's self-attention uses."""
    torch.manual_seed(1)
    model = get_peft_model(tiny_bert_cls(), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=NVT)).eval()
    x = batch("gpt2")
    with torch.no_grad():
        out, base = model(**x).logits, tiny_bert_cls()(**x).logits
    assert (out - base).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(tiny_bert_cls(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**x).logits, out, atol=ATOL, rtol=0)
    theirs = quiet(peft.PeftModel.from_pretrained, tiny_bert_cls(), tmp_path)  # peft reads the file...
    assert torch.equal(theirs.prompt_encoder["default"].embedding.weight,
                       again.prompt_encoder["default"].embedding.weight)


def test_text_init_takes_the_word_embeddings_of_the_text_like_peft(tmp_path):
    make_tokenizer().save_pretrained(tmp_path / "tok")
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
              prompt_tuning_init_text="the king said", tokenizer_name_or_path=str(tmp_path / "tok"))
    ours = get_peft_model(tiny_gpt2(), PromptTuningConfig(**kw))
    theirs = quiet(peft.get_peft_model, tiny_gpt2(), peft.PromptTuningConfig(**kw))
    rows = ours.prompt_encoder["default"].embedding.weight
    assert torch.equal(rows, theirs.prompt_encoder["default"].embedding.weight)
    ids = make_tokenizer()("the king said")["input_ids"]
    wte = tiny_gpt2().transformer.wte.weight
    assert torch.equal(rows, wte[(ids * 3)[:7]])


# ---- generate ------------------------------------------------------------------------------
def _row_logits(model, ids: list[int], decoder_ids: list[int] | None = None) -> torch.Tensor:
    """Next-token logits by the full forward pass on one unpadded row (no cache)."""
    with torch.no_grad():
        if decoder_ids is None:
            return model(input_ids=torch.tensor([ids])).logits[0, -1]
        return model(input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([decoder_ids])).logits[0, -1]


def _reference_beams(model, ids: list[int], steps: int, beams: int = 2, seq2seq: bool = False,
                     banned: tuple[int, ...] = ()) -> list[int]:
    """Beam search by the full forward pass (no EOS reached, so the best beam is the best score)."""
    live = [(0.0, [0] if seq2seq else list(ids))]
    for _ in range(steps):
        cands = []
        for score, seq in live:
            lg = _row_logits(model, ids, seq) if seq2seq else _row_logits(model, seq)
            logp = torch.log_softmax(lg, -1)
            logp[list(banned)] = float("-inf")  # transformers suppresses after the log-softmax
            top = logp.topk(beams)
            cands += [(score + v.item(), seq + [i.item()]) for v, i in zip(top.values, top.indices)]
        live = sorted(cands, key=lambda c: -c[0])[:beams]
    return live[0][1]


@pytest.mark.parametrize("method", ["prompt", "ptuning_lstm", "prefix"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_left_padded_greedy_and_beam_match_full_forward_decoding(arch, method):
    make, task = ARCHS[arch]
    torch.manual_seed(5)
    model = quiet(get_peft_model, make(), config(adaptune, method, task)).eval()
    x = batch(arch)
    rows = [[t for t in row if t != 0] for row in x["input_ids"].tolist()]  # row 0 is left-padded
    steps = 4
    out = model.generate(**x, max_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape == (2, x["input_ids"].shape[1] + steps)
    assert torch.equal(out.sequences[:, :6], x["input_ids"])
    for r, ids in enumerate(rows):
        seq = list(ids)
        for step in range(steps):
            expected = _row_logits(model, seq)
            torch.testing.assert_close(out.logits[step][r], expected, atol=1e-4, rtol=0)
            seq.append(int(out.sequences[r, 6 + step]))
            assert seq[-1] == int(expected.argmax())
    with model.disable_adapter():
        plain = model.generate(**x, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    assert torch.equal(plain, make().generate(**x, max_new_tokens=steps, do_sample=False, pad_token_id=0))
    assert not torch.equal(plain, out.sequences)
    beams = model.generate(**x, max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    for r, ids in enumerate(rows):
        assert beams[r, 6:].tolist() == _reference_beams(model, ids, 3)[len(ids):]
    # max_length counts the user's tokens only, as without an adapter
    assert model.generate(**x, max_length=8, do_sample=False, pad_token_id=0).shape == (2, 8)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_t5_generate_greedy_and_beam(method):
    torch.manual_seed(5)
    model = quiet(get_peft_model, tiny_t5(), config(adaptune, method, "SEQ_2_SEQ_LM")).eval()
    x = {k: v for k, v in batch("t5").items() if k != "decoder_input_ids"}
    banned = (0, 1)  # the tiny random T5 otherwise emits pad forever
    out = model.generate(**x, max_new_tokens=4, suppress_tokens=list(banned), output_logits=True,
                         return_dict_in_generate=True)
    rows = [[t for t in row if t != 0] for row in x["input_ids"].tolist()]
    for r, ids in enumerate(rows):
        dec = [0]
        for step in range(4):
            expected = _row_logits(model, ids, dec)
            torch.testing.assert_close(out.logits[step][r], expected, atol=1e-4, rtol=0)
            dec.append(int(out.sequences[r, step + 1]))
    beams = model.generate(**x, max_new_tokens=3, num_beams=2, suppress_tokens=list(banned))
    for r, ids in enumerate(rows):
        assert beams[r].tolist() == _reference_beams(model, ids, 3, seq2seq=True, banned=banned)
    with model.disable_adapter():
        plain = model.generate(**x, max_new_tokens=4, suppress_tokens=list(banned), output_logits=True,
                               return_dict_in_generate=True)
    assert (plain.logits[0] - out.logits[0]).abs().max() > MARGIN
    if method == "prompt":  # peft's seq2seq prompt-tuning generate is right: the same tokens
        theirs = quiet(peft.get_peft_model, tiny_t5(), config(peft, method, "SEQ_2_SEQ_LM")).eval()
        with torch.no_grad():
            theirs.prompt_encoder["default"].embedding.weight.copy_(model.prompt_encoder["default"].embedding.weight)
        assert torch.equal(theirs.generate(**x, max_new_tokens=4, suppress_tokens=list(banned)), out.sequences)


# ---- training, disabling, several adapters -------------------------------------------------
@pytest.mark.parametrize("method", ["prompt", "ptuning_mlp", "prefix_proj"])
def test_training_step_changes_only_the_prompt_encoder(method):
    model = quiet(get_peft_model, tiny_gpt2(), config(adaptune, method, "CAUSAL_LM"))
    theirs = quiet(peft.get_peft_model, tiny_gpt2(), config(peft, method, "CAUSAL_LM"))
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prompt_encoder.default.") for n in trainable), trainable
    assert "prompt_encoder.default.embedding.weight" in trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = batch("gpt2")
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    model.train()
    out = model(**x, labels=labels)
    if method != "prefix_proj":  # the virtual positions carry label -100: only real tokens are predicted
        assert out.logits.shape[1] == NVT + 6
        full = torch.cat((torch.full((2, NVT), -100), labels), dim=1)
        lg = out.logits[:, :-1]
        ref = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), full[:, 1:].reshape(-1))
        torch.testing.assert_close(out.loss, ref)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).zero_grad()
    out.loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable, changed - trainable


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_position_and_token_type_ids_are_shifted_past_the_virtual_tokens(method):
    """peft drops position_ids for prompt tuning (with a warning); adaptune puts the virtual tokens at
    0..n-1 and shifts the real ones, so explicit default positions change nothing."""
    model = get_peft_model(tiny_gpt2(), config(adaptune, method, "CAUSAL_LM")).eval()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids, position_ids=torch.arange(4).expand(2, 4)).logits, plain)
    bert = get_peft_model(tiny_bert_cls(), config(adaptune, method, "SEQ_CLS")).eval()  # zeros = BERT's default
    with torch.no_grad():
        torch.testing.assert_close(bert(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits,
                                   bert(input_ids=ids).logits)


def test_disable_adapter_gives_base_output_and_heads():
    torch.manual_seed(1)
    model = get_peft_model(tiny_gpt2_cls(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=NVT))
    with torch.no_grad():
        model.base_model.score.modules_to_save["default"].weight.add_(1.0)
    x = batch("gpt2")
    base = tiny_gpt2_cls()
    with torch.no_grad():
        assert (model(**x).logits - base(**x).logits).abs().max() > MARGIN
        with model.disable_adapter():
            torch.testing.assert_close(model(**x).logits, base(**x).logits, atol=0, rtol=0)
        assert (model(**x).logits - base(**x).logits).abs().max() > MARGIN
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.default.embedding.weight", "base_model.score.modules_to_save.default.weight"}
    model.add_adapter("other", PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    model.set_adapter("other")  # its own head copy, fresh from the base head
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.score.modules_to_save.other.weight" in trainable
    assert not any(".default." in n for n in trainable)
    assert torch.equal(model.base_model.score.modules_to_save["other"].weight, base.score.weight)


def test_two_named_adapters_set_adapter_save_and_load(tmp_path):
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT))
    model.add_adapter("pre", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.eval()
    assert model.active_adapter == "default"  # add_adapter does not activate
    first = logits(model, "llama")
    model.set_adapter("pre")
    second = logits(model, "llama")
    assert second.shape[1] == 6 and first.shape[1] == NVT + 6
    assert (second - logits(tiny_llama(), "llama")).abs().max() > MARGIN
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prompt_encoder.pre.embedding.weight"}
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "pre" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "pre", adapter_name="pre")
    torch.testing.assert_close(logits(loaded, "llama"), first, atol=ATOL, rtol=0)
    loaded.set_adapter("pre")
    torch.testing.assert_close(logits(loaded, "llama"), second, atol=ATOL, rtol=0)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "pre")  # peft reads the sub-folder
    torch.testing.assert_close(logits(theirs, "llama"), second, atol=ATOL, rtol=0)
    model.delete_adapter("pre")
    assert model.active_adapter == "default" and list(model.prompt_encoder) == ["default"]
    torch.testing.assert_close(logits(model, "llama"), first, atol=0, rtol=0)
    with pytest.raises(ConfigError):
        model.delete_adapter("default")


def test_loaded_p_tuning_reproduces_the_saved_rows_and_can_train_on(tmp_path):
    torch.manual_seed(1)
    model = get_peft_model(tiny_gpt2(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT)).eval()
    with torch.no_grad():
        rows = model._prompt.prompt_output()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert torch.equal(loaded.prompt_encoder["default"].embedding.weight, rows)
    assert loaded.peft_config["default"].inference_mode is True
    with pytest.warns(UserWarning, match="output"):
        trainable = PeftModel.from_pretrained(tiny_gpt2(), tmp_path, is_trainable=True)
    trains = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert trains == ["prompt_encoder.default.embedding.weight"]
    torch.testing.assert_close(logits(trainable.eval(), "gpt2"), logits(model, "gpt2"), atol=ATOL, rtol=0)


def test_bad_files_and_settings_say_what_is_wrong(tmp_path):
    model = get_peft_model(tiny_gpt2(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT))
    model.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="token_dim=32"):
        PeftModel.from_pretrained(tiny_llama(hidden_size=48, num_attention_heads=4), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    from safetensors.torch import save_file
    save_file({"prompt_embeddings": torch.zeros(NVT + 1, 32)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match="shape"):
        PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    with pytest.raises(ConfigError, match="task_type"):
        get_peft_model(tiny_gpt2(), PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=NVT))
    model = get_peft_model(tiny_gpt2(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=NVT))
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        model(**batch("gpt2"))
