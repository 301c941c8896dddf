"""adaptune.autocast_linear: frozen linears under autocast give autocast's numbers and keep no
16-bit weight copy for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from adaptune.speedups.autocast import frozen_linear, lean_autocast_linears, restore_autocast_linears
from adaptune.tuners.lora.layer import LoraLayer
from tests.test_perf_equivalence import assert_close_dicts, lora_llama, train_lora

BF16 = torch.bfloat16


def saved_weight_sized(fn, weight: torch.Tensor) -> list[torch.dtype]:
    """dtypes of the tensors autograd saves while ``fn`` runs that are as big as ``weight``."""
    seen = []

    def pack(t):
        if t.numel() == weight.numel():
            seen.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_linear_gives_autocasts_output_and_input_gradient(bias):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias).requires_grad_(False)
    x = torch.randn(5, 24, requires_grad=True)
    grad = torch.randn(5, 40)
    with torch.autocast("cpu", dtype=BF16):
        want = F.linear(x, layer.weight, layer.bias)
        got = frozen_linear(x, layer.weight, layer.bias)
    assert got.dtype == want.dtype == BF16
    assert torch.equal(got, want)
    (dx_want,) = torch.autograd.grad(want, x, grad)
    (dx_got,) = torch.autograd.grad(got, x, grad)
    assert dx_got.dtype == torch.float32
    torch.testing.assert_close(dx_got, dx_want, rtol=0, atol=0)


def test_frozen_linear_keeps_the_fp32_weight_not_a_bf16_copy():
    torch.manual_seed(0)
    layer = nn.Linear(24, 40).requires_grad_(False)
    x = torch.randn(5, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        plain = saved_weight_sized(lambda: F.linear(x, layer.weight, layer.bias), layer.weight)
        lean = saved_weight_sized(lambda: frozen_linear(x, layer.weight, layer.bias), layer.weight)
    assert plain == [BF16]  # autocast's cast, alive until backward
    assert lean == [torch.float32]  # the parameter itself: no extra memory


def test_frozen_linear_is_plain_linear_elsewhere():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6)
    x = torch.randn(3, 8, requires_grad=True)
    assert torch.equal(frozen_linear(x, layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias))
    with torch.autocast("cpu", dtype=BF16):  # a trainable weight needs its own gradient: autocast's path
        frozen_linear(x, layer.weight, layer.bias).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


def test_switch_covers_plain_linears_and_lora_bases_and_is_undone():
    model = lora_llama()
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert lean_autocast_linears(model) == len(linears)
    assert all("forward" in vars(m) for m in linears)
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, LoraLayer))
    assert restore_autocast_linears(model) == len(linears)
    assert not any("forward" in vars(m) for m in linears)


class _SwitchedLinears(TrainerCallback):
    """How many plain linears run a switched forward while the Trainer trains."""

    def __init__(self):
        self.during = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.during = _switched_linears(model)


def _switched_linears(model) -> int:
    return sum("forward" in vars(m) for m in model.modules() if type(m) is nn.Linear)


def test_trainer_bf16_trains_as_autocast_with_lean_linears(tmp_path):
    seen = {lean: _SwitchedLinears() for lean in (False, True)}
    runs = {lean: train_lora(tmp_path, f"lean-{lean}", bf16=True, lean_autocast=lean, callbacks=[seen[lean]])
            for lean in (False, True)}
    for lean, (trainer, _, _) in runs.items():
        switched = seen[lean].during
        assert (switched > 0) == lean
        assert _switched_linears(trainer.model) == 0  # given back as it came
    (_, losses, weights), (_, ref_losses, ref_weights) = runs[True], runs[False]
    assert len(losses) == 3 and losses == pytest.approx(ref_losses, rel=1e-5)
    assert_close_dicts(weights, ref_weights, rtol=1e-4, atol=1e-6)
