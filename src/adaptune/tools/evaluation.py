"""Perplexity: the one number that says whether fine-tuning helped, before and after."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


@torch.no_grad()
def perplexity(model: torch.nn.Module, features: Sequence[dict], collate: Callable[[list], dict],
               batch_size: int = 8) -> float:
    """exp(mean loss over every label token), token-weighted across batches (not batch-averaged)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    try:
        for start in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in collate(list(features[start:start + batch_size])).items()}
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits
            # prompt tuning / P-tuning return logits for their virtual tokens first: keep the input's
            logits = logits[:, logits.shape[1] - labels.shape[1]:-1].float()
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total_loss += loss.item()
            total_tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    if total_tokens == 0:
        return float("nan")
    return math.exp(total_loss / total_tokens)
