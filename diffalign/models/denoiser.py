"""Denoiser callables ``f(x_t, t, cond) -> prediction`` over diffusers U-Nets and SD3/FLUX transformers, and
the two reference providers.

``cond`` for a U-Net is a :class:`UNetCondition`: ``encoder_hidden_states`` (N, L, D) and, for SDXL,
``added_cond_kwargs = {"text_embeds": (N, P), "time_ids": (N, 6)}``. For SD3/FLUX it is a
:class:`FlowCondition`: ``prompt_embeds`` (N, L, D) and ``pooled_projections`` (N, P). Flow transformers
predict the velocity ``ε − x0`` at ``x_t = (1 − σ) x0 + σ ε`` from ``t = 1000 σ`` (float), as the diffusers
SD3/FLUX LoRA scripts call them.

References (what Diffusion-DPO's :math:`ε_{ref}` is):

* :class:`AdapterDisabledReference` — the policy U-Net with its LoRA adapters switched off for the call: the
  reference costs no memory (diffusers DPO example's trick).
* :class:`FrozenCopyReference` — a frozen copy of the initial U-Net, for full fine-tuning (official repo's choice).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .latents import latent_image_ids, pack_latents, unpack_latents

# The ``guidance`` input of guidance-distilled FLUX-dev during training (the diffusers FLUX scripts' default).
FLUX_GUIDANCE_SCALE = 3.5


@dataclass
class UNetCondition:
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.encoder_hidden_states.shape[0]

    def repeat(self, n: int) -> UNetCondition:
        """Stack the condition n times along dim 0, e.g. (B, ...) -> (2B, ...) for ``[winners; losers]``."""
        rep = lambda x: x.repeat(n, *([1] * (x.ndim - 1)))
        added = None if self.added_cond_kwargs is None else {k: rep(v) for k, v in self.added_cond_kwargs.items()}
        return type(self)(rep(self.encoder_hidden_states), added, dict(self.extra))

    @staticmethod
    def cat(first: UNetCondition, second: UNetCondition) -> UNetCondition:
        added = None
        if first.added_cond_kwargs is not None:
            added = {k: torch.cat([v, second.added_cond_kwargs[k]]) for k, v in first.added_cond_kwargs.items()}
        return type(first)(torch.cat([first.encoder_hidden_states, second.encoder_hidden_states]), added)

    def to(self, *args, **kwargs) -> UNetCondition:
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: v.to(*args, **kwargs) for k, v in self.added_cond_kwargs.items()}
        return type(self)(self.encoder_hidden_states.to(*args, **kwargs), added, dict(self.extra))


@dataclass
class FlowCondition(UNetCondition):
    """SD3/FLUX condition: ``encoder_hidden_states`` = ``prompt_embeds`` (N, L, D), ``added_cond_kwargs =
    {"pooled_projections": (N, P)}``; ``repeat``/``cat``/``to`` as :class:`UNetCondition`, same type."""

    @classmethod
    def of(cls, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> FlowCondition:
        return cls(prompt_embeds, {"pooled_projections": pooled})

    @property
    def prompt_embeds(self) -> torch.Tensor:
        return self.encoder_hidden_states

    @property
    def pooled_projections(self) -> torch.Tensor:
        return self.added_cond_kwargs["pooled_projections"]


class UNetDenoiser:
    """``f(x_t, t, cond) = unet(x_t, t, encoder_hidden_states, added_cond_kwargs).sample``."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet

    @property
    def module(self) -> torch.nn.Module:
        return self.unet

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: UNetCondition) -> torch.Tensor:
        kwargs = {}
        if cond.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = cond.added_cond_kwargs
        kwargs.update(cond.extra)
        out = self.unet(x_t, t, encoder_hidden_states=cond.encoder_hidden_states, return_dict=False, **kwargs)
        return out[0]


def _flow_timesteps(t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """``t`` as a float (B,) tensor: flow timesteps are ``1000 σ``, not integer indices."""
    t = torch.as_tensor(t, device=x_t.device)
    t = t if t.is_floating_point() else t.float()
    return t.expand(x_t.shape[0]) if t.ndim == 0 else t


class SD3Denoiser:
    """``f(x_t, t, cond) = transformer(hidden_states=x_t, timestep=t, encoder_hidden_states,
    pooled_projections)``: velocity (B, C, h, w) at ``t = 1000 σ`` ∈ [0, 1000] (float, (B,))."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer

    @property
    def module(self) -> torch.nn.Module:
        return self.transformer

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: FlowCondition) -> torch.Tensor:
        return self.transformer(
            hidden_states=x_t, timestep=_flow_timesteps(t, x_t), encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_projections, return_dict=False, **cond.extra,
        )[0]


class FluxDenoiser:
    """FLUX: pack (B, C, h, w) into (B, h/2 · w/2, 4C) tokens, call the transformer with
    ``timestep = t / 1000``, ``img_ids`` (h/2 · w/2, 3), zero ``txt_ids`` (L, 3) and, when
    ``transformer.config.guidance_embeds`` (FLUX-dev), ``guidance`` = ``guidance_scale`` per sample; unpack
    the velocity back to (B, C, h, w)."""

    def __init__(self, transformer: torch.nn.Module, guidance_scale: float = FLUX_GUIDANCE_SCALE):
        self.transformer = transformer
        self.guidance_scale = guidance_scale

    @property
    def module(self) -> torch.nn.Module:
        return self.transformer

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: FlowCondition) -> torch.Tensor:
        b, _, h, w = x_t.shape
        guidance = None
        if _unwrap(self.transformer).config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=x_t.device, dtype=torch.float32)
        txt_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        out = self.transformer(
            hidden_states=pack_latents(x_t), timestep=_flow_timesteps(t, x_t) / 1000, guidance=guidance,
            pooled_projections=cond.pooled_projections, encoder_hidden_states=cond.prompt_embeds,
            txt_ids=txt_ids, img_ids=latent_image_ids(h // 2, w // 2, x_t.device, x_t.dtype),
            return_dict=False, **cond.extra,
        )[0]
        return unpack_latents(out, h, w)


def make_denoiser(family: str, module: torch.nn.Module, guidance_scale: float = FLUX_GUIDANCE_SCALE):
    """The callable ``f(x_t, t, cond)`` over ``module``: :class:`SD3Denoiser`, :class:`FluxDenoiser` (with
    ``guidance_scale``) or :class:`UNetDenoiser`."""
    if family == "sd3":
        return SD3Denoiser(module)
    if family == "flux":
        return FluxDenoiser(module, guidance_scale)
    return UNetDenoiser(module)


def make_reference(family: str, module: torch.nn.Module, frozen_copy: bool = False,
                   dtype: torch.dtype | None = None, guidance_scale: float = FLUX_GUIDANCE_SCALE):
    """The reference denoiser of any family: ``module`` with its adapters disabled for the call (LoRA), or a
    frozen copy of it taken now (``frozen_copy``, full fine-tuning; in ``dtype``)."""
    if frozen_copy:
        return make_denoiser(family, _frozen_copy(module, dtype), guidance_scale)
    return AdapterDisabledDenoiser(make_denoiser(family, module, guidance_scale))


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    # DDP / torch.compile wrappers keep the real module in ``.module`` / ``._orig_mod``.
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return module


@contextmanager
def adapters_disabled(unet: torch.nn.Module):
    """Switch the U-Net's peft adapters off inside the block (and back on after, even on error)."""
    inner = _unwrap(unet)
    inner.disable_adapters()
    try:
        yield
    finally:
        inner.enable_adapters()


def _frozen_copy(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    ref = copy.deepcopy(_unwrap(module)).requires_grad_(False).eval()
    return ref.to(dtype=dtype) if dtype is not None else ref


class AdapterDisabledDenoiser:
    """Any denoiser with a ``module`` (e.g. :class:`SD3Denoiser`, :class:`FluxDenoiser`), called with that
    module's LoRA adapters switched off: the reference at no memory cost."""

    def __init__(self, inner):
        self.inner = inner

    @property
    def module(self) -> torch.nn.Module:
        return self.inner.module

    def __call__(self, x_t, t, cond):
        with adapters_disabled(self.inner.module):
            return self.inner(x_t, t, cond)


class AdapterDisabledReference(AdapterDisabledDenoiser):
    """Reference = the same U-Net with LoRA adapters disabled (no second copy in memory)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__(UNetDenoiser(unet))

    @property
    def unet(self) -> torch.nn.Module:
        return self.inner.unet


class FrozenCopyReference(UNetDenoiser):
    """Reference = a frozen deep copy of the U-Net taken at construction (full fine-tuning)."""

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype | None = None):
        super().__init__(_frozen_copy(unet, dtype))
