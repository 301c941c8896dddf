"""The preference objectives as pure functions of per-sequence log-probabilities.

Names and formulas are TRL's (checked against the installed TRL in ``tests/test_preference_trl.py``):
``dpo_loss`` (DPOTrainer's sigmoid, hinge, ipo and robust losses), ``odds_ratio_loss`` (ORPO),
``cpo_loss`` (CPO and SimPO) and ``kto_loss`` (KTO). Each returns per-example losses and the
rewards that get logged; the trainers average them. Log-probabilities are sums over the answer's
tokens (``dpo_loss``, ``kto_loss``) or, for ORPO, SimPO and IPO-style CPO, their means.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...errors import ConfigError

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")

__all__ = ["CPO_LOSS_TYPES", "DPO_LOSS_TYPES", "KTO_LOSS_TYPES", "cpo_loss", "dpo_loss", "kto_kl", "kto_loss",
           "log1mexp", "odds_ratio_loss"]


def _check(loss_type: str, allowed: Sequence[str], who: str) -> None:
    if loss_type not in allowed:
        raise ConfigError(f"{who} loss_type must be one of {', '.join(allowed)}, got {loss_type!r}")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's per-pair losses and the rewards ``beta * (logp - ref_logp)`` of chosen and rejected.

    - ``sigmoid`` (Rafailov et al. 2023): ``-log sigmoid(beta * delta)``, delta the difference of
      the two log-ratios;
    - ``hinge`` (SLiC): ``relu(1 - beta * delta)``;
    - ``ipo`` (Azar et al. 2023, eq. 17): ``(delta' - 1 / (2 beta))^2`` where delta' uses the
      log-ratios divided by the answers' token counts (``*_lengths``), as TRL does;
    - ``robust`` (Chowdhury et al. 2024): the sigmoid loss unbiased for labels flipped with
      probability ``label_smoothing`` (in [0, 0.5)).
    """
    _check(loss_type, DPO_LOSS_TYPES, "DPO")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs the answers' token counts (chosen_lengths, rejected_lengths)")
        ipo_delta = (chosen_logratios / chosen_lengths.clamp(min=1.0)
                     - rejected_logratios / rejected_lengths.clamp(min=1.0))
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    else:
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branch at -ln 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float = 0.1,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4 and 7), from mean token log-probs.

    Returns ``(beta * log sigmoid(log odds ratio)`` per pair, chosen rewards, rejected rewards,
    mean log sigmoid term, mean log odds); ORPO's loss is the chosen NLL minus the first's mean."""
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    ratio = F.logsigmoid(log_odds)
    return (beta * ratio, beta * chosen_logps.detach(), beta * rejected_logps.detach(), ratio.mean(),
            log_odds.mean())


def cpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPO's losses (Xu et al. 2024) and SimPO's (``loss_type="simpo"``, Meng et al. 2024: mean
    token log-probs, a target margin ``simpo_gamma``), with rewards ``beta * logp``. No reference."""
    _check(loss_type, CPO_LOSS_TYPES, "CPO")
    logits = chosen_logps - rejected_logps
    if loss_type in ("simpo", "sigmoid"):
        if loss_type == "simpo":
            logits = logits - simpo_gamma / beta
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the mean log-ratio of mismatched (prompt, answer) pairs, clamped at
    0 and detached (Ethayarajh et al. 2024, eq. 7, as TRL estimates it)."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, kl: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto",
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO's per-example losses (desirable ones first, each group weighted) and rewards.

    ``kto``: ``1 - sigmoid(beta (logratio - kl))`` for desirable answers and ``1 - sigmoid(beta
    (kl - logratio))`` for undesirable ones; ``apo_zero_unpaired`` (APO, D'Oosterlinck et al. 2024)
    drops the KL term. The loss is the mean of all of them."""
    _check(loss_type, KTO_LOSS_TYPES, "KTO")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * chosen_logratios)
        rejected_losses = torch.sigmoid(beta * rejected_logratios)
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
