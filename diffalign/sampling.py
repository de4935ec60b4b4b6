"""Batched latent-space sampling with classifier-free guidance, for on-policy samples inside training (SePPO).

U-Nets: DDIM (η = 0) with ``ε̂ = ε_u + w (ε_c − ε_u)``. Rectified flow (SD3/FLUX): Euler steps of the flow ODE
``x_{σ'} = x_σ + (σ' − σ) v̂`` on the scheduler's inference grid, with ``v̂ = v_u + w (v_c − v_u)``; FLUX-dev is
guidance-distilled (its denoiser carries the guidance input), so it samples with ``uncond=None``. One denoiser call
on the stacked ``[uncond; cond]`` batch per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .likelihood import is_flow_scheduler
from .models.denoiser import UNetCondition


@torch.no_grad()
def sample_latents(denoiser, scheduler, cond: UNetCondition, uncond: UNetCondition | None,
                   shape: tuple[int, ...], *, num_inference_steps: int = 20, guidance_scale: float = 7.5,
                   generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Latents (N, C, h, w) sampled from pure noise. ``scheduler``: the training noise scheduler (a DDPM-family one
    gives DDIM, a flow one Euler on its own inference grid; never modified). ``cond``/``uncond`` hold N rows each;
    ``uncond=None`` or ``guidance_scale == 1`` samples without guidance."""
    flow = is_flow_scheduler(scheduler)
    sched = inference_scheduler(scheduler, num_inference_steps, shape)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=torch.float32)
    x = x * getattr(sched, "init_noise_sigma", 1.0)  # flow: pure noise at σ = 1
    n = shape[0]
    guided = uncond is not None and guidance_scale != 1.0
    both = UNetCondition.cat(uncond, cond) if guided else cond
    for t in sched.timesteps:
        tt = torch.full((2 * n if guided else n,), float(t) if flow else int(t), device=device,
                        dtype=torch.float32 if flow else torch.long)
        inp = torch.cat([x, x]) if guided else x
        out = denoiser(inp.to(dtype), tt, both).float()
        if guided:
            o_u, o_c = out.chunk(2)
            out = o_u + guidance_scale * (o_c - o_u)
        x = sched.step(out, t, x).prev_sample
    return x


def inference_scheduler(scheduler, num_inference_steps: int, shape: Sequence[int]):
    """A fresh copy of ``scheduler`` on its inference grid (the one passed in is never modified), as
    :func:`sample_latents` and :func:`diffalign.online.rollout` use it: the flow scheduler's own class (FLUX's dynamic
    shifting: :math:`σ` = linspace(1, 1/n) shifted by ``mu`` of the token count, as ``FluxPipeline``), or a
    ``DDIMScheduler`` from a DDPM-family config."""
    from diffusers import DDIMScheduler

    flow = is_flow_scheduler(scheduler)
    sched = (type(scheduler) if flow else DDIMScheduler).from_config(scheduler.config)
    if flow and sched.config.get("use_dynamic_shifting"):
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        sched.set_timesteps(sigmas=sigmas, mu=flux_mu(sched.config, tuple(shape)))
    else:
        sched.set_timesteps(num_inference_steps)
    return sched


def flux_mu(config, shape: tuple[int, ...]) -> float:
    """FluxPipeline's shift ``mu``: linear in the packed token count (h/2 · w/2) between the config's
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    tokens = (shape[-2] // 2) * (shape[-1] // 2)
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    b0, b1 = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return b0 + (b1 - b0) * (tokens - lo) / (hi - lo)
