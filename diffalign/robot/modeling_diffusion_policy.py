"""Observation-conditioned diffusion action policy: ``ε̂ = f(a_t, t, encode(obs))`` over action chunks.

The policy *is* a denoiser callable ``policy(x_t, t, obs) -> prediction`` in the sense of
:mod:`diffalign.likelihood`, so behaviour cloning, Diffusion-DPO and the DeformPAM implicit reward all go through the
package's one likelihood layer (:func:`~diffalign.likelihood.denoising_errors`,
:func:`~diffalign.likelihood.preference_errors`).

Shapes: ``obs`` is (B, obs_dim) for feature vectors or (B, P, point_dim) for point clouds; actions are (B, H, Da) in
world units outside the policy and in [-1, 1] inside it (min/max normaliser fitted on the demonstrations, as
Diffusion Policy's ``LinearNormalizer``).

References: Diffusion Policy (Chi et al., 2023) for the FiLM-conditioned 1-D U-Net and the scheduler settings;
PointNet (Qi et al., 2017) for the shared-MLP + max-pool encoder.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from ..likelihood import denoising_errors, sample_timesteps
from .configuration_diffusion_policy import DiffusionPolicyConfig

CONFIG_NAME = "policy_config.json"
WEIGHTS_NAME = "policy.safetensors"


class SinusoidalPosEmb(nn.Module):
    """Transformer-style sinusoidal embedding of integer timesteps: (B,) -> (B, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([args.sin(), args.cos()], dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Observation encoders
# ---------------------------------------------------------------------------------------------------------------


class MLPEncoder(nn.Module):
    """(B, obs_dim) -> (B, cond_dim)."""

    def __init__(self, obs_dim: int, cond_dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.SiLU(), nn.Linear(hidden, cond_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


class PointNetEncoder(nn.Module):
    """PointNet-style encoder: a shared per-point MLP, a max-pool over points, a linear projection.

    (B, P, C) -> (B, cond_dim). Permutation-invariant in P.
    """

    def __init__(self, point_dim: int, cond_dim: int, dims: tuple[int, ...] = (64, 128, 256)):
        super().__init__()
        layers, d_in = [], point_dim
        for d in dims:
            layers += [nn.Linear(d_in, d), nn.LayerNorm(d), nn.ReLU()]
            d_in = d
        self.point_mlp = nn.Sequential(*layers)
        self.proj = nn.Linear(d_in, cond_dim)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if points.ndim != 3:
            raise ValueError(f"PointNetEncoder expects (B, P, C) points, got shape {tuple(points.shape)}")
        feats = self.point_mlp(points)  # (B, P, D)
        return self.proj(feats.max(dim=1).values)  # (B, D) -> (B, cond_dim)


def build_obs_encoder(config: DiffusionPolicyConfig) -> tuple[nn.Module, int]:
    """The encoder named by ``config.obs_encoder`` and its output size."""
    if config.obs_encoder == "identity":
        return nn.Identity(), config.obs_dim
    if config.obs_encoder == "mlp":
        return MLPEncoder(config.obs_dim, config.cond_dim), config.cond_dim
    return PointNetEncoder(config.point_dim, config.cond_dim, config.pointnet_dims), config.cond_dim


# ---------------------------------------------------------------------------------------------------------------
# Denoisers: (x_t (B, H, Da), t (B,), cond (B, C)) -> (B, H, Da)
# ---------------------------------------------------------------------------------------------------------------


class _FiLMBlock(nn.Module):
    """``h + W2 · SiLU((1 + γ(c)) ⊙ W1 · LN(h) + β(c))``."""

    def __init__(self, width: int, cond_width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.film = nn.Linear(cond_width, 2 * width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(c).chunk(2, dim=-1)  # (B, W) each
        z = self.fc1(self.norm(h)) * (1 + scale) + shift
        return h + self.fc2(nn.functional.silu(z))


class MLPDenoiser(nn.Module):
    """Residual MLP over the flattened chunk with FiLM conditioning on [time embedding, observation features]."""

    def __init__(self, horizon: int, action_dim: int, cond_dim: int, hidden_dim: int = 256, n_blocks: int = 3,
                 time_embed_dim: int = 64):
        super().__init__()
        self.horizon, self.action_dim = horizon, action_dim
        flat = horizon * action_dim
        self.time_embed = nn.Sequential(
            SinusoidalPosEmb(time_embed_dim), nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
        )
        cond_width = hidden_dim + cond_dim
        self.inp = nn.Linear(flat, hidden_dim)
        self.blocks = nn.ModuleList([_FiLMBlock(hidden_dim, cond_width) for _ in range(n_blocks)])
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, flat))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b = x_t.shape[0]
        c = torch.cat([self.time_embed(t), cond], dim=-1)  # (B, hidden + cond_dim)
        h = self.inp(x_t.reshape(b, -1))  # (B, H*Da) -> (B, hidden)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h).view(b, self.horizon, self.action_dim)


class _Conv1dBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False),  # GroupNorm removes a bias
            nn.GroupNorm(math.gcd(groups, c_out), c_out),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _CondResBlock1d(nn.Module):
    """Two conv blocks with FiLM (per-channel scale and bias from the condition) between them."""

    def __init__(self, c_in: int, c_out: int, cond_width: int, kernel_size: int):
        super().__init__()
        self.conv1 = _Conv1dBlock(c_in, c_out, kernel_size)
        self.conv2 = _Conv1dBlock(c_out, c_out, kernel_size)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_width, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(c).unsqueeze(-1).chunk(2, dim=1)  # (B, C_out, 1) each
        h = self.conv1(x) * scale + bias
        return self.conv2(h) + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """A small version of Diffusion Policy's FiLM-conditioned 1-D U-Net over the time axis of the chunk.

    ``down_dims`` (C_1, ..., C_L): level l has a residual block to C_l and, except the last, a stride-2 downsample, so
    H must be divisible by 2^(L-1). Input and output (B, H, Da).
    """

    def __init__(self, action_dim: int, cond_dim: int, down_dims: tuple[int, ...] = (64, 128), kernel_size: int = 5,
                 time_embed_dim: int = 64):
        super().__init__()
        self.time_embed = nn.Sequential(
            SinusoidalPosEmb(time_embed_dim), nn.Linear(time_embed_dim, 4 * time_embed_dim), nn.Mish(),
            nn.Linear(4 * time_embed_dim, time_embed_dim),
        )
        cw = time_embed_dim + cond_dim
        dims = (action_dim, *down_dims)
        self.down = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(itertools.pairwise(dims)):
            last = i == len(down_dims) - 1
            self.down.append(nn.ModuleList([
                _CondResBlock1d(c_in, c_out, cw, kernel_size),
                nn.Identity() if last else nn.Conv1d(c_out, c_out, 3, stride=2, padding=1),
            ]))
        self.mid = _CondResBlock1d(down_dims[-1], down_dims[-1], cw, kernel_size)
        self.up = nn.ModuleList()
        for c_out, c_in in zip(reversed(down_dims[:-1]), reversed(down_dims[1:])):
            self.up.append(nn.ModuleList([
                nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1),
                _CondResBlock1d(c_in + c_out, c_out, cw, kernel_size),
            ]))
        self.final = nn.Sequential(_Conv1dBlock(down_dims[0], down_dims[0], kernel_size),
                                   nn.Conv1d(down_dims[0], action_dim, 1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c = torch.cat([self.time_embed(t), cond], dim=-1)  # (B, time_embed + cond)
        x = x_t.transpose(1, 2)  # (B, H, Da) -> (B, Da, H)
        skips = []
        for block, downsample in self.down:
            x = block(x, c)
            skips.append(x)
            x = downsample(x)
        x = self.mid(x, c)
        skips.pop()  # the deepest level has no upsample partner
        for upsample, block in self.up:
            x = block(torch.cat([upsample(x), skips.pop()], dim=1), c)
        return self.final(x).transpose(1, 2)  # (B, Da, H) -> (B, H, Da)


# ---------------------------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------------------------


class DiffusionActionPolicy(nn.Module):
    """Diffusion policy over action chunks. Call it as a denoiser: ``policy(x_t, t, obs)`` (normalised ``x_t``).

    >>> policy = DiffusionActionPolicy(DiffusionPolicyConfig())
    >>> policy.fit_normalizer(demo_actions)          # (N, H, Da) world units
    >>> loss = policy.compute_loss(obs, demo_actions)  # behaviour cloning (DDPM ε-MSE)
    >>> actions = policy.sample(obs, generator=g)      # (B, H, Da) world units, DDIM
    """

    config_class = DiffusionPolicyConfig

    def __init__(self, config: DiffusionPolicyConfig):
        super().__init__()
        self.config = config
        self.encoder, cond_dim = build_obs_encoder(config)
        if config.denoiser == "mlp":
            self.denoiser = MLPDenoiser(config.horizon, config.action_dim, cond_dim, config.hidden_dim,
                                        config.n_blocks, config.time_embed_dim)
        else:
            self.denoiser = ConditionalUnet1D(config.action_dim, cond_dim, config.unet_down_dims,
                                              config.unet_kernel_size, config.time_embed_dim)
        self.register_buffer("action_low", -torch.ones(config.horizon, config.action_dim))
        self.register_buffer("action_high", torch.ones(config.horizon, config.action_dim))
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            prediction_type=config.prediction_type,
            clip_sample=config.clip_sample,
        )

    # -- normaliser ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_normalizer(self, actions: torch.Tensor, *, min_range: float = 1e-4) -> None:
        """Per-coordinate min/max over the dataset (N, H, Da), so the demonstrations span [-1, 1]."""
        actions = torch.as_tensor(actions, dtype=torch.float32)
        low, high = actions.amin(dim=0), actions.amax(dim=0)
        mid, half = (low + high) / 2, ((high - low) / 2).clamp(min=min_range / 2)
        self.action_low.copy_(mid - half)
        self.action_high.copy_(mid + half)

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return 2 * (actions - self.action_low) / (self.action_high - self.action_low) - 1

    def unnormalize_actions(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1) / 2 * (self.action_high - self.action_low) + self.action_low

    # -- denoiser interface ------------------------------------------------------------------------------------
    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        """Observation features (B, cond_dim)."""
        return self.encoder(obs)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The diffusion head on precomputed observation features."""
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.denoiser(x_t, t, features)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """``f(x_t, t, obs)``: x_t (B, H, Da) normalised, t (B,) int, obs (B, ...) -> prediction (B, H, Da)."""
        return self.denoise(x_t, t, self.encode(obs))

    # -- training ----------------------------------------------------------------------------------------------
    def compute_loss(self, obs: torch.Tensor, actions: torch.Tensor, *, generator=None) -> torch.Tensor:
        """Behaviour-cloning loss: mean over the batch of the per-sample DDPM error (t ~ U{0..T-1}, fresh ε).

        ``obs`` (B, ...), ``actions`` (B, H, Da) in world units.
        """
        h, da = self.config.horizon, self.config.action_dim
        if actions.shape[1:] != (h, da):
            raise ValueError(f"actions must be (B, {h}, {da}), got {tuple(actions.shape)}")
        x0 = self.normalize_actions(actions)
        t = sample_timesteps(x0.shape[0], self.config.num_train_timesteps, generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return denoising_errors(self, self.noise_scheduler, x0, obs, t, noise).mean()

    # -- inference ---------------------------------------------------------------------------------------------
    def inference_scheduler(self) -> DDIMScheduler:
        return DDIMScheduler(
            num_train_timesteps=self.config.num_train_timesteps,
            beta_schedule=self.config.beta_schedule,
            prediction_type=self.config.prediction_type,
            clip_sample=self.config.clip_sample,
        )

    @torch.no_grad()
    def sample(self, obs: torch.Tensor, *, generator: torch.Generator | None = None,
               num_inference_steps: int | None = None, eta: float | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM sampling: (B, ...) observations -> (B, H, Da) actions in world units.

        The observation is encoded once; ``noise`` (B, H, Da) fixes x_T, ``generator`` the rest.
        """
        n = obs.shape[0]
        scheduler = self.inference_scheduler()
        scheduler.set_timesteps(num_inference_steps or self.config.num_inference_steps)
        eta = self.config.ddim_eta if eta is None else eta
        features = self.encode(obs)
        shape = (n, self.config.horizon, self.config.action_dim)
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=obs.device)
        for t in scheduler.timesteps:
            t_batch = torch.full((n,), int(t), device=obs.device, dtype=torch.long)
            pred = self.denoise(x, t_batch, features)
            x = scheduler.step(pred, t, x, eta=eta, generator=generator).prev_sample
        return self.unnormalize_actions(x)

    @torch.no_grad()
    def sample_candidates(self, obs: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
        """N candidates per observation: (B, ...) -> (B, N, H, Da)."""
        b = obs.shape[0]
        rep = obs.repeat_interleave(n, dim=0)  # (B*N, ...), candidates of one observation are adjacent
        return self.sample(rep, **kwargs).view(b, n, self.config.horizon, self.config.action_dim)

    # -- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DiffusionActionPolicy:
        from safetensors.torch import load_file

        directory = Path(directory)
        config = DiffusionPolicyConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        policy = cls(config)
        policy.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return policy
