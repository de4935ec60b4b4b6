"""Batched latent-space DDIM sampling with classifier-free guidance, for on-policy samples inside training.

``ε̂ = ε_u + w (ε_c − ε_u)`` with one denoiser call on the stacked ``[uncond; cond]`` batch per step.
"""

from __future__ import annotations

import torch

from .models.denoiser import UNetCondition


@torch.no_grad()
def sample_latents(denoiser, scheduler_config, cond: UNetCondition, uncond: UNetCondition | None,
                   shape: tuple[int, ...], *, num_inference_steps: int = 20, guidance_scale: float = 7.5,
                   generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Latents (N, C, h, w) sampled from pure noise with DDIM (η = 0). ``cond``/``uncond`` hold N rows each."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(num_inference_steps)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=torch.float32) * sched.init_noise_sigma
    n = shape[0]
    guided = uncond is not None and guidance_scale != 1.0
    both = UNetCondition.cat(uncond, cond) if guided else cond
    for t in sched.timesteps:
        tt = torch.full((2 * n if guided else n,), int(t), device=device, dtype=torch.long)
        inp = torch.cat([x, x]) if guided else x
        eps = denoiser(inp.to(dtype), tt, both).float()
        if guided:
            e_u, e_c = eps.chunk(2)
            eps = e_u + guidance_scale * (e_c - e_u)
        x = sched.step(eps, t, x).prev_sample
    return x
