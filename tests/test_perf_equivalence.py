"""The speed/memory switches leave results unchanged: losses and gradients equal the plain path.

- chunked loss (adaptune.loss; ``TrainingArguments(chunked_loss=True)``): head + cross-entropy only
  at labelled positions, in chunks, vs transformers' own ``ForCausalLMLoss`` on full logits;
- micro-batches (``micro_batch_tokens``): one batch run as several forward/backward passes;
- packing: a packed block trains exactly as its examples do one by one (``use_cache=False`` holds
  under the Trainer, which the packed mask needs);
- no gradient work below the lowest adapted layer; no input grads forced without checkpointing;
- the LoRA forward (fused add) equals ``base(x) + scaling * B(A(dropout(x)))``;
- ``compile_layers`` with packed attention trains as the plain path (about a minute: it compiles).

Tiny random models only, on one thread.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptune import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
from adaptune.data import DataCollator, Example, pack_examples
from adaptune.speedups.dropout import dropout_mask
from adaptune.speedups.loss import causal_lm_loss, linear_cross_entropy, supports_chunked_loss
from adaptune.training.arguments import TrainingArguments
from adaptune.training.trainer import Trainer
from tests.tiny import VOCAB, tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5

quiet = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lora_llama(seed: int = 0, dropout: float = 0.0, **overrides):
    base = tiny_llama(seed=seed, **overrides)
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=dropout,
                     init_lora_weights=False, task_type=TaskType.CAUSAL_LM)
    return get_peft_model(base, cfg)


def lora_gpt2(seed: int = 0):
    base = tiny_gpt2(seed=seed)
    torch.manual_seed(seed + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_attn", "v_attn"],
                                               init_lora_weights=False, task_type=TaskType.CAUSAL_LM))


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def assert_close_dicts(a: dict, b: dict, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def padded_batch(seed: int = 0, rows: int = 3, width: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :4] = -100  # a prompt without loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    examples = [Example(t, t) for t in (torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 7, 3, 9, 4))]
    blocks = pack_examples(examples, 16)
    return DataCollator(0, packing=True)(blocks), examples


# ---- the head + loss kernel ---------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_linear_cross_entropy_equals_full_logits(bias, chunk):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).requires_grad_(False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    ref = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref * 0.37, hidden)
    got = linear_cross_entropy(hidden, head, targets, chunk_rows=chunk)
    (g_got,) = torch.autograd.grad(got * 0.37, hidden)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, head, targets, chunk), ref.detach())


def test_linear_cross_entropy_under_autocast_is_the_autocast_head_without_running_it():
    """Under bf16 autocast the fused path runs both products in bf16, as ``F.linear`` would, and
    the softmax in fp32; it does not fall back to running the head module chunk by chunk."""
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    calls = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
        (g_ref,) = torch.autograd.grad(ref, hidden)
        head.register_forward_hook(lambda *a: calls.append(1))
        got = linear_cross_entropy(hidden, head, targets, chunk_rows=5)
        (g_got,) = torch.autograd.grad(got, hidden)
    assert not calls and got.dtype == torch.float32 and g_got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)  # the same bf16 logits, the same fp32 loss
    torch.testing.assert_close(g_got, g_ref, rtol=2e-2, atol=2e-3)  # bf16 rounding of the gradient's product
    # and it differs from the fp32 loss by bf16 rounding: the products really ran in bf16
    assert not torch.allclose(got, F.cross_entropy(head(hidden), targets, reduction="sum"), rtol=1e-6, atol=0)


def test_linear_cross_entropy_trainable_or_wrapped_head_uses_checkpointed_chunks():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(16, 50))  # not a bare Linear, and trainable
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    ref = F.cross_entropy(head(hidden), targets, reduction="sum")
    ref_grads = torch.autograd.grad(ref, [hidden, *head.parameters()])
    got = linear_cross_entropy(hidden, head, targets, chunk_rows=4)
    got_grads = torch.autograd.grad(got, [hidden, *head.parameters()])
    torch.testing.assert_close(got, ref)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_labels_gives_nan_like_transformers_and_a_zero_gradient():
    model = lora_llama()
    batch = padded_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    ref = model(**batch).loss
    got, count = causal_lm_loss(model, batch)
    assert count == 0 and torch.isnan(ref) and torch.isnan(got)
    got, _ = causal_lm_loss(model, batch, num_items_in_batch=torch.tensor(5))
    got.backward()
    assert float(got.detach()) == 0.0 and all(float(g.abs().sum()) == 0 for g in grads(model).values())


# ---- the model loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lora_llama, lora_gpt2, lambda: lora_llama(tie_word_embeddings=True)],
                         ids=["llama", "gpt2-q/v-slices", "llama-tied"])
@pytest.mark.parametrize("num_items", [None, 17])
@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_causal_lm_loss_equals_model_loss_and_gradients(make, num_items, kind):
    model = make()
    model.train()
    assert supports_chunked_loss(model)
    batch = padded_batch() if kind == "padded" else packed_batch()[0]
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref = model(**batch, use_cache=False, **kw).loss
    ref.backward()
    ref_grads = grads(model)
    model.zero_grad()
    got, _ = causal_lm_loss(model, batch, num_items_in_batch=kw.get("num_items_in_batch"), chunk_rows=4)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert_close_dicts(grads(model), ref_grads)


def test_models_that_do_not_split_cleanly_fall_back():
    assert not supports_chunked_loss(tiny_bert_cls())
    assert not supports_chunked_loss(tiny_t5())
    prompt = get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=3, task_type=TaskType.CAUSAL_LM))
    assert not supports_chunked_loss(prompt)
    # Logits that are not head(body(x)) (here: scaled after the head) fail the numeric probe.
    odd = tiny_llama()
    plain_forward = type(odd).forward

    def scaled_forward(self, *args, **kwargs):
        out = plain_forward(self, *args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    odd.forward = scaled_forward.__get__(odd)
    assert not supports_chunked_loss(odd)
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, final_logit_softcapping=30.0))
    assert not supports_chunked_loss(gemma)


# ---- the Trainer ----------------------------------------------------------------------------------


def rows_dataset(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 15, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        labels = list(ids)
        labels[: i % 3] = [-100] * (i % 3)  # some rows with a prompt
        out.append({"input_ids": ids, "labels": labels})
    return out


def train_lora(tmp_path, name: str, packing: bool = False, grad_accum: int = 1, prepare=None, callbacks=(), **args):
    """Three Trainer steps of the tiny LoRA Llama; ``prepare(model)`` runs before training."""
    model = lora_llama(seed=0, tie_word_embeddings=True)
    if prepare is not None:
        prepare(model)
    data = rows_dataset()
    if packing:
        data = pack_examples([Example(r["input_ids"], r["labels"]) for r in data], 24)
    targs = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=3,
                              learning_rate=5e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                              gradient_accumulation_steps=grad_accum, seed=0, data_seed=0, use_cpu=True,
                              disable_tqdm=True, dataloader_num_workers=0, **args)
    trainer = Trainer(model=model, args=targs, train_dataset=data, eval_dataset=data[:5],
                      data_collator=DataCollator(0, packing=packing))
    trainer.remove_callback(trainer.divergence_guard)
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    weights = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
    return trainer, losses, weights


@quiet
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_trainer_chunked_loss_and_micro_batches_train_exactly_as_plain(tmp_path, packing, monkeypatch):
    import adaptune.speedups.loss as loss_module

    rows_seen = []
    real = loss_module.causal_lm_loss
    def counted(model, inputs, *a, **k):
        rows_seen.append(len(inputs["input_ids"]))
        return real(model, inputs, *a, **k)

    monkeypatch.setattr(loss_module, "causal_lm_loss", counted)
    _, ref_losses, ref_w = train_lora(tmp_path, "plain", packing, chunked_loss=False, fused_mlp_activation=False,
                                      fused_rms_norm=False, packed_attention=False)
    assert rows_seen == []
    chunk_trainer, losses, w = train_lora(tmp_path, "chunked", packing, loss_chunk_rows=5)
    assert len(rows_seen) == 3 and max(rows_seen) > 1
    rows_seen.clear()
    _, micro_losses, micro_w = train_lora(tmp_path, "micro", packing, micro_batch_tokens=30)
    assert len(rows_seen) > 3 and max(rows_seen) < 4  # each batch in pieces
    _, ga_losses, ga_w = train_lora(tmp_path, "ga", packing, grad_accum=2, micro_batch_tokens=1)
    assert len(ref_losses) == 3
    for other in (losses, micro_losses):
        assert other == pytest.approx(ref_losses, rel=1e-5)
    assert_close_dicts(w, ref_w, rtol=1e-4, atol=1e-6)
    assert_close_dicts(micro_w, ref_w, rtol=1e-4, atol=1e-6)
    # with gradient accumulation the loss is normalised over the accumulated batch, as transformers does
    _, ga_ref_losses, ga_ref_w = train_lora(tmp_path, "ga-plain", packing, grad_accum=2, chunked_loss=False)
    assert ga_losses == pytest.approx(ga_ref_losses, rel=1e-5)
    assert_close_dicts(ga_w, ga_ref_w, rtol=1e-4, atol=1e-6)
    # evaluation without compute_metrics takes the chunked path too, with the same loss
    chunked_eval = chunk_trainer.evaluate()["eval_loss"]
    chunk_trainer.args.chunked_loss = False
    assert chunked_eval == pytest.approx(chunk_trainer.evaluate()["eval_loss"], rel=1e-5)


@quiet
def test_trainer_bf16_autocast_reaches_the_chunked_path(tmp_path):
    """accelerate applies bf16 autocast by wrapping model.forward; the chunked loss goes around it
    (body, then head), so the Trainer enters autocast itself: the layers must run in bf16, and
    train as the plain bf16 path does."""
    seen = []

    def record(model):
        layer = model.get_base_model().model.layers[0].mlp.down_proj
        layer.register_forward_hook(lambda mod, args, out: seen.append(out.dtype) if mod.training else None)

    runs = {}
    for chunked in (False, True):
        seen.clear()
        _, runs[chunked], _ = train_lora(tmp_path, f"bf16-{chunked}", prepare=record, bf16=True, chunked_loss=chunked)
        assert seen and set(seen) == {torch.bfloat16}, (chunked, seen)
    assert len(runs[True]) == 3 and runs[True] == pytest.approx(runs[False], rel=2e-2)


@quiet
def test_trainer_falls_back_with_label_smoothing(tmp_path, monkeypatch):
    import adaptune.speedups.loss as loss_module

    called = []
    monkeypatch.setattr(loss_module, "causal_lm_loss", lambda *a, **k: called.append(1))
    train_lora(tmp_path, "smooth", label_smoothing_factor=0.1)
    assert not called


@quiet
def test_packed_block_trains_as_its_examples_under_the_trainer(tmp_path):
    """The packed mask needs use_cache=False: the Trainer sets it, and the packed loss is then the
    loss of the examples run one by one."""
    model = lora_llama(tie_word_embeddings=True)
    model.get_base_model().config.use_cache = True
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, save_strategy="no"))
    assert model.get_base_model().config.use_cache is False
    batch, examples = packed_batch()
    model.eval()
    with torch.no_grad():
        packed, n = causal_lm_loss(model, batch)
        total = sum(float(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss)
                    * (len(e) - 1) for e in examples)
    assert n == sum(len(e) - 1 for e in examples)
    assert float(packed) == pytest.approx(total / n, rel=1e-5)


def test_batch_packing_collator_gives_the_padded_batch_loss_and_gradients():
    from adaptune.data.batch_packing import BatchPackingCollator

    rows = rows_dataset(6)
    padded = DataCollator(0, packing=False)(rows)
    packed = BatchPackingCollator(0, max_length=20)(rows)
    assert "attention_mask" not in packed and packed["input_ids"].numel() <= padded["input_ids"].numel()
    short = [{"input_ids": [5] * n, "labels": [5] * n} for n in (3, 9, 4, 2, 8, 5)]
    assert BatchPackingCollator(0, 20)(short)["input_ids"].numel() < DataCollator(0, False)(short)["input_ids"].numel()
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())
    model = lora_llama()
    model.train()
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    assert_close_dicts(results[1][1], results[0][1])
    with pytest.raises(ValueError, match="already packed"):
        BatchPackingCollator(0, 20)(pack_examples([Example([5, 6], [5, 6])], 20))


# ---- gradient work and the LoRA forward ---------------------------------------------------------------


def test_no_grad_below_the_lowest_adapted_layer_and_no_forced_input_grads():
    base = tiny_llama(num_hidden_layers=3)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            layers_to_transform=[1, 2], task_type=TaskType.CAUSAL_LM))
    model.train()
    seen = {}
    hooks = [base.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.__setitem__("embed", o.requires_grad)),
             base.model.layers[0].register_forward_hook(
                 lambda m, i, o: seen.__setitem__("layer0", (o[0] if isinstance(o, tuple) else o).requires_grad)),
             base.model.layers[1].register_forward_hook(
                 lambda m, i, o: seen.__setitem__("layer1", (o[0] if isinstance(o, tuple) else o).requires_grad))]
    loss, _ = causal_lm_loss(model, padded_batch())
    loss.backward()
    for h in hooks:
        h.remove()
    assert seen == {"embed": False, "layer0": False, "layer1": True}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_forward_is_base_plus_scaled_delta(dropout):
    model = lora_llama(dropout=dropout)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 32, requires_grad=True)
    for training in (False, True):
        layer.train(training)
        torch.manual_seed(3)
        got = layer(x)
        torch.manual_seed(3)  # training: the same keep-mask adaptune.speedups.dropout draws
        xd = x * dropout_mask(x, dropout) / (1 - dropout) if training and dropout else x
        ref = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](xd)) * layer.scaling("default")
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        wrt = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        g_got = torch.autograd.grad(got.square().sum(), wrt)
        g_ref = torch.autograd.grad(ref.square().sum(), wrt)
        for a, b in zip(g_got, g_ref):  # fp32 sums in another order (dropout's scale on the r-wide side)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@quiet
def test_compiled_layers_with_packed_attention_train_exactly_as_plain(tmp_path):
    """compile_layers traces adaptune.speedups.attention too: packed rows still attend example by example."""
    _, ref_losses, ref_w = train_lora(tmp_path, "plain", True, chunked_loss=False, fused_mlp_activation=False,
                                      fused_rms_norm=False, packed_attention=False)
    trainer, losses, w = train_lora(tmp_path, "compiled", True, compile_layers=True)
    assert trainer.speedups_applied["compile_layers"] == trainer.model.config.num_hidden_layers
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_close_dicts(w, ref_w, rtol=1e-4, atol=1e-5)
