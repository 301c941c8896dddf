"""adaptune.speedups (dropout, swiglu, rms_norm): the lean autograd paths (LoRA dropout + A, SwiGLU,
RMSNorm, the LoRA addmm) compute the same thing and keep less."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adaptune import LoraConfig, get_peft_model
from adaptune.speedups.dropout import dropout_linear, dropout_mask
from adaptune.tuners.lora.layer import LoraLayer
from tests.tiny import nonzero_lora_b, tiny_llama

P = 0.3


def _grads(fn, x, w):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fn(x, w)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad, w.grad


def test_same_values_and_gradients_as_dropout_then_linear_for_the_same_mask():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 16, generator=g), torch.randn(4, 16, generator=g)
    mask = torch.rand(x.shape, generator=g) >= P
    fused = _grads(lambda x, w: dropout_linear(x, w, P, mask=mask), x, w)
    plain = _grads(lambda x, w: F.linear(x * mask / (1 - P), w), x, w)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mask_keeps_one_minus_p_of_the_elements():
    torch.manual_seed(1)
    kept = dropout_mask(torch.empty(200_000), P).float().mean().item()
    assert kept == pytest.approx(1 - P, abs=0.01)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1])
def test_rejects_p_outside_the_open_interval(p):
    with pytest.raises(ValueError, match="0 < p < 1"):
        dropout_linear(torch.randn(2, 3), torch.randn(4, 3), p)


def _saved_bytes(fn) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_keeps_x_and_a_bool_mask_instead_of_two_float_copies():
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(8, 256, requires_grad=True)
    lean = _saved_bytes(lambda: dropout_linear(x, w, P))
    plain = _saved_bytes(lambda: F.linear(F.dropout(x, P, training=True), w))
    # plain: float mask + dropped x (+ w); lean: x + bool mask (+ w)
    assert lean < plain - 64 * 256 * 2
    assert lean <= x.numel() * 4 + x.numel() + w.numel() * 4


def test_lora_layer_in_training_uses_it_with_the_same_result():
    """A LoRA layer with dropout = base + scaling * B A (x * mask / (1 - p)), mask drawn by dropout_mask."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=P,
                                                   target_modules=["q_proj"]))
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    model.train()
    x = torch.randn(2, 6, layer.in_features, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    mask = dropout_mask(x, P)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = layer.base_layer(x) + F.linear(F.linear(x * mask / (1 - P), a), b) * layer.scaling("default")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    grad_a, = torch.autograd.grad(out.sum(), a)
    want_a, = torch.autograd.grad(expected.sum(), a)
    torch.testing.assert_close(grad_a, want_a, rtol=1e-5, atol=1e-6)
    model.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + F.linear(F.linear(x, a), b) * layer.scaling("default"),
                               rtol=1e-5, atol=1e-6)


def test_swiglu_same_values_and_gradients_as_silu_times_up():
    g = torch.Generator().manual_seed(3)
    gate, up = torch.randn(2, 5, 32, generator=g) * 3, torch.randn(2, 5, 32, generator=g)
    from adaptune.speedups.swiglu import swiglu

    got = _grads(lambda a, b: swiglu(a, b), gate, up)
    want = _grads(lambda a, b: F.silu(a) * b, gate, up)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    gate.requires_grad_()
    saved = _saved_bytes(lambda: swiglu(gate, up.requires_grad_()))
    plain = _saved_bytes(lambda: F.silu(gate) * up)
    assert saved == 2 * gate.numel() * 4 and plain == 3 * gate.numel() * 4


def _swiglu_grads(reuse: bool, needs: tuple[bool, bool] = (True, True)):
    g = torch.Generator().manual_seed(5)
    gate = (torch.randn(3, 4, 48, generator=g) * 3).requires_grad_(needs[0])
    up = torch.randn(3, 4, 48, generator=g).requires_grad_(needs[1])
    from adaptune.speedups.swiglu import swiglu

    # non-leaf inputs, as a model's gate_proj/up_proj outputs are
    gate_in, up_in = gate * 1.0, up * 1.0
    out = swiglu(gate_in, up_in, reuse_inputs=reuse)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), [t for t, n in ((gate_in, needs[0]), (up_in, needs[1])) if n])
    return out.detach(), grads, (gate_in, up_in)


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_swiglu_reusing_its_inputs_gives_the_same_bits_in_their_memory(needs):
    """Backward writes the gradients into gate's and up's own memory, with the same values."""
    out_r, grads_r, (gate_in, up_in) = _swiglu_grads(True, needs)
    out_p, grads_p, _ = _swiglu_grads(False, needs)
    assert torch.equal(out_r, out_p)
    assert len(grads_r) == len(grads_p) == sum(needs)
    for a, b in zip(grads_r, grads_p):
        assert torch.equal(a, b)
    reused = {gate_in.data_ptr(), up_in.data_ptr()}
    assert all(g.data_ptr() in reused for g in grads_r)
    assert not any(g.data_ptr() in reused for g in _swiglu_grads(False, needs)[1])


def test_swiglu_reuse_refuses_a_second_backward_and_keeps_double_backward_right():
    from adaptune.speedups.swiglu import swiglu

    gate, up = torch.randn(2, 8).requires_grad_(), torch.randn(2, 8).requires_grad_()
    out = swiglu(gate * 1.0, up * 1.0, reuse_inputs=True)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="cannot run twice"):
        out.sum().backward()
    # create_graph=True: backward is recorded, so it must leave gate and up intact
    for reuse in (True, False):
        g, u = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
        first, = torch.autograd.grad(swiglu(g * 1.0, u * 1.0, reuse_inputs=reuse).sum(), g, create_graph=True)
        second, = torch.autograd.grad(first.sum(), g)
        want_first, = torch.autograd.grad((F.silu(g) * u).sum(), g, create_graph=True)
        want_second, = torch.autograd.grad(want_first.sum(), g)
        torch.testing.assert_close(second, want_second)


def test_swiglu_does_not_reuse_views_or_one_tensor_given_twice():
    from adaptune.speedups.swiglu import swiglu

    both = torch.randn(2, 16, requires_grad=True) * 1.0
    gate, up = both[:, :8], both[:, 8:]  # views of one buffer, as a fused gate/up product would give
    out = swiglu(gate, up, reuse_inputs=True)
    grad, = torch.autograd.grad(out.sum(), both)
    want, = torch.autograd.grad((F.silu(gate) * up).sum(), both)
    assert torch.equal(grad, want)
    x = torch.randn(2, 8, requires_grad=True) * 1.0
    grad, = torch.autograd.grad(swiglu(x, x, reuse_inputs=True).sum(), x)
    xd = x.detach().requires_grad_()
    want, = torch.autograd.grad((F.silu(xd) * xd).sum(), xd)
    torch.testing.assert_close(grad, want)


def test_fused_mlp_leaves_outputs_a_forward_hook_holds_and_matches_the_plain_mlp():
    from adaptune.speedups.swiglu import fuse_gated_mlps, unfuse_gated_mlps

    model = tiny_llama()
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 3, mlp.gate_proj.in_features)

    def input_grad() -> torch.Tensor:
        xg = x.clone().requires_grad_()
        (mlp(xg) * torch.linspace(-1, 1, x.shape[-1])).sum().backward()
        return xg.grad

    want = input_grad()  # the module's own forward
    fuse_gated_mlps(model)
    assert torch.equal(input_grad(), want)  # no hook: gate and up reused, same gradient
    kept = []
    handle = mlp.gate_proj.register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        out = mlp(x.clone().requires_grad_())
        before = kept[0].detach().clone()
        out.sum().backward()
    finally:
        handle.remove()
        unfuse_gated_mlps(model)
    assert torch.equal(kept[0].detach(), before)  # the hooked output was not overwritten


def _lora_llama_step(fuse, targets: list[str]):
    """One training step of a tiny Llama LoRA (B non-zero); ``fuse`` (or None) switches modules first."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    nonzero_lora_b(model)
    switched = fuse(model) if fuse else 0
    model.train()
    ids = torch.randint(0, 100, (2, 7))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return switched, out.loss.detach(), grads, model


def test_fuse_gated_mlps_switches_llama_mlps_and_training_is_unchanged():
    from adaptune.speedups.swiglu import fuse_gated_mlps, unfuse_gated_mlps

    def step(fuse: bool):
        return _lora_llama_step(fuse_gated_mlps if fuse else None, ["gate_proj", "v_proj"])

    n_fused, loss_f, grads_f, model = step(True)
    n_plain, loss_p, grads_p, _ = step(False)
    assert n_fused == model.config.num_hidden_layers and n_plain == 0
    torch.testing.assert_close(loss_f, loss_p)
    assert grads_f.keys() == grads_p.keys() and grads_f
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-5, atol=1e-6)
    assert fuse_gated_mlps(model) == n_fused  # idempotent
    assert unfuse_gated_mlps(model) == n_fused
    assert not any("forward" in vars(m) for m in model.modules() if hasattr(m, "gate_proj"))


def test_fuse_gated_mlps_leaves_other_mlps_alone():
    from adaptune.speedups.swiglu import fuse_gated_mlps
    from tests.tiny import tiny_gpt2

    assert fuse_gated_mlps(tiny_gpt2()) == 0
    assert fuse_gated_mlps(tiny_llama(hidden_act="gelu")) == 0


def _llama_norm(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_rms_norm_same_values_and_gradients_as_llamas():
    from adaptune.speedups.rms_norm import rms_norm

    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(3, 7, 48, generator=g) * 2, torch.rand(48, generator=g) + 0.5
    got = _grads(lambda a, b: rms_norm(a, b, 1e-6), x, w)
    want = _grads(_llama_norm, x, w)
    assert torch.equal(got[0], want[0])  # forward: the same ops in the same order
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a frozen weight: x's gradient only, and only x and a scalar a row are kept
    xr = x.clone().requires_grad_()
    saved = _saved_bytes(lambda: rms_norm(xr, w, 1e-6))
    assert saved == (x.numel() + x.numel() // 48) * 4 + w.numel() * 4


def test_fuse_rms_norms_switches_llama_norms_and_training_is_unchanged():
    from adaptune.speedups.rms_norm import fuse_rms_norms, unfuse_rms_norms

    targets = ["q_proj", "v_proj", "down_proj"]
    n_fused, loss_f, grads_f, model = _lora_llama_step(fuse_rms_norms, targets)
    n_plain, loss_p, grads_p, _ = _lora_llama_step(None, targets)
    assert n_fused == 2 * model.config.num_hidden_layers + 1 and n_plain == 0  # two a layer + the final one
    assert torch.equal(loss_f, loss_p)
    assert grads_f.keys() == grads_p.keys() and grads_f
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-5, atol=1e-6)
    assert fuse_rms_norms(model) == n_fused  # idempotent
    assert unfuse_rms_norms(model) == n_fused
    assert not any("forward" in vars(m) for m in model.modules() if "Norm" in type(m).__name__)


def test_fuse_rms_norms_leaves_other_norms_and_dtypes_alone():
    from adaptune.speedups.rms_norm import fuse_rms_norms
    from tests.tiny import tiny_gpt2

    assert fuse_rms_norms(tiny_gpt2()) == 0  # LayerNorm: a probe mismatch
    model = tiny_llama().to(torch.bfloat16)
    assert fuse_rms_norms(model) == 0  # bf16 weights keep the module's own casts


def test_lora_output_added_in_one_addmm_matches_base_plus_b_of_a():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    out = layer(x)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = layer.base_layer(x) + layer.scaling("default") * (x @ a.T) @ b.T
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out.square().sum(), (x, a, b))
    expected = torch.autograd.grad(want.square().sum(), (x, a, b))
    for g1, g2 in zip(got, expected):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)
    one = torch.randn(layer.in_features)  # a 1-d input keeps its shape
    assert layer(one).shape == (layer.out_features,)


def test_dropout_linear_backward_under_cpu_bf16_autocast_gives_gradients_in_the_inputs_dtypes():
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=P, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(), config)
    nonzero_lora_b(model)
    model.train()
    ids = torch.randint(0, 100, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 2 * 2 * 2
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
