"""The InPO recipe: Diffusion-DPO whose (t, ε) come from DDIM inversion of the clean latents by the policy.

Per pair, t ~ U{0..T-1} is shared by winner and loser; each clean latent x0 is inverted (no grad, η, a
``inversion_steps`` grid: :func:`diffalign.inversion.ddim_invert`) to x̃ and the noise is the one that x̃ implies at t,
ε̃ = (x̃ − sqrt(ᾱ_t) x0) / sqrt(1 − ᾱ_t) (:func:`diffalign.inversion.implied_noise`), so x_t = x̃. The loss and its
options: :mod:`diffalign.objectives.inpo`.
"""

from __future__ import annotations

import torch

from ..inversion import ddim_invert, implied_noise
from ..likelihood import sample_timesteps
from .trainer import PreferenceTrainer


def inversion_noise(config, denoiser, scheduler, x0_pairs: torch.Tensor, cond, generator):
    """``(t (2B,), ε̃ (2B, ...))`` for a ``[winners; losers]`` batch ``x0_pairs`` (2B, ...); ``config`` is the
    objective's :class:`~diffalign.objectives.inpo.InPOConfig` (``inversion_steps``, ``eta``, ``timesteps``)."""
    half = x0_pairs.shape[0] // 2
    t = sample_timesteps(half, scheduler.config.num_train_timesteps, generator=generator).repeat(2)
    t = t.to(x0_pairs.device)
    x_inv, level = ddim_invert(denoiser, scheduler, x0_pairs, cond, t, num_inference_steps=config.inversion_steps,
                               eta=config.eta, generator=generator)
    if config.timesteps == "inverted_level":
        t = level.clamp(max=scheduler.config.num_train_timesteps - 1)
    return t, implied_noise(scheduler, x0_pairs, x_inv, t).to(x0_pairs.dtype)


class InversionTrainer(PreferenceTrainer):
    """:class:`PreferenceTrainer` with the :meth:`noise` step replaced by the policy's DDIM inversion."""

    def noise(self, x0_pairs, cond):
        return inversion_noise(self.config.objective.params, self.policy, self.components.noise_scheduler,
                               x0_pairs, cond, self.generator)
