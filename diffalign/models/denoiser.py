"""Denoiser callables ``f(x_t, t, cond) -> prediction`` over diffusers U-Nets, and the two reference providers.

``cond`` for a U-Net is a :class:`UNetCondition`: ``encoder_hidden_states`` (N, L, D) and, for SDXL,
``added_cond_kwargs = {"text_embeds": (N, P), "time_ids": (N, 6)}``.

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
        return UNetCondition(rep(self.encoder_hidden_states), added, dict(self.extra))

    @staticmethod
    def cat(first: UNetCondition, second: UNetCondition) -> UNetCondition:
        added = None
        if first.added_cond_kwargs is not None:
            added = {k: torch.cat([v, second.added_cond_kwargs[k]]) for k, v in first.added_cond_kwargs.items()}
        return UNetCondition(torch.cat([first.encoder_hidden_states, second.encoder_hidden_states]), added)

    def to(self, *args, **kwargs) -> UNetCondition:
        added = None
        if self.added_cond_kwargs is not None:
            added = {k: v.to(*args, **kwargs) for k, v in self.added_cond_kwargs.items()}
        return UNetCondition(self.encoder_hidden_states.to(*args, **kwargs), added, dict(self.extra))


class UNetDenoiser:
    """``f(x_t, t, cond) = unet(x_t, t, encoder_hidden_states, added_cond_kwargs).sample``."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: UNetCondition) -> torch.Tensor:
        kwargs = {}
        if cond.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = cond.added_cond_kwargs
        kwargs.update(cond.extra)
        out = self.unet(x_t, t, encoder_hidden_states=cond.encoder_hidden_states, return_dict=False, **kwargs)
        return out[0]


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


class AdapterDisabledReference(UNetDenoiser):
    """Reference = the same U-Net with LoRA adapters disabled (no second copy in memory)."""

    def __call__(self, x_t, t, cond):
        with adapters_disabled(self.unet):
            return super().__call__(x_t, t, cond)


class FrozenCopyReference(UNetDenoiser):
    """Reference = a frozen deep copy of the U-Net taken at construction (full fine-tuning)."""

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype | None = None):
        ref = copy.deepcopy(_unwrap(unet)).requires_grad_(False).eval()
        if dtype is not None:
            ref.to(dtype=dtype)
        super().__init__(ref)
