"""Training on a quantized base: peft's preparation recipe, and the layout bitsandbytes must keep.

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

import types

import torch
from torch import nn

from .kinds import has_quantized_layers, layer_kind

__all__ = ["keep_trainable_layout", "prepare_model_for_kbit_training", "release_checkpoint_mapping"]

# quantization methods peft leaves alone in prepare_model_for_kbit_training (no upcasting)
_NO_UPCAST_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")


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
    stays resident (clean file pages, counted in RSS). Copying the
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
