"""How much memory training needs (full fine-tuning, LoRA, QLoRA), from a model's config alone.

The model is built on the ``meta`` device (shapes, no data), so a 70B config costs nothing to
inspect. ``adaptune inspect MODEL --memory`` prints ``format_estimates(estimate_all(...))``.

What is counted (bytes; ``c`` = bytes of the compute/weight dtype, 4 for fp32, 2 for bf16/fp16):

* **weights**: every parameter and buffer at ``c`` bytes. QLoRA: each ``Linear``/``Conv1D`` except
  the output head is NF4 (bitsandbytes ``Linear4bit``): ``ceil(n/2)`` bytes of 4-bit codes plus
  the block statistics: one absmax per 64 weights, which double quantization stores as 8-bit codes
  with one fp32 scale per 256 absmax values (plus, per tensor, an fp32 offset and the code tables:
  16 fp32 values for NF4, 256 for the 8-bit absmax codes). That is
  ``4 + 8/64 + 32/(64*256) = 4.127`` bits per weight (4.5 without double quantization).
  Embeddings, norms, biases and the head stay at ``c`` bytes (as the spec asks; note that peft's
  ``prepare_model_for_kbit_training`` upcasts them to fp32).
* **adapter**: LoRA adds ``r * (in + out)`` parameters per targeted ``Linear``/``Conv1D``
  (``r * (num_embeddings + dim)`` per ``Embedding``), kept in fp32 (peft's default
  ``autocast_adapter_dtype``). Targets are chosen by ``adaptune.targets.resolve_targets``, as
  adaptune's LoRA chooses them (peft's rules: a list entry matches a name or a dotted suffix, a
  string is a regex, ``"all-linear"``; ``None`` is the architecture's default; GPT-2's
  ``q_attn``/``v_attn`` are slices of ``c_attn`` with ``r * (in + out/3)`` each).
* **gradients**: one per trainable parameter in its dtype (fp32 adapters: 4 bytes; full
  fine-tuning: ``c``). **optimizer**: AdamW keeps two states per trainable parameter, in its dtype.
* **activations**: what autograd keeps between forward and backward, plus the largest transient.
  Per decoder layer and per token (``h`` hidden, ``q = heads*head_dim``, ``kv = kv_heads*head_dim``,
  ``i`` intermediate size), following Korthikanti et al. 2022 ("Reducing Activation Recomputation
  in Large Transformer Models", which counts ``34*h + 5*heads*s`` bytes per token per layer in
  16-bit with dropout) but counting only what autograd actually saves, which depends on what is
  trainable: a frozen ``Linear`` whose input needs a gradient saves nothing (the input gradient
  only needs the weight), and there is no dropout in Llama-style models:

  ====================================  =====================================  ==================
  tensor                                saved by                               when
  ====================================  =====================================  ==================
  norm input, ``h`` (x2 per layer)      the norm (RMSNorm: in fp32, + 1 fp32)   always
  pre-weight norm output, ``h``         ``weight * x`` of a Python RMSNorm     norm trainable
  norm output, ``h`` (x2)               the q/k/v (or gate/up) linears         those trainable
  q, k, v after RoPE, ``q + 2 kv``      scaled_dot_product_attention           always
  attention output ``q`` + logsumexp    scaled_dot_product_attention           always
  (the o_proj input is the same tensor with SDPA; eager attention keeps the ``heads * s``
  softmax instead: the quadratic term of Korthikanti's count)
  MLP: gate ``i``, act(gate) ``i``,     SiLU and ``act * up``                  always
  up ``i``
  ``act * up``, ``i``                   down_proj                              down_proj trainable
  LoRA: ``A x``, ``r`` fp32 per target  lora_B                                 LoRA
  ====================================  =====================================  ==================

  so an fp32 Llama layer keeps ``5h + 2kv + 3i`` values per token with LoRA on q/v and
  ``8h + 2kv + 4i`` with full fine-tuning. Non-gated MLPs keep ``i`` per saved activation
  tensor (``gelu_new`` written in Python keeps 4). Dropout keeps a mask per element: 1 byte from
  CUDA's fused kernel, a full-width float on the CPU (where attention with dropout also falls back
  to the quadratic "math" kernel). A bf16 input to an fp32 LoRA adapter is copied to fp32
  (``4 * in`` per target), and LoRA dropout adds a 1-byte mask per input element and target
  (``adaptune.fused``: the dropped input is made again in backward). The head keeps the final
  norm's input (and its output when the head is trainable), and the loss is the largest single
  item for small models: transformers computes cross-entropy in fp32, so backward holds the
  log-softmax output, its gradient and the logits' gradient at once: ``3 * vocab * 4`` bytes per
  token (the logits themselves are freed when the caller keeps only ``.loss``, as ``Trainer``
  does). The largest transient of a layer's backward, ``(3i + 2h) * c`` (plus, for QLoRA, one
  weight dequantized to ``c``), is taken instead of that when it is larger.

  With **gradient checkpointing** only each layer's input (``h * c`` per token) is kept, plus one
  layer's full set while it is recomputed in backward.

  Multiply by ``batch_size * seq_len`` tokens. Assumed: no padding mask (packed or equal-length
  batches; ``padded=True`` adds the boolean ``b*s*s`` mask and K/V repeated to all heads for GQA),
  the model in ``train()`` mode, SDPA attention unless the config says ``eager``. Built and
  checked for decoder-only causal LMs (Llama, Qwen, Mistral, GPT-2 families); other models (T5,
  BERT) get a rough figure from their largest stack of layers.

``MemoryEstimate.total`` adds all of these as if they were alive at once: an upper bound. They are
not quite: backward frees each layer's activations while it creates that layer's gradients, and
the optimizer runs after the activations are gone. ``MemoryEstimate.peak`` follows that order
(start of backward, then layer by layer, then the optimizer step with AdamW's per-tensor
temporaries) and is the better guess for full fine-tuning; for LoRA the two are nearly equal.
Neither counts the CUDA context, the allocator's cache and fragmentation, or the data batch;
``foreach`` AdamW (the CUDA default of ``torch.optim.AdamW`` unless ``fused=True``) briefly needs
one more copy of the trainable parameters during ``step()``.

Checked against measured CPU training steps (``tests/test_memory.py``; tensor bytes from
``torch.profiler``): within 1% for LoRA (fp32, bf16, gradient checkpointing) and full
fine-tuning's ``peak``; ``total`` is 10-15% above for full fine-tuning.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

METHODS = ("full", "lora", "qlora")
ADAPTER_BYTES = 4  # peft keeps LoRA weights in fp32 (autocast_adapter_dtype=True)
LOGITS_COPIES = 3  # log-softmax output + its gradient + the logits' gradient, all fp32
NF4_BLOCK = 64
DQ_BLOCK = 256

# activation functions written in Python in transformers: i-sized tensors autograd keeps
_ACT_SAVED = {"gelu_new": 4, "gelu_fast": 5, "gelu_python": 3, "gelu_accurate": 4,
              "quick_gelu": 2, "relu2": 2, "gelu_python_tanh": 4}
_ATTN_OUT_NAMES = {"o_proj", "out_proj", "c_proj", "dense", "wo", "o", "out", "proj", "o_dense"}


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


# --------------------------------------------------------------------------- small helpers
def _dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    from ..hub import parse_dtype

    return parse_dtype(value)


def _is_4bit(p: torch.Tensor) -> bool:
    return getattr(p, "quant_state", None) is not None or type(p).__name__ == "Params4bit"


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (tied ones once); works on meta models and counts a bitsandbytes
    4-bit weight as the weights it stands for, not its packed bytes."""
    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        if _is_4bit(p):
            state = getattr(p, "quant_state", None)
            shape = getattr(state, "shape", None)
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


def _linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    w = module.weight  # transformers Conv1D: weight is (in, out)
    return int(w.shape[0]), int(w.shape[1])


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


# --------------------------------------------------------------------------- the meta model
def build_meta_model(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The model a config describes, on the meta device (causal LM when there is one)."""
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError:
            return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


def _as_meta_model(config_or_model: Any, trust_remote_code: bool = False) -> nn.Module:
    if isinstance(config_or_model, (str, os.PathLike)):
        from ..hub import load_config

        config_or_model = load_config(config_or_model, trust_remote_code=trust_remote_code)
    if isinstance(config_or_model, nn.Module):
        model = config_or_model
        wrapped = hasattr(model, "get_base_model") or any(
            "lora_" in n or _is_4bit(p) for n, p in model.named_parameters())
        if not wrapped and hasattr(model, "config"):
            return model
        config = getattr(model, "config", None)
        if config is None:
            raise ConfigError("memory estimate: the model has no .config to rebuild it from")
        return build_meta_model(config, trust_remote_code=trust_remote_code)
    if hasattr(config_or_model, "to_dict") and hasattr(config_or_model, "model_type"):
        return build_meta_model(config_or_model, trust_remote_code=trust_remote_code)
    raise ConfigError(f"memory estimate needs a transformers config, model, or model name, "
                      f"not {type(config_or_model).__name__}")


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best = ("", nn.ModuleList(), -1)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if n > best[2]:
                best = (name, mod, n)
    if best[2] <= 0:
        raise ConfigError("memory estimate: could not find the model's stack of layers")
    return best[0], best[1]


def _match_targets(model: nn.Module, target_modules: Any) -> dict[str, list[tuple[int, int]]]:
    """Module name -> ``(in, out)`` of each LoRA pair on it, chosen as adaptune's LoRA chooses
    (``adaptune.targets.resolve_targets``: peft's matching, per-architecture defaults for
    ``None``, and GPT-2's ``q_attn``/``k_attn``/``v_attn`` slices of ``c_attn``)."""
    from ..tuners.targets import resolve_targets

    found: dict[str, list[tuple[int, int]]] = {}
    for t in resolve_targets(model, target_modules):
        fan_in, fan_out = _in_out(model.get_submodule(t.name))
        if t.slices:
            found[t.name] = [(fan_in, stop - start) for start, stop in t.slices]
        else:
            found[t.name] = [(fan_in, fan_out)]
    return found


# --------------------------------------------------------------------------- the estimate
@dataclass
class _Shape:
    h: int
    q: int
    kv: int
    i: int
    heads: int
    head_dim: int
    layers: int
    vocab: int
    gated: bool
    act_saved: int
    eager: bool
    resid_dropout: float
    embd_dropout: float
    attn_dropout: float
    has_rotary: bool


def _shape(model: nn.Module, block: nn.Module, out_emb: nn.Module | None, layers: int) -> _Shape:
    cfg = model.config
    h = int(_cfg(cfg, "hidden_size", "n_embd", "d_model", "dim"))
    heads = int(_cfg(cfg, "num_attention_heads", "n_head", "num_heads", "n_heads"))
    kv_heads = int(_cfg(cfg, "num_key_value_heads", "n_kv_heads", "num_kv_heads", default=heads))
    head_dim = int(_cfg(cfg, "head_dim", default=h // heads))
    mlp_in = [m for n, m in block.named_modules() if _linear_like(m) and not _is_attn(n)
              and _in_out(m)[0] == h]
    mlp_out = [m for n, m in block.named_modules() if _linear_like(m) and not _is_attn(n)
               and _in_out(m)[0] != h]
    if mlp_out:
        i = max(_in_out(m)[0] for m in mlp_out)
    else:
        i = int(_cfg(cfg, "intermediate_size", "n_inner", "ffn_dim", "d_ff", default=4 * h))
    gated = bool(mlp_in) and sum(_in_out(m)[1] for m in mlp_in) >= 2 * i
    act = str(_cfg(cfg, "hidden_act", "activation_function", "hidden_activation",
                   default="silu")).lower()
    vocab = _in_out(out_emb)[1] if out_emb is not None and _linear_like(out_emb) else 0
    if out_emb is not None and not vocab:
        vocab = int(getattr(out_emb, "out_features", 0) or _cfg(cfg, "vocab_size", default=0))
    impl = getattr(cfg, "_attn_implementation", None) or "sdpa"
    return _Shape(
        h=h, q=heads * head_dim, kv=kv_heads * head_dim, i=i, heads=heads, head_dim=head_dim,
        layers=layers, vocab=vocab, gated=gated, act_saved=_ACT_SAVED.get(act, 1),
        eager=impl == "eager",
        resid_dropout=float(_cfg(cfg, "resid_pdrop", "hidden_dropout_prob", "hidden_dropout",
                                 "residual_dropout", default=0.0) or 0.0),
        embd_dropout=float(_cfg(cfg, "embd_pdrop", "embedding_dropout", default=0.0) or 0.0),
        attn_dropout=float(_cfg(cfg, "attn_pdrop", "attention_dropout",
                                "attention_probs_dropout_prob", default=0.0) or 0.0),
        has_rotary=any(n.endswith("rotary_emb") for n, _ in model.named_modules()),
    )


def _is_attn(name: str) -> bool:
    return any("attn" in part.lower() or "attention" in part.lower() for part in name.split("."))


def _group(name: str, module: nn.Module, h: int) -> str:
    """Which saved input a linear layer of a block reads: attn_in, attn_out, mlp_in or mlp_out."""
    parts = name.split(".")
    if _is_attn(name):
        if parts[-1] in _ATTN_OUT_NAMES or "output" in parts:
            return "attn_out"
        return "attn_in"
    return "mlp_in" if _in_out(module)[0] == h else "mlp_out"


def _norm_bytes(norm: nn.Module, size: int, c: int, trainable: bool) -> int:
    """Bytes per token a norm layer keeps for backward, for an input of ``size`` values."""
    if isinstance(norm, nn.LayerNorm):  # native kernel: input + mean + rstd
        return size * c + 8
    if isinstance(norm, getattr(nn, "RMSNorm", ())):  # native torch RMSNorm: input + rstd
        return size * c + 4
    # Python RMSNorm (Llama family): upcasts the input to fp32, keeps it and 1/rms; keeps the
    # normalised value (cast back) when its weight is trained
    return size * max(c, 4) + 4 + (size * c if trainable else 0)


def _layer_saved(block: nn.Module, s: _Shape, c: int, seq_len: int, full: bool,
                 lora: dict[str, list[tuple[int, int]]], lora_dropout: float, r: int, padded: bool,
                 cuda: bool) -> int:
    """Bytes per token one decoder layer keeps for backward (the table in the module doc)."""
    total = 0
    # dropout keeps its mask: 1-byte bool from CUDA's fused kernel, a float tensor elsewhere
    mask = (lambda dtype_bytes: 1) if cuda else (lambda dtype_bytes: dtype_bytes)
    norms = [m for n, m in block.named_modules()
             if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None]
    seen_small = 0
    for m in norms:
        size = m.weight.numel()
        if size == s.head_dim:  # q_norm / k_norm: inputs are q, then k
            size = s.q if seen_small == 0 else s.kv
            seen_small += 1
        total += _norm_bytes(m, size, c, full)
    # which inputs of the linear layers are kept: plain ones (trainable base weight, or an fp32
    # LoRA adapter reading them as they are) and LoRA's own fp32 copies
    plain: set[str] = set()
    widths = {"attn_in": s.h, "attn_out": s.q, "mlp_in": s.h, "mlp_out": s.i}
    for name, mod in block.named_modules():
        if not _linear_like(mod):
            continue
        group = _group(name, mod, s.h)
        if full:
            plain.add(group)
        for fan_in, _ in lora.get(name, ()):
            total += r * ADAPTER_BYTES
            if lora_dropout > 0:
                total += fan_in  # the 1-byte keep-mask (adaptune.fused.dropout_linear)
            if c != ADAPTER_BYTES:
                total += fan_in * ADAPTER_BYTES  # the input cast to the adapter's fp32
            else:
                plain.add(group)
    kv = s.q if (padded and s.kv != s.q) else s.kv  # GQA with a mask repeats K/V in transformers
    total += (s.q + 2 * kv) * c  # q, k, v as attention gets them
    # SDPA with dropout has no fused CPU kernel: it falls back to the quadratic "math" one
    if s.eager or (not cuda and s.attn_dropout > 0):
        probs = s.heads * seq_len
        total += probs * 4 + (probs * c if c != 4 else 0)  # fp32 softmax (+ cast back)
        if s.attn_dropout > 0:
            total += probs * (mask(c) + c)  # dropout mask + dropped probabilities
        if "attn_out" in plain:
            total += s.q * c
    else:
        total += s.q * c + s.heads * 4  # output (also o_proj's input) + logsumexp
    for group in ("attn_in", "mlp_in", "mlp_out"):
        if group in plain:
            total += widths[group] * c
    total += s.i * c * (s.act_saved + (2 if s.gated else 0))  # act input (+ act out, up)
    if s.resid_dropout > 0:
        total += 2 * s.h * mask(c)  # after attention and after the MLP
    return total


def _train_state(model: nn.Module, method: str, targets: dict[str, list[tuple[int, int]]], c: int,
                 double_quant: bool, out_emb_name: str | None) -> tuple[int, int]:
    """(weight bytes, adapter parameters per unit of rank)."""
    quantized = {n for n, m in model.named_modules()
                 if method == "qlora" and _linear_like(m) and n != out_emb_name}
    weights = 0
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if mname in quantized and pname == "weight":
                weights += nf4_bytes(p.numel(), double_quant)
            else:
                weights += p.numel() * c
    for b in model.buffers():
        weights += b.numel() * (c if b.is_floating_point() else b.element_size())
    adapter_fan = sum(fi + fo for pairs in targets.values() for fi, fo in pairs)
    return weights, adapter_fan


def estimate_training_memory(config_or_model: Any, method: str, batch_size: int, seq_len: int,
                             r: int = 8, target_modules: Any = ("q_proj", "v_proj"),
                             weight_dtype: Any = torch.float32,
                             gradient_checkpointing: bool = False, *,
                             lora_dropout: float = 0.0, padded: bool = False,
                             double_quant: bool = True, device: Any = None,
                             trust_remote_code: bool = False, objective: str = "sft",
                             shared_prompt_tokens: int = 0) -> MemoryEstimate:
    """Estimate the memory of one training step (see the module doc for the model).

    ``config_or_model``: a transformers config, a model (real or meta), or a model name/path
    (read with ``adaptune.models.load_config``). ``method``: ``"full"``, ``"lora"`` or
    ``"qlora"``. ``weight_dtype``: the dtype the model is trained in (for QLoRA: the compute
    dtype of everything that is not 4-bit). ``target_modules``: as in ``LoraConfig``.
    ``device``: where training will run (default: ``adaptune.models.pick_device()``); it only
    changes how dropout masks are stored (CUDA keeps 1-byte masks, the CPU full-width ones) and
    whether attention with dropout has a fused kernel (not on the CPU).
    ``objective``: ``"sft"``, or a preference objective (:func:`preference_tokens`): ``batch_size``
    then counts pairs (KTO: rows) of ``seq_len`` tokens each.
    """
    method = str(method).lower()
    if method not in METHODS:
        raise ConfigError(f"unknown training method {method!r}: use one of {', '.join(METHODS)}")
    if batch_size < 1 or seq_len < 1:
        raise ConfigError("batch_size and seq_len must be at least 1")
    if method != "full" and r < 1:
        raise ConfigError(f"LoRA rank r must be at least 1, not {r}")
    dtype = _dtype(weight_dtype)
    c = torch.empty((), dtype=dtype).element_size()
    model = _as_meta_model(config_or_model, trust_remote_code=trust_remote_code)
    full = method == "full"

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    out_emb_name = names.get(id(out_emb)) if out_emb is not None else None
    tied = (out_emb is not None and in_emb is not None
            and getattr(out_emb, "weight", None) is getattr(in_emb, "weight", None))

    blocks_name, blocks = _find_blocks(model)
    block = blocks[0]
    s = _shape(model, block, out_emb, len(blocks))
    targets = {} if full else _match_targets(model, target_modules)
    prefix = f"{blocks_name}.0."
    block_targets = {n[len(prefix):]: m for n, m in targets.items() if n.startswith(prefix)}

    # -- parameters
    weights, adapter_fan = _train_state(model, method, targets, c, double_quant, out_emb_name)
    params = count_parameters(model)
    adapter_params = r * adapter_fan
    adapter = adapter_params * ADAPTER_BYTES
    trainable = params if full else adapter_params
    grad_bytes = c if full else ADAPTER_BYTES
    gradients = trainable * grad_bytes
    optimizer = 2 * trainable * grad_bytes

    # -- activations, bytes per token
    tokens = preference_tokens(objective, batch_size, seq_len, shared_prompt_tokens)
    if device is None:
        from ..hub import pick_device

        device = pick_device()
    cuda = torch.device(device).type == "cuda"
    per_layer = _layer_saved(block, s, c, seq_len, full, block_targets, lora_dropout, r, padded,
                             cuda)
    head = 0
    final_norms = [m for n, m in model.named_modules()
                   if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None
                   and not n.startswith(blocks_name + ".") and n != blocks_name]
    for m in final_norms[-1:]:
        head += _norm_bytes(m, s.h, c, full)
    head_trainable = full or (out_emb_name in targets if out_emb_name else False)
    if out_emb is not None and head_trainable:
        head += s.h * c
    if out_emb_name in targets:
        head += r * ADAPTER_BYTES * len(targets[out_emb_name])
    head += 16  # labels, padded and shifted (int64)
    if full:
        head += 8  # token ids kept for the embedding's gradient
    if s.embd_dropout > 0 and full:  # with frozen embeddings nothing needs the mask
        head += s.h * (1 if cuda else c)
    loss_peak = LOGITS_COPIES * s.vocab * 4
    grad_logits = s.vocab * (4 + (c if c != 4 else 0))
    layer_transient = (3 * s.i + 2 * s.h) * c
    shared = 2 * seq_len * s.head_dim * c if s.has_rotary else 0  # cos, sin
    if objective != "sft":
        # the chunked head: scored rows gathered + their gradient, and one chunk of logits at a time;
        # the batch is one packed row, so cos and sin are as long as all its tokens
        loss_peak = grad_logits = 2 * s.h * c
        shared = PREFERENCE_CHUNK_ROWS * s.vocab * 4 * (2 if c != 4 else 1)
        shared += 2 * tokens * s.head_dim * c if s.has_rotary else 0
    if padded:
        shared += batch_size * seq_len * seq_len  # boolean attention mask
    # bitsandbytes dequantizes one 4-bit weight at a time to the compute dtype (CUDA kernels do,
    # in forward and backward); it lives while that layer runs
    dequant = 0
    if method == "qlora":
        dequant = max((_in_out(m)[0] * _in_out(m)[1] for n, m in model.named_modules()
                       if _linear_like(m) and n != out_emb_name), default=0) * c
    layer_kept = s.h * c if gradient_checkpointing else per_layer
    recompute = (per_layer + layer_transient) if gradient_checkpointing else layer_transient
    transient = max(loss_peak * tokens, recompute * tokens + dequant)
    activations = (s.layers * layer_kept + head) * tokens + shared + transient

    # -- peak: backward frees activations layer by layer while gradients appear
    per_block_grad = count_parameters(block) * grad_bytes if full else 0
    if not full:
        per_block_grad = sum(r * (fi + fo) for pairs in block_targets.values()
                             for fi, fo in pairs) * grad_bytes
    layer_grads = per_block_grad * s.layers
    embed_grad = 0 if (tied or not full or in_emb is None) else in_emb.weight.numel() * grad_bytes
    head_grad = gradients - layer_grads - embed_grad
    points = [(s.layers * layer_kept + head + loss_peak) * tokens + shared]
    grads_so_far = head_grad  # the head's backward: the logits' gradient (fp32, and cast back)
    points.append((s.layers * layer_kept + head + grad_logits) * tokens + shared + grads_so_far)
    for k in range(s.layers, 0, -1):  # each layer: its activations and the new gradients
        points.append((k * layer_kept + recompute) * tokens + dequant + shared + grads_so_far
                      + per_block_grad)
        grads_so_far += per_block_grad
    points.append(gradients)
    biggest = max((p.numel() for p in model.parameters()), default=0) if full else 0
    step_temp = 2 * biggest * grad_bytes  # AdamW (for-loop): sqrt and division temporaries
    points.append(gradients + step_temp)
    peak = weights + adapter + optimizer + max(points)

    return MemoryEstimate(method=method, weights=int(weights), adapter=int(adapter),
                          gradients=int(gradients), optimizer=int(optimizer),
                          activations=int(activations), peak=int(peak), params=int(params),
                          trainable_params=int(trainable))


PREFERENCE_OBJECTIVES = ("dpo", "ipo", "orpo", "simpo", "kto")
PREFERENCE_CHUNK_ROWS = 256  # rows of logits adaptune's preference trainers make at a time


def preference_tokens(objective: str, batch_size: int, seq_len: int, shared_prompt_tokens: int = 0) -> int:
    """Tokens one training step runs for ``objective`` (adaptune.training.preference).

    Pair objectives run two sequences of ``seq_len`` per pair, less ``shared_prompt_tokens`` when
    the pair's prompt is packed once (the default layout; 0 gives the upper bound). KTO runs one
    sequence per row (its KL term runs without gradients, so it adds nothing kept). Reference
    log-probabilities are cached: no second model and no reference activations. The output head
    runs chunked: no full logits, only the scored rows and their gradient (``2 h`` values a token)."""
    if objective == "sft":
        return batch_size * seq_len
    if objective not in PREFERENCE_OBJECTIVES:
        raise ConfigError(f"objective must be sft or one of {', '.join(PREFERENCE_OBJECTIVES)}, got {objective!r}")
    if objective == "kto":
        return batch_size * seq_len
    if not 0 <= shared_prompt_tokens < seq_len:
        raise ConfigError(f"shared_prompt_tokens must be in [0, seq_len), got {shared_prompt_tokens}")
    return batch_size * (2 * seq_len - shared_prompt_tokens)


def estimate_all(config_or_model: Any, batch_size: int, seq_len: int,
                 methods: Iterable[str] = METHODS, **kw: Any) -> list[MemoryEstimate]:
    """``estimate_training_memory`` for each method (the model is built once)."""
    model = _as_meta_model(config_or_model, trust_remote_code=kw.pop("trust_remote_code", False))
    return [estimate_training_memory(model, m, batch_size, seq_len, **kw) for m in methods]


def _human(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{n} B"


def format_estimates(estimates: Sequence[MemoryEstimate]) -> str:
    """A small table, one row per method, in GiB/MiB."""
    cols = ("method", "weights", "adapter", "gradients", "optimizer", "activations", "total",
            "peak")
    rows = [cols]
    for e in estimates:
        rows.append((e.method, _human(e.weights), _human(e.adapter), _human(e.gradients),
                     _human(e.optimizer), _human(e.activations), _human(e.total),
                     _human(e.peak)))
    widths = [max(len(r[j]) for r in rows) for j in range(len(cols))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("total: everything at once (an upper bound); peak: activations freed as "
                 "gradients appear (the better guess). Excludes CUDA context and allocator cache.")
    return "\n".join(lines)


__all__ = ["MemoryEstimate", "build_meta_model", "count_parameters", "estimate_all",
           "estimate_training_memory", "format_estimates", "nf4_bytes", "preference_tokens"]
