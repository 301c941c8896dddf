"""adaptune.int8_embedding: int8 rows for the frozen embedding and its tied head, under LoRA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptune import LoraConfig, get_peft_model
from adaptune.errors import ConfigError
from adaptune.quant.bnb import weight_bytes
from adaptune.quant.int8_embedding import (
    Int8Embedding,
    Int8Head,
    dequantize_embeddings,
    quantize_embeddings,
    quantize_rows,
)
from adaptune.speedups.loss import causal_lm_loss
from tests.tiny import nonzero_lora_b, tiny_llama

IDS = torch.tensor([[5, 9, 17, 33, 41, 7, 8, 60], [3, 11, 12, 50, 70, 90, 4, 6]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_rows_round_trip_within_half_a_step_and_zero_rows_stay_zero():
    w = torch.randn(10, 16)
    w[3] = 0
    rows, scale = quantize_rows(w)
    assert rows.dtype == torch.int8 and scale.shape == (10,)
    back = rows.float() * scale[:, None]
    assert torch.all((back - w).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.equal(back[3], torch.zeros(16))
    assert torch.equal(rows.abs().amax(dim=1)[[0, 1, 2]], torch.full((3,), 127, dtype=torch.int8))


def test_tied_table_is_shared_smaller_and_close():
    model = tiny_llama(tie_word_embeddings=True)
    before, ref = weight_bytes(model), _logits(model)
    vocab, dim = model.get_input_embeddings().weight.shape
    assert quantize_embeddings(model) == 1
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(emb, Int8Embedding) and isinstance(head, Int8Head) and head.table is emb
    assert before - weight_bytes(model) == vocab * dim * 3 - vocab * 4  # fp32 -> int8, plus row scales
    got = _logits(model)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    assert not torch.equal(got, ref)


def test_untied_head_gets_its_own_table():
    model = tiny_llama(tie_word_embeddings=False)
    assert quantize_embeddings(model) == 2
    assert model.get_output_embeddings().table is not model.get_input_embeddings()


def test_dequantize_restores_tied_float_modules_with_the_int8_values():
    model = tiny_llama(tie_word_embeddings=True)
    quantize_embeddings(model)
    quantized = _logits(model)
    assert dequantize_embeddings(model)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(emb) is nn.Embedding and type(head) is nn.Linear and head.weight is emb.weight
    torch.testing.assert_close(_logits(model), quantized)
    assert not dequantize_embeddings(model)


def test_lora_trains_on_top_and_merges_to_a_plain_model():
    torch.manual_seed(0)
    model = tiny_llama(tie_word_embeddings=True)
    quantize_embeddings(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert not any("lm_head" in n for n, _ in peft_model.named_modules() if "lora_A" in n)
    inputs = {"input_ids": IDS, "labels": IDS.clone()}
    chunked, _ = causal_lm_loss(peft_model, inputs, None)
    torch.testing.assert_close(chunked, peft_model(**inputs).loss)
    frozen = {n: t.clone() for n, t in peft_model.named_buffers()}
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    chunked.backward()
    opt.step()
    assert all(torch.equal(t, frozen[n]) for n, t in peft_model.named_buffers())
    nonzero_lora_b(peft_model, std=0.1)
    adapted = _logits(peft_model)
    merged = peft_model.merge_and_unload()
    assert type(merged.get_input_embeddings()) is nn.Embedding
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    torch.testing.assert_close(_logits(merged), adapted, rtol=1e-4, atol=1e-5)


def test_refuses_an_adapter_model_and_methods_that_use_the_table():
    from adaptune.training.job import TrainJob

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="before get_peft_model"):
        quantize_embeddings(peft_model)
    with pytest.raises(ConfigError, match="quantize-embeddings"):
        TrainJob(method="prompt-tuning", quantize_embeddings=True)
    assert TrainJob(method="qlora", quantize_embeddings=True).quantize_embeddings


def test_cli_trains_with_quantized_embeddings(model_dir, tmp_path):
    from adaptune.cli import main
    from tests.tiny import write_words_file

    data = write_words_file(tmp_path / "words.txt", 60)
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out),
                 "--max-steps", "2", "--max-length", "32", "--batch-size", "4", "--eval-every", "0",
                 "--quantize-embeddings"]) == 0
    assert (out / "adapter_model.safetensors").exists()


def test_head_gradient_equals_the_float_table_and_keeps_no_float_copy():
    import torch.nn.functional as F

    from adaptune.quant import int8_embedding

    table = Int8Embedding(torch.randn(50, 12))
    head = Int8Head(table, bias=torch.randn(50))
    hidden = torch.randn(3, 4, 12, requires_grad=True)
    weights = torch.linspace(-1, 1, 3 * 4 * 50).reshape(3, 4, 50)
    old_block, int8_embedding.HEAD_BLOCK_ROWS = int8_embedding.HEAD_BLOCK_ROWS, 16  # several blocks
    try:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = head(hidden)
        (grad,) = torch.autograd.grad((out * weights).sum(), hidden)
    finally:
        int8_embedding.HEAD_BLOCK_ROWS = old_block
    ref_hidden = hidden.detach().clone().requires_grad_()
    ref = F.linear(ref_hidden, table.dequantized(), head.bias)
    (ref_grad,) = torch.autograd.grad((ref * weights).sum(), ref_hidden)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)
    assert all(t.dtype != torch.float32 or t.numel() <= 50 for t in saved)  # int8 rows + scales only
