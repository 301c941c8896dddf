"""adaptune.attention: packed rows attend one example at a time, with the same numbers as
transformers' sdpa with its block-diagonal mask, and as the examples run alone."""

from __future__ import annotations

import contextlib

import torch

from adaptune import LoraConfig, get_peft_model
from adaptune.speedups.attention import PACKED_SDPA, packed_attention, segments
from tests.tiny import nonzero_lora_b, tiny_gpt2, tiny_llama


def _packed(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    pieces = [torch.randint(3, 100, (n,), generator=g) for n in lengths]
    ids = torch.cat(pieces)[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return pieces, ids, pos


def _lora_qkv_model():
    """A tiny Llama in training mode with LoRA on q/k/v, B non-zero so the adapters matter."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    nonzero_lora_b(model).train()
    model.config.use_cache = False  # as under the Trainer (a cache turns transformers' packed mask off)
    return model


def _graph_nodes(out: torch.Tensor) -> set[str]:
    """The kinds of autograd nodes behind ``out``."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo += [nxt for nxt, _ in fn.next_functions]
    return {type(fn).__name__ for fn in seen}


def test_segments_start_wherever_positions_do_not_follow():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert segments(pos) == [[(0, 3), (3, 5), (5, 8)], [(0, 8)]]


def test_packed_row_equals_each_example_alone_and_sdpas_masked_row():
    model = tiny_llama()
    model.config.use_cache = False
    pieces, ids, pos = _packed([5, 1, 3, 7])
    with torch.no_grad():
        masked = model(input_ids=ids, position_ids=pos).logits  # sdpa + block-diagonal mask
        with packed_attention(model) as switched:
            assert switched == 1 and model.config._attn_implementation == PACKED_SDPA
            got = model(input_ids=ids, position_ids=pos).logits
        alone = torch.cat([model(input_ids=p[None]).logits for p in pieces], dim=1)
    assert model.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_lora_gradients_equal_sdpas_masked_row():
    def grads(packed: bool):
        model = _lora_qkv_model()
        _, ids, pos = _packed([6, 4, 9], seed=1)
        ids = torch.cat([ids, ids.flip(1)])  # two rows, the same segments
        with packed_attention(model) if packed else contextlib.nullcontext():
            loss = model(input_ids=ids, position_ids=pos.expand(2, -1), labels=ids).loss
        nodes.update(_graph_nodes(loss))
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    nodes: set[str] = set()
    got, want = grads(True), grads(False)
    # the examples' outputs are joined by cat, not written into slices of one buffer, whose backward
    # (CopySlices) clones the whole gradient once per example
    assert "CopySlices" not in nodes
    assert got.keys() == want.keys() and len(got) == 2 * 3 * 2
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_rows_of_equal_examples_attend_in_one_call_on_views_of_the_rows(monkeypatch):
    """Full blocks (every row cut into examples of one length, or holding one example): one kernel
    call on views of the rows, not copies, with the logits and LoRA gradients of sdpa's (masked) rows."""
    from adaptune.speedups import attention

    calls = []
    kernel = attention._causal_sdpa

    def spy(q, k, v, *args):
        calls.append(q)
        return kernel(q, k, v, *args)

    def run(rows: int, length: int, packed: bool):
        model = _lora_qkv_model()
        ids = torch.randint(3, 100, (rows, 16), generator=torch.Generator().manual_seed(rows))
        pos = torch.arange(length).repeat(rows, 16 // length)
        with packed_attention(model) if packed else contextlib.nullcontext():
            out = model(input_ids=ids, position_ids=pos, labels=ids)
        out.loss.backward()
        return out.logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setattr(attention, "_causal_sdpa", spy)
    for rows, length in ((1, 4), (2, 4), (2, 16)):
        calls.clear()
        (got_logits, got), (want_logits, want) = run(rows, length, True), run(rows, length, False)
        layers = tiny_llama().config.num_hidden_layers
        examples = rows * 16 // length
        assert len(calls) == layers and all(q.shape[0] == examples and q.shape[2] == length for q in calls)
        if rows == 1:  # the kernel reads the row's own memory
            assert all(q._base is not None and not q.is_contiguous() for q in calls)
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        assert got.keys() == want.keys() and len(got) == 2 * 3 * layers
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_padding_masks_and_generation_take_sdpas_own_path():
    model = tiny_llama()
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        plain_gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with packed_attention(model):
            got = model(input_ids=ids, attention_mask=mask).logits
            packed_gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed_gen, plain_gen)


def test_models_without_sdpa_are_left_alone():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    with packed_attention(model) as switched:
        assert switched == 0 and model.config._attn_implementation == "eager"
    gpt2 = tiny_gpt2()  # runs sdpa too: switched, and its packed rows come out as transformers' do
    gpt2.config.use_cache = False
    ids, pos = torch.randint(3, 100, (1, 8)), torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        want = gpt2(input_ids=ids, position_ids=pos).logits
        with packed_attention(gpt2) as switched:
            got = gpt2(input_ids=ids, position_ids=pos).logits
    assert switched == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_examples_of_one_length_in_several_rows_match_too():
    model = tiny_llama()
    model.config.use_cache = False
    _, ids, pos = _packed([4, 4, 3, 4], seed=2)
    other = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]])
    ids, pos = torch.cat([ids, ids.roll(3, 1)]), torch.cat([pos, other])
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=pos).logits
        with packed_attention(model):
            got = model(input_ids=ids, position_ids=pos).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_under_cpu_bf16_autocast_examples_attend_in_fp32():
    """The CPU's fused attention kernel is slower in bf16 than in fp32 for short examples, so
    under CPU autocast each example attends in fp32: the attention output matches fp32 SDPA run
    on the bf16-rounded inputs, not bf16 SDPA."""
    import torch.nn.functional as F

    from adaptune.speedups.attention import packed_sdpa_forward

    g = torch.Generator().manual_seed(0)
    lengths = [5, 3, 5]
    q, k, v = (torch.randn(1, 4, sum(lengths), 8, generator=g).bfloat16().float().requires_grad_() for _ in range(3))
    _, _, pos = _packed(lengths)
    module = torch.nn.Module()
    module.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_sdpa_forward(module, q, k, v, None, position_ids=pos)
    assert out.dtype == torch.float32
    start = 0
    for n in lengths:
        piece = [t[:, :, start:start + n] for t in (q, k, v)]
        fp32 = F.scaled_dot_product_attention(*piece, is_causal=True).transpose(1, 2)
        torch.testing.assert_close(out[:, start:start + n], fp32, rtol=1e-5, atol=1e-6)
        start += n
    out.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (q, k, v))
