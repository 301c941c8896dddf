"""Mixed-adapter batches with per-row (name, scale) pairs: scaled and summed adapters for one row,
the same batch as rows that use a plain adapter name (peft's ``adapter_names``) or none."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptune.errors import ConfigError
from adaptune.tuners.lora.layer import AdapterSpec, LoraLayer
from adaptune.tuners.lora.mixed import row_adapters


def _layer(dtype: torch.dtype = torch.float64) -> LoraLayer:
    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(12, 10, bias=True).to(dtype))
    layer.add("a", AdapterSpec(r=2, alpha=4, init=False))
    layer.add("b", AdapterSpec(r=5, alpha=5, init=False))
    layer.add("d", AdapterSpec(r=3, alpha=3, init=False, use_dora=True))
    with torch.no_grad():
        layer.lora_magnitude_vector["d"].weight.mul_(1.3)  # a magnitude that differs from the norm
    return layer.eval()


def _delta(layer: LoraLayer, x: torch.Tensor, name: str) -> torch.Tensor:
    """What adapter ``name`` alone adds to the base output."""
    layer.set_active([name])
    with_adapter = layer(x)
    layer.set_active([])
    return with_adapter - layer(x)


ROWS = [
    (("a", 0.5),),
    "__base__",
    (("a", 1.0), ("b", -2.0)),
    "b",
    (("d", 0.25), ("a", 2.0)),
    "a",  # a non-consecutive row of "a": the gathered path
    "d",
]


def _expected(layer: LoraLayer, x: torch.Tensor) -> torch.Tensor:
    layer.set_active([])
    expected = layer(x).clone()
    for i, entry in enumerate(ROWS):
        pairs = ((entry, 1.0),) if isinstance(entry, str) else entry
        for name, scale in pairs:
            if name != "__base__":
                expected[i] += scale * _delta(layer, x[i:i + 1], name)[0]
    return expected


@pytest.mark.parametrize("tokens", [1, 3])
def test_scaled_and_summed_rows_equal_the_sum_of_scaled_adapter_outputs(tokens: int) -> None:
    layer = _layer()
    x = torch.randn(len(ROWS), tokens, 12, dtype=torch.float64)
    expected = _expected(layer, x)
    with torch.no_grad(), row_adapters([layer], ROWS):
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (got[0] - got[5]).abs().max() > 1e-3  # the scale changes the row


def test_grad_path_gives_the_same_values_and_gradients_to_each_adapter() -> None:
    layer = _layer()
    x = torch.randn(len(ROWS), 2, 12, dtype=torch.float64)
    expected = _expected(layer, x)
    for p in layer.parameters():
        p.requires_grad_(True)
    with row_adapters([layer], ROWS):
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    for name in ("a", "b", "d"):
        assert layer.lora_B[name].weight.grad is not None
        assert layer.lora_B[name].weight.grad.abs().sum() > 0


def test_plain_names_still_mean_one_adapter_per_row() -> None:
    layer = _layer(torch.float32)
    x = torch.randn(4, 3, 12)
    names = ["b", "a", "__base__", "a"]
    with torch.no_grad():
        with row_adapters([layer], names):
            mixed = layer(x)
        for i, name in enumerate(names):
            layer.set_active([] if name == "__base__" else [name])
            torch.testing.assert_close(mixed[i], layer(x[i:i + 1])[0], rtol=1e-5, atol=1e-5)


def test_a_row_without_this_layers_adapter_keeps_the_base_output() -> None:
    layer = _layer()
    x = torch.randn(2, 1, 12, dtype=torch.float64)
    with torch.no_grad(), row_adapters([layer], [(("elsewhere", 3.0),), "a"]):
        got = layer(x)
    layer.set_active([])
    torch.testing.assert_close(got[0], layer(x[:1])[0])


@pytest.mark.parametrize("rows, message", [
    ([(("a", float("nan")),)], "finite scale"),
    ([(("a", True),)], "finite scale"),
    ([(("a", 1.0), ("a", 2.0))], "twice"),
    ([(("a",),)], "finite scale"),
])
def test_bad_row_entries_are_refused(rows, message) -> None:
    layer = _layer()
    x = torch.randn(1, 1, 12, dtype=torch.float64)
    with pytest.raises(ConfigError, match=message), torch.no_grad(), row_adapters([layer], rows):
        layer(x)


def test_decoding_rows_follow_weights_changed_in_place() -> None:
    """One token a row takes the stacked path, whose stacked weights must not go stale."""
    layer = _layer()
    x = torch.randn(3, 1, 12, dtype=torch.float64)
    rows = ["a", "b", (("a", 0.5), ("b", 2.0))]
    with torch.no_grad(), row_adapters([layer], rows):
        before = layer(x)
        layer.lora_B["b"].weight.mul_(3.0)
        after = layer(x)
    torch.testing.assert_close(after[0], before[0])
    for i in (1, 2):
        pairs = ((rows[i], 1.0),) if isinstance(rows[i], str) else rows[i]
        layer.set_active([])
        expected = layer(x[i:i + 1])[0] + sum(s * _delta(layer, x[i:i + 1], n)[0] for n, s in pairs)
        torch.testing.assert_close(after[i], expected, rtol=1e-12, atol=1e-12)
