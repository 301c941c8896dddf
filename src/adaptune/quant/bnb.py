"""QLoRA: a 4-bit (or 8-bit) frozen base model under full-precision LoRA adapters.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) keeps the base weights in 4-bit NormalFloat
(``nf4``, optionally with the per-block scales quantized again: "double quantization"), computes
each base matmul in ``compute_dtype`` after dequantizing a layer's weight on the fly, and trains
ordinary LoRA adapters in full precision on top. bitsandbytes holds and multiplies the quantized
weights; transformers loads a model into them (``from_pretrained(..., quantization_config=...)``).
This module is the glue, with peft's names:

* ``bnb_config(quantize, compute_dtype=None, double_quant=True)``: the ``BitsAndBytesConfig`` for
  ``"nf4"``, ``"fp4"`` or ``"int8"``; the compute dtype follows the hardware unless given.
* ``prepare_model_for_kbit_training(model, ...)``: peft's recipe (freeze everything, upcast
  fp16/bf16 non-quantized weights such as norms to fp32, gradient checkpointing with inputs that
  require grad).
* ``quantize_linears`` / ``quantized_linear_from``: quantize a model already in memory, with some
  layers int8 and the rest 4-bit if asked (LoftQ needs this: it chooses what each layer stores).
* ``dequantize_weight`` / ``float_linear_from`` / ``dequantize_model``: what ``lora.py`` and
  ``merge_and_unload`` use to fold adapters into a quantized base. The result is a full-precision
  model (peft instead re-quantizes the merged weight, losing the adapter's small updates again).

LoRA parameters on a quantized base are float32, as in peft: LoRA creates them in the base
weight's dtype when that is a float dtype, and ``Params4bit`` / ``Int8Params`` are integer
storage. The LoRA branch casts its input to float32 and its output back to the base output's
dtype, which is the dtype of the layer input (bitsandbytes computes in ``compute_dtype`` and
casts back). So an fp32 model with compute dtype fp32 is fp32 end to end; a bf16 model with
compute dtype bf16 computes base matmuls in bf16 and the adapter in fp32.

One bitsandbytes (0.50) behaviour on CPUs with AVX512-BF16 needs care: the first eval-mode,
no-grad forward of a ``Linear4bit`` re-packs its weight *in place* into a layout for a bf16
inference kernel. After that (a) the kernel has no autograd, so training silently loses the
gradient through every re-packed layer (and raises when the layer has a bias), and (b)
``bitsandbytes.functional.dequantize_4bit`` on the re-packed data returns wrong weights (what
``model.dequantize()`` and a naive merge would use), and (c) eval outputs differ from train-mode
outputs by bf16 rounding. So once LoRA wraps a 4-bit layer, ``keep_trainable_layout`` turns that
re-packing off for the whole model (undoing it where it already happened): train, eval, a
reloaded adapter and the merged model then all compute the same thing, at the cost of
bitsandbytes' faster bf16 inference kernel. ``dequantize_weight`` reads either layout correctly.
"""

from __future__ import annotations

import functools
import importlib
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, EnvironmentProblem

QUANT_KINDS = ("linear4bit", "linear8bitlt")
QUANTIZE_CHOICES = ("nf4", "fp4", "int8")
# quantization methods peft leaves alone in prepare_model_for_kbit_training (no upcasting)
_NO_UPCAST_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")

_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


# ---- is bitsandbytes usable here? ------------------------------------------------------------------
def require_bitsandbytes(device: str | torch.device | None = None):
    """The ``bitsandbytes`` module, or an ``EnvironmentProblem`` saying why it cannot be used."""
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError:
        raise EnvironmentProblem(
            "4-bit/8-bit base models (QLoRA) need the bitsandbytes package, which is not installed: "
            "pip install 'bitsandbytes>=0.45' (or train without --quantize)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a broken native library raises all sorts
        raise EnvironmentProblem(
            f"bitsandbytes is installed but cannot be loaded on this platform ({type(exc).__name__}: {exc}); "
            f"train without --quantize"
        ) from None
    dev = torch.device(device) if device is not None else _default_device()
    problem = _probe(dev.type)
    if problem:
        version = getattr(bnb, "__version__", "?")
        raise EnvironmentProblem(
            f"bitsandbytes {version} cannot run quantized layers on {dev.type} here ({problem}); "
            f"train without --quantize or install a bitsandbytes build for this platform"
        )
    return bnb


@functools.cache
def _probe(device_type: str) -> str | None:
    """Quantize and dequantize a small block on ``device_type``; the error text, or None if it works."""
    try:
        import bitsandbytes.functional as bf

        x = torch.linspace(-1, 1, 64 * 64, device=device_type).reshape(64, 64)
        q, state = bf.quantize_4bit(x, blocksize=64, quant_type="nf4")
        back = bf.dequantize_4bit(q, state)
        if back.shape != x.shape or not torch.isfinite(back).all() or (back - x).abs().max() > 0.2:
            return "4-bit round trip gave wrong values"
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot run"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return None


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ---- configs ------------------------------------------------------------------------------------------
def default_compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bf16 on a CUDA GPU that supports it, fp16 on other GPUs, fp32 on CPU.

    On CPU (measured with bitsandbytes 0.50, torch 2.13, an AVX512-BF16 EPYC): an fp16 compute
    dtype was 10-30x slower than fp32 per 4-bit layer; bf16 was up to 2x faster per layer there
    but no faster in a whole-model training step, rounds every activation, and is slow on CPUs
    without bf16 instructions. fp32 runs everywhere: the dequantized weight feeds an fp32 matmul.
    """
    dev = torch.device(device) if device is not None else _default_device()
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _as_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise ConfigError(f"compute_dtype must be a float dtype, got {value}")
        return value
    if isinstance(value, str) and value.lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.lower().removeprefix("torch.")]
    raise ConfigError(f"compute_dtype must be one of fp32, bf16, fp16 (or a torch dtype), got {value!r}")


def bnb_config(quantize: str, compute_dtype: torch.dtype | str | None = None, double_quant: bool = True):
    """A ``transformers.BitsAndBytesConfig`` for ``quantize`` = "nf4" | "fp4" | "int8".

    ``compute_dtype`` (4-bit only) is the dtype each base matmul runs in; by default
    ``default_compute_dtype()``. ``double_quant`` also quantizes the per-block scales (4-bit only;
    about 0.37 bits per weight saved). Raises ``EnvironmentProblem`` when bitsandbytes is missing
    or cannot run here, before any model is loaded.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    dtype = _as_dtype(compute_dtype) if compute_dtype is not None else default_compute_dtype()
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=bool(double_quant))


# ---- training preparation -------------------------------------------------------------------------------
def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """peft's recipe before adding adapters to a quantized model; returns ``model`` (changed in place).

    1. freeze every parameter;
    2. upcast fp16/bf16 parameters that are not 4-bit storage (norms, embeddings, heads) to fp32,
       for stable training (skipped for GPTQ/AQLM/EETQ/torchao/HQQ models, as in peft);
    3. on CPU, give the non-quantized weights their own memory (``release_checkpoint_mapping``) and
       keep bitsandbytes' 4-bit weights in their trainable layout (see the module notes);
    4. for a quantized model and ``use_gradient_checkpointing``: make the input embeddings' output
       require grad (so frozen layers pass gradients under reentrant checkpointing) and enable
       gradient checkpointing with ``gradient_checkpointing_kwargs``. Unlike peft, which leaves
       ``use_reentrant`` to torch (a deprecation warning, then reentrant), adaptune passes
       ``use_reentrant=False`` unless you say otherwise, as transformers does by default.
    """
    method = str(getattr(getattr(model, "quantization_method", None), "value",
                         getattr(model, "quantization_method", None)) or "")
    loaded_in_kbit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
                          or has_quantized_layers(model))
    other_quant = method in _NO_UPCAST_METHODS or bool(getattr(model, "hqq_quantized", False))
    kwargs = dict(gradient_checkpointing_kwargs or {})

    for param in model.parameters():
        param.requires_grad_(False)
    if not other_quant:
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
    if loaded_in_kbit:
        release_checkpoint_mapping(model)
    keep_trainable_layout(model)

    if (loaded_in_kbit or other_quant) and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            _make_inputs_require_grad(model)
        kwargs.setdefault("use_reentrant", False)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def release_checkpoint_mapping(model: nn.Module) -> int:
    """Copy a quantized model's CPU float weights out of the checkpoint file they were mapped from.

    transformers memory-maps a safetensors checkpoint and leaves the weights it does not quantize
    (embeddings, norms, the head) as views of that mapping. The mapping then stays alive, and
    with it every page that quantizing the linear layers read: the whole full-precision checkpoint
    stays resident (clean file pages, counted in RSS; about 400 MB for SmolLM2-135M). Copying the
    few float weights lets it go. Returns the bytes copied.
    """
    copied = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if type(tensor).__name__ in ("Params4bit", "Int8Params") or tensor.device.type != "cpu":
                continue
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            tensor.data = tensor.data.clone()
            copied += tensor.numel() * tensor.element_size()
    return copied


def _make_inputs_require_grad(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return

    def hook(_module, _inputs, output):
        output.requires_grad_(True)

    model.get_input_embeddings().register_forward_hook(hook)


# ---- layers -------------------------------------------------------------------------------------------
def layer_kind(module: nn.Module) -> str | None:
    """"linear4bit" / "linear8bitlt" for bitsandbytes layers (by class name: no import), else None."""
    name = type(module).__name__
    if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
        return "linear4bit"
    if name == "Linear8bitLt":
        return "linear8bitlt"
    return None


def has_quantized_layers(model: nn.Module) -> bool:
    """bitsandbytes layers (bare or under LoRA) or adaptune's int8 embedding tables."""
    return any(layer_kind(m) is not None or getattr(m, "kind", None) in QUANT_KINDS
               or type(m).__name__ in ("Int8Embedding", "Int8Head") for m in model.modules())


def keep_trainable_layout(model: nn.Module) -> int:
    """Stop bitsandbytes re-packing 4-bit weights for its CPU inference kernel, and undo it where done.

    Returns how many layers were changed. Call before training on CPU (``prepare_model_for_kbit_training``
    and attaching a trainable adapter do). Train and eval then run the same dequantize-and-matmul
    computation in ``compute_dtype``; the cost is bitsandbytes' faster bf16 kernel for inference.

    int8 layers on CPU get their own forward (``_int8_forward``): the int8 weight dequantized
    times the input, in training and in eval alike. bitsandbytes instead trains them that way but
    evaluates them with LLM.int8's fp16 activation quantization, another function of the input
    and a slow path on CPU. Its training path also holds every int8 layer's input as an autograd
    context attribute, which gradient checkpointing does not free.
    """
    changed = 0
    for module in model.modules():
        if layer_kind(module) == "linear8bitlt" and module.weight.device.type == "cpu" \
                and "forward" not in module.__dict__:
            module.forward = types.MethodType(_int8_forward, module)
            changed += 1
        if layer_kind(module) != "linear4bit":
            continue
        touched = False
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            touched = True
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
            touched = True
        changed += touched
    return changed


def _int8_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A CPU ``Linear8bitLt``: ``x @ (CB * SCB / 127).T + bias``, bitsandbytes' training formula,
    computed by ``int8_rows_matmul`` (keeps no input for backward; see keep_trainable_layout)."""
    from .int8_embedding import int8_rows_matmul

    scb = self.state.SCB if self.state.SCB is not None else self.weight.SCB
    out = int8_rows_matmul(x, self.weight.data, scb * (1.0 / 127.0))
    return out if self.bias is None else out + self.bias.to(out.dtype)


def _unpack_cpu_codes(packed: torch.Tensor, n: int, k: int, block_n: int = 32) -> torch.Tensor:
    """4-bit codes (n, k) from bitsandbytes' CPU inference layout (n, k/2), read without changing it."""
    p = packed.reshape(-1, block_n)
    codes = torch.cat([p & 0xF, p >> 4], dim=-1)  # low nibbles: first 32 values, high: last 32
    codes = codes.reshape(n // block_n, k // 2, block_n, 2).transpose(1, 2)
    return codes.reshape(n, k).long()


def _dequantize_4bit(weight) -> torch.Tensor:
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        n, k = state.shape
        codes = _unpack_cpu_codes(weight.data.view(torch.uint8), n, k)
        absmax = state.absmax.float().T  # stored (k / blocksize, n) in bf16
        values = state.code.float().to(codes.device)[codes].reshape(n, k // state.blocksize, state.blocksize)
        out = (values * absmax[:, :, None]).reshape(n, k)
        return out.to(getattr(state, "original_dtype", torch.float32))
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(weight.data, state)


def dequantize_weight(base_layer: nn.Module) -> torch.Tensor:
    """The (out, in) float weight of a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``.

    4-bit: in the dtype the weight had before quantization (``quant_state.dtype``), whichever
    layout bitsandbytes holds it in. 8-bit: float32 (int8 rows times their scales).
    """
    kind = layer_kind(base_layer)
    weight = base_layer.weight
    if kind == "linear4bit":
        if getattr(weight, "quant_state", None) is None:  # not quantized yet: still the float weight
            return weight.data
        return _dequantize_4bit(weight).reshape(base_layer.out_features, base_layer.in_features)
    if kind == "linear8bitlt":
        if weight.dtype != torch.int8:
            return weight.data
        scb = getattr(getattr(base_layer, "state", None), "SCB", None)
        if scb is None:
            scb = getattr(weight, "SCB", None)
        if scb is None:
            raise EnvironmentProblem(f"{type(base_layer).__name__}: int8 weight without its scales (SCB)")
        import bitsandbytes.functional as bf

        return bf.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    raise ConfigError(f"dequantize_weight expects a bitsandbytes Linear4bit or Linear8bitLt, "
                      f"got {type(base_layer).__name__}")


def float_linear_from(base_layer: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A frozen ``nn.Linear`` with ``weight`` (out, in) and the base layer's bias, in ``weight``'s dtype."""
    out_f, in_f = weight.shape
    bias = getattr(base_layer, "bias", None)
    linear = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=weight.dtype).clone(),
                                   requires_grad=False)
    return linear


def quantized_linear_from(linear: nn.Linear, quantize: str, weight: torch.Tensor | None = None,
                          compute_dtype: torch.dtype | str | None = None, double_quant: bool = True) -> nn.Module:
    """A frozen bitsandbytes layer holding ``weight`` (default: ``linear``'s own) and ``linear``'s bias.

    The layer is what ``from_pretrained(..., quantization_config=bnb_config(quantize))`` would load:
    ``Linear4bit`` (blocks of 64, ``double_quant`` scales) for nf4/fp4, ``Linear8bitLt`` (int8 rows,
    outlier threshold 6.0, transformers' default) for int8. The weight keeps ``linear``'s dtype
    and device. Used to quantize a model in memory (``quantize_linears``) and by LoftQ.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    source = (weight if weight is not None else linear.weight).detach()
    device, dtype = linear.weight.device, linear.weight.dtype
    if device.type == "meta":
        raise ConfigError("cannot quantize a layer whose weights are not loaded (meta device)")
    bnb = require_bitsandbytes(device)
    has_bias = linear.bias is not None
    if quantize == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        param = bnb.nn.Int8Params(source.to("cpu", dtype), requires_grad=False, has_fp16_weights=False)
    else:
        cdtype = _as_dtype(compute_dtype) if compute_dtype is not None else default_compute_dtype(device)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=cdtype,
                                  compress_statistics=double_quant, quant_type=quantize, device="meta")
        param = bnb.nn.Params4bit(source.to("cpu", dtype), requires_grad=False, blocksize=64,
                                  compress_statistics=double_quant, quant_type=quantize, module=layer)
    layer.weight = param.to(device)  # quantizes
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def quantize_linears(model: nn.Module, quantize: str = "nf4", int8_modules: Sequence[str] = (),
                     compute_dtype: torch.dtype | str | None = None, double_quant: bool = True) -> int:
    """Quantize ``model``'s float ``nn.Linear`` layers in memory; returns how many were replaced.

    The alternative to loading with ``quantization_config`` for a model already in memory, and the
    only way to mix precisions: layers whose name ends with one of ``int8_modules`` (as
    ``down_proj``, ``v_proj``) become int8, the others ``quantize``, as llama.cpp's "_M" mixes keep
    attention values and MLP down-projections at higher precision. The output head stays as it is
    (transformers leaves it unquantized too), and so do LoRA's own layers and the float copies
    ``modules_to_save`` trains. ``int8_modules`` match as ``rank_pattern`` keys do (a name or
    regex that the end of the module path matches).
    """
    from ..tuners.targets import pattern_key

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    count = 0

    def visit(module: nn.Module, prefix: str) -> None:
        nonlocal count
        for child_name, child in list(module.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if type(child).__name__ in ("LoraLayer", "ModulesToSaveWrapper"):
                continue
            if type(child) is nn.Linear and child is not head:
                kind = "int8" if pattern_key(int8_modules, name) else quantize
                setattr(module, child_name, quantized_linear_from(child, kind, compute_dtype=compute_dtype,
                                                                  double_quant=double_quant))
                count += 1
            else:
                visit(child, name)

    visit(model, "")
    return count


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every bitsandbytes layer by a float ``nn.Linear`` (and int8 embedding tables by float
    ones) and drop the quantization config.

    ``dtype`` defaults to each layer's pre-quantization dtype (the model's dtype). Afterwards the
    model saves and reloads as an ordinary transformers model. Changes ``model`` in place.
    """
    for name, module in list(model.named_modules()):
        if not name or layer_kind(module) is None:
            continue
        weight = dequantize_weight(module)
        if dtype is not None:
            weight = weight.to(dtype)
        model.set_submodule(name, float_linear_from(module, weight))
    from .int8_embedding import dequantize_embeddings

    if hasattr(model, "get_input_embeddings"):
        dequantize_embeddings(model)
    forget_quantization(model)
    return model


def forget_quantization(model: nn.Module) -> None:
    """Remove what transformers attaches to a quantized model, so it saves as a plain one.

    Only for a model whose weights are all float already (after ``dequantize_model``, or a GGUF
    file that transformers dequantized on load but still marks as "quantized with gguf", which
    ``save_pretrained`` then refuses).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in model.__dict__:
            delattr(model, attr)
    if "is_quantized" in model.__dict__ or hasattr(type(model), "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property on some versions
            pass


# ---- sizes --------------------------------------------------------------------------------------------
def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's weights: parameters, buffers and bitsandbytes' quantization state.

    Tied tensors count once. A 4-bit weight counts its packed bytes plus its block scales (and
    their own scales under double quantization); an 8-bit weight its int8 bytes plus row scales.
    """
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = (t.data_ptr(), t.numel()) if t.numel() else (id(t), 0)
        if key in seen:
            return
        seen.add(key)
        total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p.data)
        state = getattr(p, "quant_state", None)
        while state is not None:
            add(getattr(state, "absmax", None))
            add(getattr(state, "code", None))
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
        add(getattr(p, "SCB", None))
    for b in model.buffers():
        add(b)
    return total
