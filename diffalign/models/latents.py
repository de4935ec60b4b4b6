"""VAE latent normalisation for every family, and FLUX's 2x2 latent packing.

Normalised latents are ``z = (μ + σ ξ − shift_factor) · scaling_factor``: SD1.x/SDXL VAEs have no shift
(``shift_factor`` is ``None``, so ``z = x · scaling_factor`` exactly as before); SD3's VAE has (0.0609,
1.5305) and FLUX's (0.1159, 0.3611), as in the diffusers SD3/FLUX LoRA scripts'
``(x − shift_factor) · scaling_factor``.

FLUX's transformer takes sequences: a (B, C, H, W) latent becomes (B, H/2 · W/2, 4C) tokens of 2x2 patches
(``FluxPipeline._pack_latents``), with per-token position ids ``img_ids`` (H/2 · W/2, 3) = (0, row, col).
"""

from __future__ import annotations

import torch


def latent_shift_scale(vae) -> tuple[float, float]:
    """``(shift_factor or 0, scaling_factor)`` of a VAE (or its config)."""
    config = getattr(vae, "config", vae)
    return float(getattr(config, "shift_factor", None) or 0.0), float(config.scaling_factor)


def scale_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents (B, C, h, w) -> the denoiser's latents ``(x − shift) · scale`` (``x · scale`` without
    shift)."""
    shift, scale = latent_shift_scale(vae)
    return (x - shift) * scale if shift else x * scale


def unscale_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`scale_latents`, before ``vae.decode``."""
    shift, scale = latent_shift_scale(vae)
    return z / scale + shift if shift else z / scale


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 · W/2, 4C): 2x2 patches in row-major order, channels ``c·4 + 2·dy + dx``."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 · W/2, 4C) -> (B, C, H, W), inverse of :func:`pack_latents`; ``height``, ``width`` in
    latents."""
    b, _, d = x.shape
    x = x.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids of the packed tokens, (height · width, 3) rows ``(0, i, j)``; sizes in patches (H/2,
    W/2)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)
