"""Robot preference losses: pure functions of per-sample errors or rewards (no model calls).

Two families live here:

* **Diffusion-DPO on action chunks** in two forms. ``logsigmoid`` *is* :func:`diffalign.objectives.dpo_loss` (official
  Diffusion-DPO: ``-log σ(-β/2 · Δ)``); ``deformpam`` is the DeformPAM code's bounded variant ``-σ(-β · Δ)`` with no 1/2,
  β = 100 (``xiaoxiaoxh/DeformPAM`` @ 976b297, ``learning/net/primitive_diffusion.py``, ``diffusion_dpo_loss``). Both
  share the logit :func:`diffalign.objectives.dpo_logits`; the DeformPAM logit is that function at 2β.
* **RAPL triplet losses** (Tian et al., "What Matters to You? Towards Visual Representation Alignment for Robot
  Learning", ICLR 2024, https://arxiv.org/abs/2310.07932) on optimal-transport rewards ``R(B|A)``, ``R(C|A)``.

.. math::

    Δ = (e_θ^w - e_{ref}^w) - (e_θ^l - e_{ref}^l), \\qquad
    L_{logsigmoid} = -\\log σ(-\\tfrac{β}{2} Δ), \\qquad L_{deformpam} = -σ(-β Δ)

    p = \\frac{e^{R(B|A)}}{e^{R(B|A)} + e^{R(C|A)}} = σ(R(B|A) - R(C|A)), \\qquad
    L_{bt} = -\\log p, \\qquad L_{rapl\\_code} = 1 - p, \\qquad L_{tie} = (0.5 - p)^2

=============  ========================================================================
argument       symbol
=============  ========================================================================
``model_w``    :math:`e_θ^w`, per-sample mean squared ε-error of the winner, (B,)
``ref_w``      :math:`e_{ref}^w` (frozen reference), (B,)
``beta``       β (Diffusion-DPO official: 5000 on SD latents; DeformPAM configs: 100)
``r_better``   :math:`R(B|A)`: OT reward of the middle trajectory against the anchor, (B,)
``r_worse``    :math:`R(C|A)`, (B,)
=============  ========================================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..objectives import dpo_logits, dpo_loss

DPO_FORMS = ("logsigmoid", "deformpam")
TRIPLET_FORMS = ("rapl_code", "bt")
REDUCTIONS = ("sum", "mean")
TIE_MODES = ("drop", "sft")


def deformpam_logits(model_w, model_l, ref_w, ref_l, beta: float = 100.0) -> torch.Tensor:
    """``-β [(model_w - ref_w) - (model_l - ref_l)]``, shape (B,); equals ``dpo_logits(..., beta=2β)``."""
    return dpo_logits(model_w, model_l, ref_w, ref_l, beta=2.0 * beta)


def deformpam_loss(model_w, model_l, ref_w, ref_l, beta: float = 100.0) -> torch.Tensor:
    """DeformPAM's coded DPO loss, mean over the batch (0-d): ``mean(-sigmoid(-beta * Δ))``.

    Bounded in [-1, 0]; its gradient ``σ(x)(1 - σ(x))`` vanishes for confidently wrong pairs too (noise-robust).
    Identical policy and reference give -1/2.
    """
    return -torch.sigmoid(deformpam_logits(model_w, model_l, ref_w, ref_l, beta)).mean()


def pair_dpo_losses(model_w, model_l, ref_w, ref_l, *, beta: float, form: str = "logsigmoid") -> torch.Tensor:
    """Per-pair losses (B,) of the chosen form; the mean of the result equals :func:`dpo_loss` /
    :func:`deformpam_loss` at the same β."""
    if form == "logsigmoid":
        return -F.logsigmoid(dpo_logits(model_w, model_l, ref_w, ref_l, beta))
    if form == "deformpam":
        return -torch.sigmoid(deformpam_logits(model_w, model_l, ref_w, ref_l, beta))
    raise ValueError(f"form must be one of {DPO_FORMS}, got {form!r}")


def pair_logits(model_w, model_l, ref_w, ref_l, *, beta: float, form: str = "logsigmoid") -> torch.Tensor:
    """The argument of the link function for ``form`` (positive = the policy prefers the winner more than ref)."""
    if form == "logsigmoid":
        return dpo_logits(model_w, model_l, ref_w, ref_l, beta)
    if form == "deformpam":
        return deformpam_logits(model_w, model_l, ref_w, ref_l, beta)
    raise ValueError(f"form must be one of {DPO_FORMS}, got {form!r}")


def preference_losses_with_ties(
    model_w, model_l, ref_w, ref_l, tie: torch.Tensor, *, beta: float, form: str = "logsigmoid",
    tie_mode: str = "drop", sft_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and validity mask (B,) for a batch where ``tie`` (B,) bool marks equally good pairs.

    Strict pairs get the DPO loss of ``form``. Ties are dropped (``tie_mode="drop"``, the DeformPAM configs and
    official Diffusion-DPO) or get the SFT term ``sft_weight · (e_θ^w + e_θ^l)/2`` (``"sft"``, DeformPAM's
    ``use_sft_for_equal_samples``). Reduce with ``(losses * valid).sum() / valid.sum().clamp(min=1)`` as the
    DeformPAM code does.
    """
    if tie_mode not in TIE_MODES:
        raise ValueError(f"tie_mode must be one of {TIE_MODES}, got {tie_mode!r}")
    strict = pair_dpo_losses(model_w, model_l, ref_w, ref_l, beta=beta, form=form)
    sft = sft_weight * 0.5 * (model_w + model_l)
    losses = torch.where(tie, sft, strict)
    valid = (~tie) | (tie_mode == "sft")
    return losses * valid, valid.float()


def triplet_probability(r_better: torch.Tensor, r_worse: torch.Tensor) -> torch.Tensor:
    """``p = exp R(B|A) / (exp R(B|A) + exp R(C|A)) = σ(R(B|A) - R(C|A))``, (B,)."""
    return torch.sigmoid(r_better - r_worse)


def rapl_triplet_loss(r_better: torch.Tensor, r_worse: torch.Tensor, *, form: str = "rapl_code",
                      tie: torch.Tensor | None = None) -> torch.Tensor:
    """Per-triplet RAPL losses (B,); the author code sums them over the batch (``torch.sum``).

    ``rapl_code`` (default): ``1 - p``, the author code's contrastive term (``thomasrantian/mvp``
    ``preference_representation_train``, c4ef8e2 and HEAD). ``bt``: Bradley-Terry ``-log p`` (computed as
    ``-logsigmoid(ΔR)`` for stability), which the author code does not use.
    Rows where ``tie`` is True instead get ``(0.5 - p)²`` (the HEAD script's "equally good" term).
    """
    if form not in TRIPLET_FORMS:
        raise ValueError(f"form must be one of {TRIPLET_FORMS}, got {form!r}")
    margin = r_better - r_worse
    losses = -F.logsigmoid(margin) if form == "bt" else 1.0 - torch.sigmoid(margin)
    if tie is not None:
        losses = torch.where(tie, (0.5 - torch.sigmoid(margin)).square(), losses)
    return losses


__all__ = [
    "DPO_FORMS",
    "REDUCTIONS",
    "TIE_MODES",
    "TRIPLET_FORMS",
    "deformpam_logits",
    "deformpam_loss",
    "dpo_loss",
    "pair_dpo_losses",
    "pair_logits",
    "preference_losses_with_ties",
    "rapl_triplet_loss",
    "triplet_probability",
]
