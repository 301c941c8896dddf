"""Causal-LM loss without the full logits tensor: output head + cross-entropy only where labels
are set, a chunk of rows at a time.

A causal LM computes ``logits = lm_head(body(inputs))`` for *every* position (tokens x vocabulary,
fp32: 1024 tokens x 49,152 = 200 MB, then as much again for log-softmax and its gradient) and then
drops the positions whose next label is -100 (padding, prompts, the first token of each packed
example). :func:`causal_lm_loss` runs the body to hidden states instead, keeps only the positions
that have a label, and runs the head + cross-entropy on ``chunk_rows`` of them at a time:

- a frozen ``nn.Linear`` head (LoRA, prompt methods, tied embeddings): a fused autograd function
  computes each chunk's loss *and* its gradient with respect to the hidden states in the forward
  pass (``(softmax - onehot) @ W``), keeps that small (rows x hidden) gradient and frees the
  logits. No logits are kept for backward and none are recomputed, so the FLOPs are those of the
  plain path and the memory is one chunk of logits. Under fp16/bf16 autocast both products run in
  that dtype, as ``F.linear`` would; the softmax is fp32 either way.
- any other head (trainable weights, a LoRA-wrapped or ``modules_to_save`` head): each chunk runs
  under ``torch.utils.checkpoint``, so its logits are recomputed in backward instead of kept.

The loss is transformers' ``ForCausalLMLoss``: the sum of token cross-entropies divided by
``num_items_in_batch`` when given (how ``Trainer`` normalises over gradient accumulation), else by
the number of label tokens. Which models qualify is checked once per model
(:func:`supports_chunked_loss`): a decoder-only causal LM whose logits are exactly
``head(base_model(...).last_hidden_state)``, verified numerically on a short probe, so models that
scale or soft-cap logits (Gemma 2, Cohere, Granite...) fall back to the plain path.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..wrappers import active_config, adapter_base, is_causal_lm_class

IGNORE_INDEX = -100
DEFAULT_CHUNK_ROWS = 256  # 256 x 49,152 fp32 logits = 50 MB at a time for SmolLM2

# Batch keys the body takes the same way the full model does; anything else -> plain path.
BODY_KEYS = frozenset({"input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids"})

__all__ = ["DEFAULT_CHUNK_ROWS", "causal_lm_loss", "causal_lm_parts", "linear_cross_entropy",
           "sequence_log_probs", "supports_chunked_loss", "token_log_probs"]


# ---- the head + cross-entropy --------------------------------------------------------------------


def _softmax_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor,
                                                                            torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each chunk of rows of ``hidden @ weight.T + bias``: ``(start, targets, picked, probs, norm,
    lse)``, with ``picked`` the targets' logits, ``probs`` the unnormalised softmax (written over the
    logits), ``norm`` its row sums and ``lse`` the rows' log-sum-exp, all fp32.

    The products run in ``weight``'s dtype. One logits buffer (and one fp32 one for 16-bit products)
    serves all chunks, worked on in place: a fresh 50 MB tensor per chunk costs page faults that, on
    a CPU, take longer than the arithmetic. A chunk's tensors are overwritten by the next one."""
    buffer = buffer32 = None
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        rows = h.shape[0]
        if buffer is None:
            buffer = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=hidden.device)
            if weight.dtype != torch.float32:
                buffer32 = torch.empty(rows, weight.shape[0], dtype=torch.float32, device=hidden.device)
        logits = buffer[:rows]
        torch.matmul(h, weight.T, out=logits)
        if bias is not None:
            logits += bias
        if buffer32 is not None:  # as transformers: head in model dtype, softmax in fp32
            logits = buffer32[:rows].copy_(logits)
        picked = logits.gather(1, t[:, None]).squeeze(1)
        peak = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(peak).exp_()
        norm = probs.sum(dim=1, keepdim=True)
        yield start, t, picked, probs, norm, norm.log().add_(peak).squeeze(1)


def _product_into(probs: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """``out = probs @ weight`` with the product in ``weight``'s dtype."""
    if out.dtype == weight.dtype:
        torch.matmul(probs.to(weight.dtype), weight, out=out)
    else:
        out.copy_(probs.to(weight.dtype) @ weight)


class _FrozenLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ W.T + b, target_i) for a frozen W, b; grad w.r.t. hidden made in forward.

    ``compute_dtype`` (autocast's, or None) is the dtype of both products, as ``F.linear`` under
    autocast would run them; the softmax and the loss are fp32 either way."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_rows: int, want_grad: bool,
                compute_dtype: torch.dtype | None) -> torch.Tensor:
        low = compute_dtype or weight.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(low)  # no copies unless autocast asks for a cast
            b = bias.to(low) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden) if want_grad else None
            for start, t, picked, probs, norm, lse in _softmax_chunks(hidden.to(low), w, b, targets, chunk_rows):
                total += (lse - picked).sum()
                if want_grad:  # d CE / d h = (softmax - onehot) @ W
                    probs.div_(norm)
                    probs[torch.arange(len(t), device=t.device), t] -= 1.0
                    _product_into(probs, w, grad[start:start + len(t)])
        ctx.save_for_backward(grad if want_grad else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None, None


def _chunk_ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _head_is_frozen_linear(head: nn.Module) -> bool:
    return type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())


def _chunked_head(fused: type[torch.autograd.Function], per_chunk: Callable, combine: Callable,
                  hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """``fused`` on a frozen plain Linear head (its gradient made in forward, no logits kept); any
    other head runs ``per_chunk`` a chunk of rows at a time, under activation checkpointing when a
    gradient is wanted (so backward also holds one chunk's logits at a time), and ``combine`` joins
    the parts. Products run in autocast's dtype when it is on, as ``F.linear`` would run them."""
    chunk_rows = max(int(chunk_rows), 1)
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if _head_is_frozen_linear(head):
        return fused.apply(hidden, head.weight, head.bias, targets, chunk_rows, want_grad, compute_dtype)
    trainable_head = torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters())
    parts = []
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        if want_grad or trainable_head:
            parts.append(torch.utils.checkpoint.checkpoint(per_chunk, head, h, t, use_reentrant=False))
        else:
            parts.append(per_chunk(head, h, t))
    return combine(parts)


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """``F.cross_entropy(head(hidden).float(), targets, reduction="sum")`` for (n, d) hidden rows,
    ``chunk_rows`` rows at a time; the same value and gradients, without all n x vocab logits."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph (and the grad) well formed
    return _chunked_head(_FrozenLinearCrossEntropy, _chunk_ce_sum, _sum_in_order, hidden, head, targets,
                         chunk_rows)


def _sum_in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(operator.add, parts)


# ---- which models -----------------------------------------------------------------------------------


def _transformers_model(model: nn.Module) -> nn.Module | None:
    """The transformers model inside an adapter wrapper (LoRA-style only: prompt methods add their
    virtual tokens in the wrapper's forward), or the model itself."""
    import transformers

    if isinstance(model, transformers.PreTrainedModel):
        return model
    base = adapter_base(model)
    config = active_config(model) if base is not None else None
    if config is None or getattr(config, "is_prompt_learning", False):
        return None
    return base if isinstance(base, transformers.PreTrainedModel) else None


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    """``(transformers model, body, head)`` when the model looks like body -> head, else None."""
    base = _transformers_model(model)
    if base is None or not is_causal_lm_class(base):
        return None
    config = getattr(base, "config", None)
    body = getattr(base, "base_model", None)
    head = base.get_output_embeddings() if callable(getattr(base, "get_output_embeddings", None)) else None
    if body is None or body is base or head is None:
        return None
    # Known logit transforms (the probe below would catch them too): no need to run it for these.
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return None
    return base, body, head


def _probe_matches(base: nn.Module, body: nn.Module, head: nn.Module) -> bool:
    """Whether head(body(x)) gives the model's own logits on a short input (checked once)."""
    was_training = base.training
    try:
        param = next(base.parameters())
        vocab = base.get_input_embeddings().num_embeddings
        ids = (torch.arange(1, 7, device=param.device) * 7919 % max(vocab - 1, 1) + 1)[None]
        base.eval()
        with torch.no_grad():
            ref = base(input_ids=ids, use_cache=False).logits.float()
            hidden = body(input_ids=ids, use_cache=False)[0]
            got = head(hidden).float()
    except Exception:  # noqa: BLE001 - any failure means "not the simple layout"
        return False
    finally:
        base.train(was_training)
    tol = (1e-4 if param.dtype == torch.float32 else 2e-2) * max(1.0, ref.abs().max().item())
    return got.shape == ref.shape and bool((got - ref).abs().max() <= tol)


def _sharded_by_fsdp2(model: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) shards any of ``model``'s modules. It gathers the weights of
    a sharded module in hooks on that module's own forward; calling the body and the head apart,
    as the chunked loss does, would go around the root's hooks and leave its weights sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether :func:`causal_lm_loss` computes this model's own loss (probed once per model)."""
    parts = causal_lm_parts(model)
    if parts is None or _sharded_by_fsdp2(model):
        return False
    base, body, head = parts
    cached = base.__dict__.get("_adaptune_chunked_loss")
    key = (id(body), id(head))
    if cached is None or cached[0] != key:
        cached = (key, _probe_matches(base, body, head))
        base.__dict__["_adaptune_chunked_loss"] = cached
    return cached[1]


# ---- the loss -----------------------------------------------------------------------------------------


def causal_lm_loss(model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None,
                   chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[torch.Tensor, int]:
    """The causal-LM loss of ``model`` on ``inputs`` (with ``labels``), as transformers computes it.

    Returns ``(loss, label_tokens)``: loss = sum of CE over positions whose next label is not -100,
    divided by ``num_items_in_batch`` if given, else by their count (NaN for none, as transformers).
    Call :func:`supports_chunked_loss` first; batch keys other than ``labels``, ``shift_labels`` and
    the body's inputs raise ``ValueError``.
    """
    parts = causal_lm_parts(model)
    if parts is None:
        raise ValueError("this model is not a plain body -> head causal LM")
    _, body, head = parts
    unknown = set(inputs) - BODY_KEYS - {"labels", "shift_labels"}
    if unknown:
        raise ValueError(f"batch keys the chunked loss does not handle: {sorted(unknown)}")
    body_inputs = {k: v for k, v in inputs.items() if k in BODY_KEYS}
    hidden = body(**body_inputs, use_cache=False)[0]
    shift = inputs.get("shift_labels")
    if shift is None:  # position i predicts label i + 1; the last position predicts nothing
        shift = F.pad(inputs["labels"][..., 1:], (0, 1), value=IGNORE_INDEX)
    keep = shift != IGNORE_INDEX
    targets = shift[keep]
    rows = hidden[keep]
    total = linear_cross_entropy(rows, head, targets.to(rows.device), chunk_rows)
    count = int(targets.numel())
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch, count
    return total / count, count  # 0 / 0 = NaN for a batch without labels, as transformers


# ---- per-token log-probabilities (preference training) ----------------------------------------------


class _FrozenLinearTokenLogProbs(torch.autograd.Function):
    """log_softmax(hidden_i @ W.T + b)[target_i] for a frozen W, b, one value per row.

    Each row's value depends on that row's hidden state only, so its gradient is one (hidden,)
    vector per row, ``W[target_i] - softmax_i @ W``: made in forward, chunk by chunk, and scaled by
    the incoming per-row gradient in backward. As in :class:`_FrozenLinearCrossEntropy`, no logits
    are kept and none are recomputed."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_rows: int, want_grad: bool,
                compute_dtype: torch.dtype | None) -> torch.Tensor:
        low = compute_dtype or weight.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(low)
            b = bias.to(low) if bias is not None else None
            out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            jac = torch.empty_like(hidden) if want_grad else None
            for start, t, picked, probs, norm, lse in _softmax_chunks(hidden.to(low), w, b, targets, chunk_rows):
                out[start:start + len(t)] = picked - lse
                if want_grad:  # d logp / d h = onehot @ W - softmax @ W, written as -(softmax - onehot) @ W
                    probs.div_(norm).neg_()
                    probs[torch.arange(len(t), device=t.device), t] += 1.0
                    _product_into(probs, w, jac[start:start + len(t)])
        ctx.save_for_backward(jac if want_grad else hidden.new_empty(0))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (jac,) = ctx.saved_tensors
        return jac * grad_out.to(jac.dtype)[:, None], None, None, None, None, None, None


def _chunk_token_log_probs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(dim=1)


def token_log_probs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """``log_softmax(head(hidden).float())[i, targets[i]]`` for (n, d) hidden rows: an (n,) fp32
    tensor, made ``chunk_rows`` rows at a time, with the same values and gradients as the full
    logits would give but never all n x vocab of them (preference losses need per-sequence sums of
    these, :func:`sequence_log_probs`)."""
    if hidden.shape[0] == 0:
        return hidden.sum(dim=1).float() * 0.0
    return _chunked_head(_FrozenLinearTokenLogProbs, _chunk_token_log_probs, torch.cat, hidden, head, targets,
                         chunk_rows)


def sequence_log_probs(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, segments: torch.Tensor,
                       num_segments: int, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Per-segment sums of :func:`token_log_probs`: row i adds to ``segments[i]`` (in
    ``[0, num_segments)``); a (num_segments,) fp32 tensor, e.g. the log-probability of each chosen
    and rejected completion packed into a batch."""
    logps = token_log_probs(hidden, head, targets, chunk_rows)
    return logps.new_zeros(num_segments).index_add(0, segments.to(logps.device), logps)
