"""The LoRA layer: a frozen base layer plus any number of named low-rank adapters.

LoRA (Hu et al. 2021, arXiv:2106.09685) learns a low-rank update of a frozen weight::

         x ───────────────┬──────────────────────┐
         │                │                      │
   ┌─────▼─────┐    ┌─────▼─────┐                │
   │  base W   │    │ dropout   │                │
   │ (frozen)  │    │ A: r x in │  kaiming init  │
   └─────┬─────┘    │ B: out x r│  zero init     │
         │          └─────┬─────┘                │
         │                │ * scaling            │   scaling = alpha / r
         └──────(+)───────┘                      │   (rsLoRA: alpha / sqrt(r))
                 │
                 y = W x + scaling * B A dropout(x)

DoRA (Liu et al. 2024, arXiv:2402.09353) splits the adapted weight into a direction and a
trained per-row magnitude m: ``y = m / ||W + s B A|| * (W x + s B A x) + bias``, the norm detached.

A GPT-2 style fused projection (q, k, v in one ``c_attn``) may carry an adapter on some output
*slices* only; then A stacks one r-row block per slice and B holds one (rows x r) block per slice.

Names and shapes follow peft (``lora_A.<adapter>.weight`` is (r, in), ``lora_B`` (out, r),
``lora_embedding_A.<adapter>`` (r, num_embeddings)), so state dicts move between the libraries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...quant.kinds import QUANT_KINDS
from ...speedups.dropout import dropout_active, dropout_linear
from ..targets import Slices, in_out_features, module_kind, slice_width
from .mixed import MixedBatchForward, RowAdapters, RowPlan

# One batch row's adapters: a name (peft's adapter_names) or ((name, scale), ...) pairs whose
# scaled outputs add up (several adapters, or one at another strength, for that row only).


@dataclass(frozen=True)
class AdapterSpec:
    """What one adapter needs to know about itself in one layer."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: bool | str = True
    slices: Slices | None = None
    loftq_bits: int = 4  # init == "loftq": the bits this layer's base is stored in
    loftq_iter: int = 1

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class DoraMagnitude(nn.Module):
    """DoRA's trained per-output-row magnitude m, as a module holding ``weight`` (peft's layout, so
    state dict keys read ``lora_magnitude_vector.<adapter>.weight`` in both libraries)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLayer(MixedBatchForward, nn.Module):
    """Wraps ``base_layer`` (Linear, GPT-2 Conv1D, Embedding or a bitsandbytes linear)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        kind = module_kind(base_layer)
        if kind is None:
            raise ConfigError(f"LoRA cannot wrap a {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.kind = kind
        self.in_features, self.out_features = in_out_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # of DoraMagnitude: peft's names, ``...default.weight``
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        # per-row adapters for mixed batches: a name, or (name, scale) pairs summed for that row
        self.row_adapters: list[RowAdapters] | None = None
        self._row_plan: RowPlan | None = None  # row_adapters grouped once for all layers of a forward
        self._stacked: tuple | None = None  # (key, A's stacked, B's stacked) of the adapters decoded last
        self._dora_norms: dict[str, torch.Tensor] = {}  # weight norms captured at merge time

    # ---- adapters ------------------------------------------------------------------------
    @property
    def is_embedding(self) -> bool:
        return self.kind == "embedding"

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight. Model code reads it through the wrapper (T5's MLP checks
        ``self.wo.weight.dtype``), and peft's layers pass it through too."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def fan_in_fan_out(self) -> bool:
        """GPT-2's Conv1D stores W as (in, out)."""
        return self.kind == "conv1d"

    def scaling(self, name: str) -> float:
        return self.specs[name].scaling

    def add(self, name: str, spec: AdapterSpec, upcast: bool = True) -> None:
        """Create adapter ``name`` (inactive until ``set_active``). ``upcast``: fp32 adapter weights
        on an fp16/bf16 base (peft's ``autocast_adapter_dtype``), so that small updates are not
        rounded away; the adapter's output is cast back to the base's dtype."""
        if name in self.specs:
            raise ConfigError(f"adapter {name!r} already exists in this layer")
        if spec.use_dora and (self.is_embedding or spec.slices):
            raise ConfigError("DoRA is supported on Linear and Conv1D layers, not on embeddings or fused slices")
        device, dtype = self._param_device_dtype()
        if upcast and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        if self.is_embedding:
            new = dict(device=device, dtype=dtype)
            self.lora_embedding_A[name] = nn.Parameter(torch.randn(spec.r, self.in_features, **new))
            self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, spec.r, **new))
        else:
            n_slices = len(spec.slices) if spec.slices else 1
            rows = slice_width(spec.slices) * n_slices if spec.slices else self.out_features
            self.lora_A[name] = nn.Linear(self.in_features, spec.r * n_slices, bias=False, device=device, dtype=dtype)
            self.lora_B[name] = nn.Linear(spec.r, rows, bias=False, device=device, dtype=dtype)
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.specs[name] = spec
        self.reset_parameters(name)
        if spec.init == "loftq" and self.kind == "linear":
            self._init_loftq(name, spec)
        if spec.use_dora:
            self.lora_magnitude_vector[name] = DoraMagnitude(self._dora_weight_norm(name).detach().clone())

    def reset_parameters(self, name: str) -> None:
        init = self.specs[name].init
        with torch.no_grad():
            if self.is_embedding:
                if init is False:
                    return  # both random normal, as created
                nn.init.zeros_(self.lora_embedding_A[name])
                nn.init.normal_(self.lora_embedding_B[name])
                return
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            if init is False:
                return  # nn.Linear's own init for both: a non-zero adapter, useful for tests
            if init == "gaussian":
                nn.init.normal_(a, std=1 / self.specs[name].r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def _init_loftq(self, name: str, spec: AdapterSpec) -> None:
        """Replace the float base by its LoftQ-quantized layer and start the adapter from the error."""
        if spec.slices:
            raise ConfigError("LoftQ cannot initialise adapters on slices of a fused projection")
        from .loftq import loftq_layer

        start = loftq_layer(self.base_layer, spec.r, spec.scaling, spec.loftq_bits, spec.loftq_iter)
        self.base_layer, self.kind = start.base_layer, module_kind(start.base_layer)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(start.lora_A)
            self.lora_B[name].weight.copy_(start.lora_B)

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        for store in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_embedding_A,
                      self.lora_embedding_B, self.lora_magnitude_vector):
            if name in store:
                del store[name]
        self.specs.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.specs]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = []
        for store in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in store:
                params += list(store[name].parameters())
        for store in (self.lora_embedding_A, self.lora_embedding_B):
            if name in store:
                params.append(store[name])
        return params

    def _param_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        if weight.device.type == "meta":
            return torch.device("cpu"), dtype
        return weight.device, dtype

    # ---- weights -------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), dequantized when the base is 4/8-bit."""
        if self.kind in QUANT_KINDS:
            from ...quant.dequant import dequantize_weight

            return dequantize_weight(self.base_layer)
        w = self.base_layer.weight
        if self.is_embedding:
            return w.T
        return w.T if self.fan_in_fan_out else w

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A as an (out, in) matrix (embedding: (dim, num_embeddings))."""
        spec = self.specs[name]
        if self.is_embedding:
            return self.lora_embedding_B[name] @ self.lora_embedding_A[name] * spec.scaling
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if not spec.slices:
            return b @ a * spec.scaling
        delta = torch.zeros(self.out_features, self.in_features, device=a.device, dtype=a.dtype)
        r = spec.r
        for i, (start, stop) in enumerate(spec.slices):
            rows = stop - start
            delta[start:stop] = b[i * rows:(i + 1) * rows] @ a[i * r:(i + 1) * r] * spec.scaling
        return delta

    def _dora_weight_norm(self, name: str) -> torch.Tensor:
        weight = self.base_weight().to(self.lora_A[name].weight.dtype)
        return torch.linalg.norm(weight + self.delta_weight(name), dim=1)

    # ---- merge ---------------------------------------------------------------------------
    def merged_weight(self, names: Sequence[str], safe: bool = False) -> torch.Tensor:
        """The base weight with adapters ``names`` folded in, as (out, in), in the adapter dtype."""
        weight = self.base_weight().detach().clone()
        for name in names:
            delta = self.delta_weight(name).detach().to(weight.dtype)
            if self.specs[name].use_dora:
                norm = torch.linalg.norm(weight + delta, dim=1)
                self._dora_norms[name] = norm
                scale = (self.lora_magnitude_vector[name].weight.detach() / norm).to(weight.dtype)
                weight = scale[:, None] * (weight + delta)
            else:
                weight = weight + delta
        if safe and not torch.isfinite(weight).all():
            raise ValueError(f"merging adapters {list(names)} gives NaN or inf weights; the model was left unmerged")
        return weight

    def write_base_weight(self, weight: torch.Tensor) -> None:
        if self.kind in QUANT_KINDS:
            raise ConfigError("cannot merge in place into a quantized layer; use merge_and_unload(), which dequantizes")
        target = self.base_layer.weight
        new = weight.T if (self.is_embedding or self.fan_in_fan_out) else weight
        with torch.no_grad():
            target.copy_(new.to(target.dtype))

    def merge(self, names: Sequence[str] | None = None, safe: bool = False) -> None:
        names = [n for n in (names if names is not None else self.active_adapters)
                 if n not in self.merged_adapters and n in self.specs]
        if not names:
            return
        self.write_base_weight(self.merged_weight(names, safe=safe))
        self.merged_adapters.extend(names)

    def unmerge(self, names: Sequence[str] | None = None) -> None:
        """Undo merges in reverse order; exact up to float rounding."""
        names = list(names) if names is not None else list(self.merged_adapters)
        if not any(n in names for n in self.merged_adapters):
            return  # nothing to undo (and a quantized base, which never merges in place, is left alone)
        weight = self.base_weight().detach().clone()
        for name in reversed([n for n in self.merged_adapters if n in names]):
            delta = self.delta_weight(name).detach().to(weight.dtype)
            if self.specs[name].use_dora:
                scale = (self.lora_magnitude_vector[name].weight.detach() / self._dora_norms.pop(name)).to(weight.dtype)
                weight = weight / scale[:, None] - delta
            else:
                weight = weight - delta
            self.merged_adapters.remove(name)
        self.write_base_weight(weight)

    # ---- forward -------------------------------------------------------------------------
    def _lora_out(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to the output for input ``x`` (same leading dims)."""
        spec = self.specs[name]
        if self.is_embedding:
            after_a = F.embedding(x, self.lora_embedding_A[name].T, padding_idx=self.base_layer.padding_idx,
                                  max_norm=self.base_layer.max_norm, norm_type=self.base_layer.norm_type,
                                  scale_grad_by_freq=self.base_layer.scale_grad_by_freq,
                                  sparse=self.base_layer.sparse)
            return (after_a @ self.lora_embedding_B[name].T) * spec.scaling
        if spec.use_dora:
            x = x.to(self.lora_A[name].weight.dtype)
            return self._dora_out(x, self.lora_dropout[name](x), name, base_out)
        hidden = self._lora_hidden(x, name)
        if not spec.slices:
            return self.lora_B[name](hidden)
        return self._sliced_out(hidden, name, spec)

    def _lora_hidden(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``scaling * A(dropout(x))``: the r-wide input of B."""
        lora_a, dropout, scaling = self.lora_A[name], self.lora_dropout[name], self.specs[name].scaling
        x = x.to(lora_a.weight.dtype)
        if dropout_active(dropout) and lora_a.bias is None:
            hidden = dropout_linear(x, lora_a.weight, dropout.p)  # keeps a bool mask, not x twice
        else:
            hidden = lora_a(dropout(x))
        if scaling != 1:  # scale the r-wide hidden, not the out-wide result (and its gradient)
            hidden = hidden * scaling
        return hidden

    def _sliced_out(self, hidden: torch.Tensor, name: str, spec: AdapterSpec) -> torch.Tensor:
        """Per-slice B blocks placed into their output rows; untouched rows get zeros."""
        b = self.lora_B[name].weight
        rows = slice_width(spec.slices)
        pieces, cursor = [], 0
        for i, (start, stop) in enumerate(spec.slices):
            if start > cursor:
                pieces.append(hidden.new_zeros(*hidden.shape[:-1], start - cursor))
            h = hidden[..., i * spec.r:(i + 1) * spec.r]
            pieces.append(F.linear(h, b[i * rows:(i + 1) * rows]))
            cursor = stop
        if cursor < self.out_features:
            pieces.append(hidden.new_zeros(*hidden.shape[:-1], self.out_features - cursor))
        return torch.cat(pieces, dim=-1)

    def _dora_out(self, x: torch.Tensor, xd: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        spec = self.specs[name]
        weight = self.base_weight().to(x.dtype)
        lora = self.lora_B[name](self.lora_A[name](xd))
        with torch.no_grad():
            norm = torch.linalg.norm(weight + self.delta_weight(name), dim=1)
        scale = self.lora_magnitude_vector[name].weight / norm
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base_no_bias = base_out.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)
        else:
            base_no_bias = F.linear(xd, weight)
        return (scale - 1) * base_no_bias + scale * lora * spec.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self._mixed_forward(x, result)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self._add_lora_out(x, name, result)
        return result

    def _add_lora_out(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """``result`` + the adapter's output. A plain LoRA does B's product and the sum in one
        ``addmm``: one out-wide tensor a layer instead of two. Without dropout the scaling rides on
        addmm's ``alpha``, and without autograd (generation) the sum goes into ``result`` in place:
        two small ops a layer, which is what unmerged decoding one token at a time pays for."""
        spec = self.specs[name]
        a_layers, b_layers = self.lora_A, self.lora_B  # empty on embeddings
        lora_a = a_layers[name] if name in a_layers else None
        lora_b = b_layers[name] if name in b_layers else None
        if spec.use_dora or spec.slices or lora_a is None or lora_b is None or lora_a.bias is not None \
                or lora_b.bias is not None or lora_b.weight.dtype != result.dtype:
            # summed in the wider dtype, rounded once (an fp32 adapter on a 16-bit base, as peft)
            return (result + self._lora_out(x, name, result)).to(result.dtype)
        a_weight, b_weight = lora_a.weight, lora_b.weight
        if dropout_active(self.lora_dropout[name]):
            hidden, alpha = self._lora_hidden(x, name), 1.0
        else:
            hidden, alpha = torch.mm(x.reshape(-1, x.shape[-1]).to(a_weight.dtype), a_weight.t()), spec.scaling
        flat, hidden = result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1])
        if torch.is_grad_enabled():
            flat = torch.addmm(flat, hidden, b_weight.t(), alpha=alpha)
        else:
            flat = flat.addmm_(hidden, b_weight.t(), alpha=alpha)
        return flat.view(result.shape)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, adapters={list(self.specs)}, active={self.active_adapters}"
