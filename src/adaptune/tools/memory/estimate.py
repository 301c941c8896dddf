"""The estimate itself: parameters and their states, activations, and the high-water mark of a step
(the model and its assumptions are described in ``tools/memory/__init__.py``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError
from ...tuners.targets import in_out_features, lora_pairs, lora_parameter_count
from .activations import ADAPTER_BYTES, layer_saved, norm_bytes
from .shapes import Shape, as_meta_model, find_blocks, is_4bit, linear_like, model_shape

ESTIMATED_METHODS = ("full", "lora", "qlora")
LOGITS_COPIES = 3  # log-softmax output + its gradient + the logits' gradient, all fp32
NF4_BLOCK = 64
DQ_BLOCK = 256

Pairs = dict[str, list[tuple[int, int]]]

__all__ = ["ESTIMATED_METHODS", "MemoryEstimate", "count_parameters", "estimate_all", "estimate_training_memory",
           "nf4_bytes", "preference_tokens"]


@dataclass
class MemoryEstimate:
    """Bytes needed to train, by item. ``total`` sums them; ``peak`` is the modelled high-water mark."""

    method: str
    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    peak: int = 0
    params: int = 0
    trainable_params: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.gradients + self.optimizer + self.activations


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (tied ones once); works on meta models and counts a bitsandbytes
    4-bit weight as the weights it stands for, not its packed bytes."""
    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        if is_4bit(p):
            shape = getattr(getattr(p, "quant_state", None), "shape", None)
            total += math.prod(shape) if shape is not None else p.numel() * 2
        else:
            total += p.numel()
    return total


def nf4_bytes(numel: int, double_quant: bool = True) -> int:
    """Bytes bitsandbytes stores for an NF4-quantized tensor of ``numel`` weights."""
    blocks = -(-numel // NF4_BLOCK)
    size = -(-numel // 2) + 16 * 4  # packed 4-bit codes + the NF4 code table
    if double_quant:
        # uint8 absmax codes, their fp32 scales, the fp32 offset, the 256-entry 8-bit code table
        size += blocks + (-(-blocks // DQ_BLOCK)) * 4 + 4 + 256 * 4
    else:
        size += blocks * 4
    return size


@dataclass
class _Setup:
    """What every part of the estimate reads: the meta model and the numbers taken from it once."""

    model: nn.Module
    method: str
    c: int  # bytes of the compute/weight dtype
    shape: Shape
    blocks_name: str
    block: nn.Module
    targets: Pairs
    block_targets: Pairs
    out_emb: nn.Module | None
    out_emb_name: str | None
    in_emb: nn.Module | None
    tied: bool
    cuda: bool

    @property
    def full(self) -> bool:
        return self.method == "full"


def _setup(config_or_model: Any, method: str, target_modules: Any, weight_dtype: Any, device: Any,
           trust_remote_code: bool) -> _Setup:
    from ...device import parse_dtype, pick_device

    model = as_meta_model(config_or_model, trust_remote_code=trust_remote_code)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    tied = (out_emb is not None and in_emb is not None
            and getattr(out_emb, "weight", None) is getattr(in_emb, "weight", None))
    blocks_name, blocks = find_blocks(model)
    targets = {} if method == "full" else lora_pairs(model, target_modules)
    prefix = f"{blocks_name}.0."
    return _Setup(model=model, method=method, c=torch.empty((), dtype=parse_dtype(weight_dtype)).element_size(),
                  shape=model_shape(model, blocks[0], out_emb, len(blocks)), blocks_name=blocks_name,
                  block=blocks[0], targets=targets,
                  block_targets={n[len(prefix):]: m for n, m in targets.items() if n.startswith(prefix)},
                  out_emb=out_emb, out_emb_name=names.get(id(out_emb)) if out_emb is not None else None,
                  in_emb=in_emb, tied=tied, cuda=torch.device(device or pick_device()).type == "cuda")


def _weight_bytes(st: _Setup, double_quant: bool) -> int:
    """Every parameter and buffer once; QLoRA's linear weights (not the head) as NF4."""
    quantized = {n for n, m in st.model.named_modules()
                 if st.method == "qlora" and linear_like(m) and n != st.out_emb_name}
    weights = 0
    seen: set[int] = set()
    for mname, mod in st.model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            weights += nf4_bytes(p.numel(), double_quant) if mname in quantized and pname == "weight" \
                else p.numel() * st.c
    for b in st.model.buffers():
        weights += b.numel() * (st.c if b.is_floating_point() else b.element_size())
    return weights


def _head_bytes(st: _Setup, r: int) -> int:
    """Per token, what the final norm, the head and the labels keep for backward."""
    s, c = st.shape, st.c
    head = 0
    final_norms = [m for n, m in st.model.named_modules()
                   if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None
                   and not n.startswith(st.blocks_name + ".") and n != st.blocks_name]
    for m in final_norms[-1:]:
        head += norm_bytes(m, s.h, c, st.full)
    head_trainable = st.full or (st.out_emb_name in st.targets if st.out_emb_name else False)
    if st.out_emb is not None and head_trainable:
        head += s.h * c
    if st.out_emb_name in st.targets:
        head += r * ADAPTER_BYTES * len(st.targets[st.out_emb_name])
    head += 16  # labels, padded and shifted (int64)
    if st.full:
        head += 8  # token ids kept for the embedding's gradient
    if s.embd_dropout > 0 and st.full:  # with frozen embeddings nothing needs the mask
        head += s.h * (1 if st.cuda else c)
    return head


@dataclass
class _Activations:
    per_layer: int  # bytes per token one layer keeps (or its input, with gradient checkpointing)
    head: int  # bytes per token the head keeps
    recompute: int  # bytes per token of the largest work of one layer's backward
    shared: int  # bytes shared by all tokens (rotary tables, the attention mask)
    dequant: int  # one 4-bit weight dequantized (QLoRA)
    loss_peak: int  # bytes per token of the loss's fp32 logits work
    grad_logits: int  # bytes per token of the head's backward (the logits' gradient, or the chunked head's)


def _activations(st: _Setup, r: int, seq_len: int, batch_size: int, lora_dropout: float, padded: bool,
                 checkpointing: bool, objective: str, tokens: int) -> _Activations:
    s, c = st.shape, st.c
    per_layer = layer_saved(st.block, s, c, seq_len, st.full, st.block_targets, lora_dropout, r, padded, st.cuda)
    layer_transient = (3 * s.i + 2 * s.h) * c
    shared = 2 * seq_len * s.head_dim * c if s.has_rotary else 0  # cos, sin
    loss_peak = LOGITS_COPIES * s.vocab * 4
    grad_logits = s.vocab * (4 + (c if c != 4 else 0))  # the logits' gradient (fp32, and cast back)
    if objective != "sft":
        from ...speedups.loss import DEFAULT_CHUNK_ROWS

        # the chunked head: scored rows gathered + their gradient, one chunk of logits at a time;
        # the batch is one packed row, so cos and sin are as long as all its tokens
        loss_peak = grad_logits = 2 * s.h * c
        shared = DEFAULT_CHUNK_ROWS * s.vocab * 4 * (2 if c != 4 else 1)
        shared += 2 * tokens * s.head_dim * c if s.has_rotary else 0
    if padded:
        shared += batch_size * seq_len * seq_len  # boolean attention mask
    # bitsandbytes dequantizes one 4-bit weight at a time to the compute dtype; it lives while that layer runs
    dequant = 0
    if st.method == "qlora":
        dequant = max((math.prod(in_out_features(m)) for n, m in st.model.named_modules()
                       if linear_like(m) and n != st.out_emb_name), default=0) * c
    return _Activations(per_layer=s.h * c if checkpointing else per_layer, head=_head_bytes(st, r),
                        recompute=(per_layer + layer_transient) if checkpointing else layer_transient,
                        shared=shared, dequant=dequant, loss_peak=loss_peak, grad_logits=grad_logits)


def _peak_of_step(st: _Setup, a: _Activations, tokens: int, gradients: int, r: int) -> int:
    """The high-water mark of activations and gradients: backward frees activations layer by
    layer while gradients appear, then the optimizer step needs its temporaries."""
    s, grad_bytes = st.shape, (st.c if st.full else ADAPTER_BYTES)
    if st.full:
        per_block_grad = count_parameters(st.block) * grad_bytes
    else:
        per_block_grad = lora_parameter_count(st.block_targets, r) * grad_bytes
    embed_grad = 0 if (st.tied or not st.full or st.in_emb is None) else st.in_emb.weight.numel() * grad_bytes
    grads_so_far = gradients - per_block_grad * s.layers - embed_grad  # the head's, first
    kept = s.layers * a.per_layer + a.head
    points = [(kept + a.loss_peak) * tokens + a.shared]
    points.append((kept + a.grad_logits) * tokens + a.shared + grads_so_far)
    for k in range(s.layers, 0, -1):  # each layer: its activations and the new gradients
        points.append((k * a.per_layer + a.recompute) * tokens + a.dequant + a.shared + grads_so_far
                      + per_block_grad)
        grads_so_far += per_block_grad
    biggest = max((p.numel() for p in st.model.parameters()), default=0) if st.full else 0
    points += [gradients, gradients + 2 * biggest * grad_bytes]  # AdamW (for-loop): sqrt and division temporaries
    return max(points)


def estimate_training_memory(config_or_model: Any, method: str, batch_size: int, seq_len: int,
                             r: int = 8, target_modules: Any = ("q_proj", "v_proj"),
                             weight_dtype: Any = torch.float32,
                             gradient_checkpointing: bool = False, *,
                             lora_dropout: float = 0.0, padded: bool = False,
                             double_quant: bool = True, device: Any = None,
                             trust_remote_code: bool = False, objective: str = "sft",
                             shared_prompt_tokens: int = 0) -> MemoryEstimate:
    """Estimate the memory of one training step (see the package doc for the model).

    ``config_or_model``: a transformers config, a model (real or meta), or a model name/path
    (read with ``adaptune.hub.load_config``). ``method``: ``"full"``, ``"lora"`` or
    ``"qlora"``. ``weight_dtype``: the dtype the model is trained in (for QLoRA: the compute
    dtype of everything that is not 4-bit). ``target_modules``: as in ``LoraConfig``.
    ``device``: where training will run (default: ``adaptune.device.pick_device()``); it only
    changes how dropout masks are stored (CUDA keeps 1-byte masks, the CPU full-width ones) and
    whether attention with dropout has a fused kernel (not on the CPU). ``objective``: ``"sft"``,
    or a preference objective (:func:`preference_tokens`): ``batch_size`` then counts pairs (KTO:
    rows) of ``seq_len`` tokens each.
    """
    method = str(method).lower()
    if method not in ESTIMATED_METHODS:
        raise ConfigError(f"unknown training method {method!r}: use one of {', '.join(ESTIMATED_METHODS)}")
    if batch_size < 1 or seq_len < 1:
        raise ConfigError("batch_size and seq_len must be at least 1")
    if method != "full" and r < 1:
        raise ConfigError(f"LoRA rank r must be at least 1, not {r}")
    st = _setup(config_or_model, method, target_modules, weight_dtype, device, trust_remote_code)
    weights = _weight_bytes(st, double_quant)
    params = count_parameters(st.model)
    adapter_params = lora_parameter_count(st.targets, r)
    trainable = params if st.full else adapter_params
    gradients = trainable * (st.c if st.full else ADAPTER_BYTES)
    tokens = preference_tokens(objective, batch_size, seq_len, shared_prompt_tokens)
    a = _activations(st, r, seq_len, batch_size, lora_dropout, padded, gradient_checkpointing, objective, tokens)
    transient = max(a.loss_peak * tokens, a.recompute * tokens + a.dequant)
    activations = (st.shape.layers * a.per_layer + a.head) * tokens + a.shared + transient
    adapter = adapter_params * ADAPTER_BYTES
    peak = weights + adapter + 2 * gradients + _peak_of_step(st, a, tokens, gradients, r)
    return MemoryEstimate(method=method, weights=int(weights), adapter=int(adapter), gradients=int(gradients),
                          optimizer=int(2 * gradients), activations=int(activations), peak=int(peak),
                          params=int(params), trainable_params=int(trainable))


def preference_tokens(objective: str, batch_size: int, seq_len: int, shared_prompt_tokens: int = 0) -> int:
    """Tokens one training step runs for ``objective`` (``adaptune.training.preference``).

    Pair objectives run two sequences of ``seq_len`` per pair, less ``shared_prompt_tokens`` when
    the pair's prompt is packed once (the default layout; 0 gives the upper bound). KTO runs one
    sequence per row (its KL term runs without gradients, so it adds nothing kept). Reference
    log-probabilities are cached: no second model and no reference activations."""
    from ...training.preference.options import OBJECTIVES

    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective in ("sft", "kto"):
        return batch_size * seq_len
    if not 0 <= shared_prompt_tokens < seq_len:
        raise ConfigError(f"shared_prompt_tokens must be in [0, seq_len), got {shared_prompt_tokens}")
    return batch_size * (2 * seq_len - shared_prompt_tokens)


def estimate_all(config_or_model: Any, batch_size: int, seq_len: int,
                 methods: Iterable[str] = ESTIMATED_METHODS, **kw: Any) -> list[MemoryEstimate]:
    """``estimate_training_memory`` for each method (the model is built once)."""
    model = as_meta_model(config_or_model, trust_remote_code=kw.pop("trust_remote_code", False))
    return [estimate_training_memory(model, m, batch_size, seq_len, **kw) for m in methods]
