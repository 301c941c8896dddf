"""``DPOTrainer``, ``ORPOTrainer``, ``CPOTrainer`` and ``KTOTrainer``: TRL's objectives on adaptune's
Trainer (what they share, and how it differs from TRL, is in :mod:`.base`).

Each turns one batch's per-sequence log-probabilities (:mod:`.logps`) into the loss with the pure
functions of :mod:`.losses`, and logs TRL's metrics (``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/*``; ``nll_loss``, ``kl``...).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import PreferenceTrainer, reward_metrics
from .config import CPOConfig, DPOConfig, KTOConfig, ORPOConfig
from .logps import batch_log_probs
from .losses import cpo_loss, dpo_loss, kto_kl, kto_loss, odds_ratio_loss

__all__ = ["CPOTrainer", "DPOTrainer", "KTOTrainer", "ORPOTrainer"]


class DPOTrainer(PreferenceTrainer):
    """Direct Preference Optimization (Rafailov et al. 2023); ``loss_type`` sigmoid, hinge, ipo, robust."""

    config_class = DPOConfig

    def reference_values(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        out = batch_log_probs(model, inputs, chunk_rows=self.args.loss_chunk_rows)
        return torch.stack(out.logps.chunk(2), dim=1)

    def get_batch_loss_metrics(self, model, inputs):
        args = self.args
        ref = self._reference_logps(model, inputs)  # first: an adapter reference is swapped into the weights
        out = batch_log_probs(model, inputs, chunk_rows=args.loss_chunk_rows)
        chosen, rejected = out.logps.chunk(2)
        chosen_len, rejected_len = out.answer_tokens.chunk(2)
        weights = args.loss_weights or [1.0] * len(args.loss_type)
        loss = 0.0
        for loss_type, weight in zip(args.loss_type, weights):
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref[:, 0], ref[:, 1], beta=args.beta, loss_type=loss_type,
                label_smoothing=args.label_smoothing, chosen_lengths=chosen_len, rejected_lengths=rejected_len)
            loss = loss + losses.mean() * weight
        return loss, reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected)


class ORPOTrainer(PreferenceTrainer):
    """Odds Ratio Preference Optimization (Hong et al. 2024): SFT on chosen + an odds-ratio term."""

    config_class = ORPOConfig
    uses_reference = False

    def get_batch_loss_metrics(self, model, inputs):
        pairs = len(inputs["index"])
        out = batch_log_probs(model, inputs, chunk_rows=self.args.loss_chunk_rows, nll_sequences=pairs,
                              nll_prompt=True)
        mean_logps = out.logps / out.answer_targets.clamp(min=1.0)
        chosen, rejected = mean_logps.chunk(2)
        ratio, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds = odds_ratio_loss(
            chosen, rejected, beta=self.args.beta)
        loss = out.nll - ratio.mean()
        metrics = reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
        metrics.update({"nll_loss": out.nll.item(), "log_odds_ratio": log_odds_ratio.item(),
                        "log_odds_chosen": log_odds.item()})
        return loss, metrics


class CPOTrainer(PreferenceTrainer):
    """Contrastive Preference Optimization (Xu et al. 2024); with ``loss_type="simpo"`` and
    ``cpo_alpha=0``, SimPO (Meng et al. 2024). No reference."""

    config_class = CPOConfig
    uses_reference = False

    def get_batch_loss_metrics(self, model, inputs):
        args = self.args
        pairs = len(inputs["index"])
        out = batch_log_probs(model, inputs, chunk_rows=args.loss_chunk_rows,
                              nll_sequences=pairs if args.cpo_alpha else 0)
        logps = out.logps / out.answer_targets.clamp(min=1.0) if args.loss_type in ("ipo", "simpo") else out.logps
        chosen, rejected = logps.chunk(2)
        losses, chosen_rewards, rejected_rewards = cpo_loss(
            chosen, rejected, beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing,
            simpo_gamma=args.simpo_gamma)
        nll = out.nll if out.nll is not None else torch.zeros((), device=losses.device)
        loss = losses.mean() + args.cpo_alpha * nll
        metrics = reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected)
        metrics["nll_loss"] = nll.item()
        return loss, metrics


class KTOTrainer(PreferenceTrainer):
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024): each answer labelled desirable or not."""

    config_class = KTOConfig
    kind = "kto"

    @property
    def _uses_kl(self) -> bool:
        return self.args.loss_type == "kto"

    def reference_values(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        logps = batch_log_probs(model, inputs, chunk_rows=self.args.loss_chunk_rows).logps
        kl = batch_log_probs(model, inputs, prefix="KL_", chunk_rows=self.args.loss_chunk_rows).logps \
            if self._uses_kl else torch.full_like(logps, float("nan"))
        return torch.stack([logps, kl], dim=1)

    def get_batch_loss_metrics(self, model, inputs):
        args = self.args
        ref = self._reference_logps(model, inputs)  # before the policy's forward, as in DPO
        out = batch_log_probs(model, inputs, chunk_rows=args.loss_chunk_rows)
        labels = inputs["label"].to(out.logps.device).bool()
        if self._uses_kl:
            with torch.no_grad():  # the KL term is a baseline: no gradient flows through it (as TRL)
                policy_kl = batch_log_probs(model, inputs, prefix="KL_", chunk_rows=args.loss_chunk_rows).logps
            kl = kto_kl(policy_kl, ref[:, 1])
        else:
            kl = torch.zeros(1, device=out.logps.device)
        chosen, rejected = out.logps[labels], out.logps[~labels]
        losses, chosen_rewards, rejected_rewards = kto_loss(
            chosen, rejected, ref[labels, 0], ref[~labels, 0], kl, beta=args.beta,
            desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
            loss_type=args.loss_type)
        metrics: dict[str, float] = {"kl": kl.item()}
        if len(chosen):
            metrics.update({"rewards/chosen": chosen_rewards.mean().item(), "logps/chosen": chosen.mean().item()})
        if len(rejected):
            metrics.update({"rewards/rejected": rejected_rewards.mean().item(),
                            "logps/rejected": rejected.mean().item()})
        if len(chosen) and len(rejected):
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return losses.nanmean(), metrics
