"""MaPO, Margin-aware Preference Optimization (Hong, Paul et al., arXiv 2406.06424), official code form.

Reference-free: no reference model, no reference forward.

.. math::

    L = \\mathrm{mean}_b(e_w) - β\\, \\mathrm{mean}_b\\Big(\\log σ\\big(T\\,[φ(s\\,e_w) - φ(s\\,e_l)]\\big)\\Big),
    \\qquad φ(u) = \\frac{u}{e^u - 1}

=====================  ===================================================================
argument               meaning (official ``mapo-t2i/mapo`` ``utils.py::compute_loss`` at 374b3d3)
=====================  ===================================================================
``model_w/l``          per-sample ε (or v) MSE of the policy on winner/loser, shape (B,)
``beta``               ``--beta_mapo`` = 0.1 (weight of the margin term; SFT term has weight 1)
``snr_value``          ``--snr_value`` s = 0.5
``num_train_timesteps``  T = 1000 (``noise_scheduler.config.num_train_timesteps``)
=====================  ===================================================================

φ is bounded in (0, 1] and decreasing; at u = 0 the official ``u / (exp(u) - 1)`` is 0/0, so we use ``expm1`` and
its Taylor series ``1 - u/2 + u²/12`` for |u| < 1e-4 (values and gradients finite at zero error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import ObjectiveOutput, PairErrors, register_objective
from .dpo import _check_shapes, dpo_metrics


def phi(u: torch.Tensor) -> torch.Tensor:
    """φ(u) = u / (e^u - 1), stable at u → 0 (limit 1)."""
    small = u.abs() < 1e-4
    u_safe = torch.where(small, torch.ones_like(u), u)  # keep the unused branch finite for autograd
    return torch.where(small, 1 - u / 2 + u * u / 12, u_safe / torch.expm1(u_safe))


def mapo_log_odds(model_w, model_l, snr_value: float = 0.5) -> torch.Tensor:
    """``φ(s e_w) - φ(s e_l)``, shape (B,): positive when the winner's error is lower."""
    return phi(snr_value * model_w) - phi(snr_value * model_l)


def mapo_loss(model_w, model_l, beta: float = 0.1, snr_value: float = 0.5, num_train_timesteps: int = 1000):
    """MaPO loss, mean over the batch, as a 0-d tensor. Inputs: per-sample errors of shape (B,)."""
    _check_shapes(model_w, model_l)
    ratio = F.logsigmoid(mapo_log_odds(model_w, model_l, snr_value) * num_train_timesteps)
    return model_w.mean() - beta * ratio.mean()


@dataclass
class MaPOConfig:
    beta: float = field(default=0.1, metadata={"help": "β_mapo, weight of the margin term (official 0.1)."})
    snr_value: float = field(default=0.5, metadata={"help": "s, scale inside φ (official 0.5)."})
    num_train_timesteps: int = field(default=1000, metadata={"help": "T multiplying the margin (official 1000)."})

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if not self.snr_value > 0:
            raise ValueError(f"snr_value: must be > 0, got {self.snr_value}")
        if not self.num_train_timesteps > 0:
            raise ValueError(f"num_train_timesteps: must be > 0, got {self.num_train_timesteps}")


@register_objective("mapo", MaPOConfig, needs_reference=False)
def build_mapo(config: MaPOConfig):
    """MaPO (Hong et al., 2024): reference-free margin + chosen-SFT objective."""

    def objective(errors: PairErrors) -> ObjectiveOutput:
        _check_shapes(errors.model_w, errors.model_l)
        margin = mapo_log_odds(errors.model_w, errors.model_l, config.snr_value) * config.num_train_timesteps
        losses = errors.model_w - config.beta * F.logsigmoid(margin)  # per pair; mean equals mapo_loss
        metrics = dpo_metrics(margin, errors)  # accuracy / margin of the MaPO log-odds, policy errors
        return ObjectiveOutput(losses.mean(), losses, metrics)

    return objective
