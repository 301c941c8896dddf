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
  ``autocast_adapter_dtype``). Targets are chosen by ``adaptune.tuners.targets.resolve_targets``, as
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
  (``adaptune.speedups.dropout``: the dropped input is made again in backward). The head keeps the final
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

**Preference training** (``objective="dpo"`` and the others): a step runs both answers of each pair
(``batch_size`` pairs, less the prompt tokens packed once: :func:`preference_tokens`), with the
reference's log-probabilities cached (no second model, no reference activations) and the output
head run in chunks of rows: no full logits, so the loss's work is two hidden-size vectors per token
and one chunk of logits.

Checked against measured CPU training steps in ``tests/test_memory.py`` (tensor bytes from
``torch.profiler``; the tolerances are there): close for LoRA and for full fine-tuning's ``peak``,
while ``total`` stays above full fine-tuning's measured peak.

The package: ``shapes`` reads the model, ``activations`` counts a layer's saved tensors,
``estimate`` adds everything up, and :func:`format_estimates` (here) prints the table.
"""

from __future__ import annotations

from collections.abc import Sequence

from .estimate import (
    ESTIMATED_METHODS,
    MemoryEstimate,
    count_parameters,
    estimate_all,
    estimate_training_memory,
    nf4_bytes,
    preference_tokens,
)
from .shapes import meta_model_from_config as build_meta_model

__all__ = ["ESTIMATED_METHODS", "MemoryEstimate", "build_meta_model", "count_parameters", "estimate_all",
           "estimate_training_memory", "format_estimates", "nf4_bytes", "preference_tokens"]


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
