"""SePPO, Semi-Policy Preference Optimization (Zhang et al., arXiv 2410.05255) — reconstructed.

**No official training code exists** (the repo ships evaluation only); this follows the reconstruction in our
research note (objectives.md §4), every piece of which is an explicit option. Data: winners only. The loser is
an on-policy sample :math:`x_r` of a reference checkpoint :math:`θ_{ref}` drawn from the previous checkpoints
(``reference_strategy``: ``uniform`` over all kept checkpoints [SePPO], ``initial`` [DITTO-like] or ``latest``
[SPIN-like]). With :math:`Δ_w = e_θ(x_w) - e_{ref}(x_w)` and :math:`Δ_r = e_θ(x_r) - e_{ref}(x_r)`:

.. math::

    L = -\\log σ\\Big(-\\tfrac{β}{2}\\,(Δ_w - s\\,Δ_r)\\Big), \\qquad
    s = \\operatorname{sign}\\big(e_{ref}(x_w) - e_θ(x_w)\\big) \\text{ (detached)}

The anchor-based adaptive flipper (AAF) reads the winner as an anchor: if the current policy denoises it
better than the reference (s = +1), the reference sample is treated as a loser (standard DPO); if the
reference is better (s = -1), its sample enters as a second winner; at a tie (s = 0, e.g. the snapshot equals
the policy) its term drops out. ``flipper: indicator`` uses s ∈ {1, 0} (drop the reference term instead of
flipping). β uses the Diffusion-DPO convention (1/2 inside), default 5000 like Diffusion-DPO (SePPO's own β
was not recovered).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import ObjectiveOutput, PairErrors, register_objective
from .dpo import DPOConfig, _check_shapes


def aaf_sign(model_w: torch.Tensor, ref_w: torch.Tensor, flipper: str = "sign") -> torch.Tensor:
    """Per-sample s, detached, shape (B,): ``sign(e_ref(x_w) - e_θ(x_w))`` (``sign``: +1, -1, and 0 at a tie)
    or ``1(e_ref(x_w) > e_θ(x_w))`` (``indicator``: 1 or 0).

    A tie (the reference snapshot equals the policy, as at the first step) gives s = 0 under both flippers:
    the reference sample's term drops out instead of being trained as a winner.
    """
    gap = (ref_w - model_w).detach()
    return torch.sign(gap) if flipper == "sign" else (gap > 0).to(gap.dtype)


def seppo_logits(model_w, model_r, ref_w, ref_r, beta: float = 5000.0, flipper: str = "sign"):
    s = aaf_sign(model_w, ref_w, flipper)
    return -0.5 * beta * ((model_w - ref_w) - s * (model_r - ref_r))


def seppo_loss(model_w, model_r, ref_w, ref_r, beta: float = 5000.0, flipper: str = "sign") -> torch.Tensor:
    """SePPO loss, mean over the batch (0-d). ``model_r``/``ref_r``: errors on the reference's own
    samples, (B,)."""
    _check_shapes(model_w, model_r, ref_w, ref_r)
    return -F.logsigmoid(seppo_logits(model_w, model_r, ref_w, ref_r, beta, flipper)).mean()


@dataclass
class SePPOConfig(DPOConfig):
    flipper: str = field(default="sign", metadata={"help": "AAF: sign (±1) or indicator (1/0)."})
    reference_strategy: str = field(default="uniform", metadata={"help": "uniform | initial | latest."})
    snapshot_every: int = field(default=30, metadata={"help": "Keep a reference checkpoint every N steps."})
    max_snapshots: int = field(default=7, metadata={
        "help": "K checkpoints kept in the pool (oldest dropped)."})
    sampling_steps: int = field(default=20, metadata={
        "help": "DDIM steps for the on-policy reference sample."})
    guidance_scale: float = 7.5

    def __post_init__(self):
        super().__post_init__()
        if self.flipper not in ("sign", "indicator"):
            raise ValueError(f"flipper: must be sign or indicator, got {self.flipper!r}")
        if self.reference_strategy not in ("uniform", "initial", "latest"):
            raise ValueError(f"reference_strategy: must be uniform, initial or latest, "
                             f"got {self.reference_strategy!r}")
        for name in ("snapshot_every", "max_snapshots", "sampling_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@register_objective("seppo", SePPOConfig, needs_reference=True)
def build_seppo(config: SePPOConfig):
    """SePPO (Zhang et al., 2024), reconstructed: winners vs. on-policy reference samples with AAF."""

    def objective(errors: PairErrors) -> ObjectiveOutput:
        # errors.model_l / ref_l are the errors on the reference sample x_r
        logits = seppo_logits(errors.model_w, errors.model_l, errors.ref_w, errors.ref_l, config.beta,
                              config.flipper)
        losses = -F.logsigmoid(logits)
        s = aaf_sign(errors.model_w, errors.ref_w, config.flipper)
        metrics = {
            "rewards/margins": logits.mean().item(),
            "seppo/ref_as_loser": (s > 0).float().mean().item(),
            "seppo/ref_dropped": (s == 0).float().mean().item(),
            "errors/policy_w": errors.model_w.mean().item(),
            "errors/policy_r": errors.model_l.mean().item(),
            "errors/ref_w": errors.ref_w.mean().item(),
            "errors/ref_r": errors.ref_l.mean().item(),
        }
        return ObjectiveOutput(losses.mean(), losses, metrics)

    return objective
