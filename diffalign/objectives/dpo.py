"""Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024,
https://arxiv.org/abs/2311.12908), in the official code's convention.

.. math::

    L(θ) = -\\mathbb{E}\\, \\log σ\\Big(-\\tfrac{β}{2}\\big[(e_θ^w - e_{ref}^w) - (e_θ^l - e_{ref}^l)\\big]\\Big)

with :math:`e = \\mathrm{mean}_{C,H,W}(\\lVert \\text{target} - \\hat{x}_θ(x_t, t, c)\\rVert^2)` the per-sample denoising error
(paper Eq. 14 with T·ω(λ_t) folded into β, supplement Eq. 46 for the 1/2). Winner and loser share t and noise.

=============  =====================================================
argument       paper symbol
=============  =====================================================
``model_w``    :math:`\\lVert ε^w - ε_θ(x_t^w, t)\\rVert^2` (mean over latent dims)
``ref_w``      :math:`\\lVert ε^w - ε_{ref}(x_t^w, t)\\rVert^2`
``beta``       β (paper: 2000 for SD1.5, 5000 for SDXL; official launchers 5000 for both)
=============  =====================================================

Convention note: the diffusers SD1.5 example uses β=2500 *without* the 1/2, which is the same logit as β=5000 here.
Reference code: SalesforceAIResearch/DiffusionDPO ``train.py`` at 5233e75 (loss under ``START LOSS COMPUTATION``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import ObjectiveOutput, PairErrors, register_objective


def dpo_logits(model_w, model_l, ref_w, ref_l, beta: float = 5000.0) -> torch.Tensor:
    """The argument of log σ, shape (B,): ``-0.5 β [(model_w - ref_w) - (model_l - ref_l)]``.

    Positive when the policy lowered the winner's error relative to the loser's (the implicit reward margin).
    """
    return -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))


def dpo_loss(model_w, model_l, ref_w, ref_l, beta: float = 5000.0) -> torch.Tensor:
    """Diffusion-DPO loss, mean over the batch, as a 0-d tensor. All inputs have shape (B,).

    ``loss = mean(-logsigmoid(-0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))))``
    """
    _check_shapes(model_w, model_l, ref_w, ref_l)
    return -F.logsigmoid(dpo_logits(model_w, model_l, ref_w, ref_l, beta)).mean()


def dpo_metrics(logits: torch.Tensor, errors: PairErrors) -> dict[str, float]:
    """Fixed metric names shared by every DPO-family objective.

    ``rewards/accuracies`` counts a pair as won when its logit is > 0 and as half when it is exactly 0 (policy ==
    reference), so it reads 0.5 at initialisation instead of the official code's 0.
    """
    with torch.no_grad():
        acc = (logits > 0).float() + 0.5 * (logits == 0).float()
        out = {
            "rewards/accuracies": acc.mean().item(),
            "rewards/margins": logits.mean().item(),
            "errors/policy_w": errors.model_w.mean().item(),
            "errors/policy_l": errors.model_l.mean().item(),
        }
        if errors.ref_w is not None:
            out["errors/ref_w"] = errors.ref_w.mean().item()
            out["errors/ref_l"] = errors.ref_l.mean().item()
    return out


def _check_shapes(*tensors):
    shape = tensors[0].shape
    if len(shape) != 1:
        raise ValueError(f"expected per-sample errors of shape (B,), got {tuple(shape)}")
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"all error tensors must share shape {tuple(shape)}, got {tuple(t.shape)}")


@dataclass
class DPOConfig:
    beta: float = field(
        default=5000.0,
        metadata={"help": "β of Diffusion-DPO in the official convention (the 1/2 is inside the loss). Paper: 2000 "
                  "(SD1.5), 5000 (SDXL); official launchers: 5000."},
    )

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")


@register_objective("dpo", DPOConfig, needs_reference=True)
def build_dpo(config: DPOConfig):
    """Diffusion-DPO (Wallace et al., 2024), official convention."""

    def objective(errors: PairErrors) -> ObjectiveOutput:
        _check_shapes(errors.model_w, errors.model_l, errors.ref_w, errors.ref_l)
        logits = dpo_logits(errors.model_w, errors.model_l, errors.ref_w, errors.ref_l, config.beta)
        losses = -F.logsigmoid(logits)
        return ObjectiveOutput(losses.mean(), losses, dpo_metrics(logits, errors))

    return objective
