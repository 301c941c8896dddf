"""Per-sequence log-probabilities of a preference batch, in one forward, without the full logits.

A batch (``data.preference.PreferenceCollator``) holds sequences back to back in packed rows (or
padded rows); ``sequence_ids`` says which sequence each token belongs to and ``labels`` which
tokens are the answer. Position i predicts token i + 1 when both belong to the same sequence; the
predictions of answer tokens are summed per sequence. The model's body runs once; the output head
runs only on the positions needed, a chunk of rows at a time (``speedups.loss.token_log_probs``).
Models where the chunked path cannot be checked (or a DDP wrapper, which must run its own forward
for its gradient hooks) take the logits from their own forward instead: same numbers, more memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...speedups.loss import DEFAULT_CHUNK_ROWS, causal_lm_parts, supports_chunked_loss, token_log_probs

__all__ = ["SequenceLogps", "batch_log_probs"]


@dataclass
class SequenceLogps:
    """What one forward gives, per sequence of the batch (sequence s = ``sequence_ids == s``)."""

    logps: torch.Tensor              # sum of the answer tokens' log-probabilities
    answer_targets: torch.Tensor     # answer tokens predicted (the count behind a mean log-prob)
    answer_tokens: torch.Tensor      # answer tokens (TRL's IPO length: its completion mask)
    nll: torch.Tensor | None = None  # mean NLL over the first ``nll_sequences`` sequences (ORPO, CPO)


def _body_inputs(batch: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    out = {"input_ids": batch[prefix + "input_ids"]}
    for key in ("position_ids", "attention_mask"):
        if prefix + key in batch:
            out[key] = batch[prefix + key]
    return out


def _gather_log_probs(model: torch.nn.Module, inputs: dict[str, torch.Tensor], take: torch.Tensor,
                      targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """log p(target) at the positions ``take`` of the (rows, width - 1) prediction grid."""
    parts = causal_lm_parts(model) if supports_chunked_loss(model) else None
    if parts is not None:
        _, body, head = parts
        hidden = body(**inputs, use_cache=False)[0]
        return token_log_probs(hidden[:, :-1][take], head, targets, chunk_rows)
    logits = model(**inputs, use_cache=False).logits[:, :-1][take].float()
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(dim=1)


def batch_log_probs(model: torch.nn.Module, batch: dict[str, Any], prefix: str = "",
                    chunk_rows: int = DEFAULT_CHUNK_ROWS, nll_sequences: int = 0,
                    nll_prompt: bool = False) -> SequenceLogps:
    """Run ``model`` once on the ``prefix`` group of ``batch``; sums of answer log-probs per sequence.

    ``nll_sequences`` > 0 also gives the mean NLL of the tokens of sequences ``0 .. nll_sequences-1``
    (the chosen answers): of the answer tokens only, or with ``nll_prompt`` of every predicted token
    (ORPO's SFT term is over prompt and answer, as TRL computes it)."""
    ids, labels, seq = (batch[prefix + k] for k in ("input_ids", "labels", "sequence_ids"))
    count = int(seq.max()) + 1
    cur = seq[:, :-1]
    valid = (cur == seq[:, 1:]) & (cur >= 0)
    answer = valid & (labels[:, 1:] != -100)
    take = answer
    nll_mask = None
    if nll_sequences:
        nll_mask = (valid if nll_prompt else answer) & (cur < nll_sequences)
        take = answer | nll_mask
    targets = ids[:, 1:][take]
    logps = _gather_log_probs(model, _body_inputs(batch, prefix), take, targets, chunk_rows)
    segs = cur[take].to(logps.device)
    is_answer = answer[take].to(logps.device)
    ones = torch.ones_like(logps[is_answer])
    token_seq = seq[(labels != -100) & (seq >= 0)].to(logps.device)
    out = SequenceLogps(
        logps=logps.new_zeros(count).index_add(0, segs[is_answer], logps[is_answer]),
        answer_targets=logps.new_zeros(count).index_add(0, segs[is_answer], ones.detach()),
        answer_tokens=logps.new_zeros(count).index_add(0, token_seq, torch.ones_like(token_seq, dtype=logps.dtype)),
    )
    if nll_mask is not None:
        out.nll = -logps[nll_mask[take].to(logps.device)].mean()
    return out
