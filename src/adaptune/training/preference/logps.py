"""Per-sequence log-probabilities of a preference batch, in one forward, without the full logits.

A batch (``data.preference.PreferenceCollator``) lists the predictions to score: the flat position
of the output that predicts each scored token (``target_index``), the token, its sequence, and
whether it is an answer token. The model's body runs once over the rows; the output head runs only
at those positions, a chunk of rows at a time (``speedups.loss.token_log_probs``), and the answer
tokens' log-probabilities are summed per sequence. Models where the chunked path cannot be checked
(or a DDP wrapper, which must run its own forward for its gradient hooks) take the logits from
their own forward instead: the same numbers, more memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...speedups.loss import DEFAULT_CHUNK_ROWS, causal_lm_parts, supports_chunked_loss, token_log_probs

__all__ = ["SequenceLogps", "batch_log_probs"]


@dataclass
class SequenceLogps:
    """What one forward gives, per sequence of the batch."""

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


def _scored_log_probs(model: torch.nn.Module, inputs: dict[str, torch.Tensor], index: torch.Tensor,
                      targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """log p(target) of the outputs at the flat positions ``index`` of the rows."""
    parts = causal_lm_parts(model) if supports_chunked_loss(model) else None
    if parts is not None:
        _, body, head = parts
        hidden = body(**inputs, use_cache=False)[0]
        return token_log_probs(hidden.reshape(-1, hidden.shape[-1])[index], head, targets, chunk_rows)
    logits = model(**inputs, use_cache=False).logits
    logits = logits.reshape(-1, logits.shape[-1])[index].float()
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(dim=1)


def batch_log_probs(model: torch.nn.Module, batch: dict[str, Any], prefix: str = "",
                    chunk_rows: int = DEFAULT_CHUNK_ROWS, nll_sequences: int = 0,
                    nll_prompt: bool = False) -> SequenceLogps:
    """Run ``model`` once on the ``prefix`` group of ``batch``; sums of answer log-probs per sequence.

    ``nll_sequences`` > 0 also gives the mean NLL of the tokens of sequences ``0 .. nll_sequences-1``
    (the chosen answers): of the answer tokens only, or with ``nll_prompt`` of every scored token
    (ORPO's SFT term is over prompt and answer, as TRL computes it)."""
    seq, answer = batch[prefix + "target_sequence"], batch[prefix + "target_answer"]
    lengths = batch[prefix + "answer_tokens"]
    take = answer if not nll_sequences or not nll_prompt else answer | (seq < nll_sequences)
    logps = _scored_log_probs(model, _body_inputs(batch, prefix), batch[prefix + "target_index"][take],
                              batch[prefix + "target_ids"][take], chunk_rows)
    segs, is_answer = seq[take].to(logps.device), answer[take].to(logps.device)
    count = lengths.numel()
    out = SequenceLogps(
        logps=logps.new_zeros(count).index_add(0, segs[is_answer], logps[is_answer]),
        answer_targets=logps.new_zeros(count).index_add(0, segs[is_answer], torch.ones_like(logps[is_answer])),
        answer_tokens=lengths.to(logps.device, logps.dtype),
    )
    if nll_sequences:
        in_nll = segs < nll_sequences
        if not nll_prompt:
            in_nll &= is_answer
        out.nll = -logps[in_nll].mean()
    return out
