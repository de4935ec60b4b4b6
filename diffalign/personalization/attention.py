"""Decoupled cross-attention for user tokens (IP-Adapter style), as diffusers attention processors.

PPD (Dang et al., "Personalized Preference Fine-tuning of Diffusion Models", CVPR 2025,
https://arxiv.org/abs/2501.06655) adds, next to every text cross-attention of the U-Net, a second attention over
the user's embedding tokens ``u`` (the IP-Adapter construction, Ye et al. 2023, https://arxiv.org/abs/2308.06721):

.. math::

    Z' = \\mathrm{softmax}\\!\\big(QK^\\top/\\sqrt{d}\\big)V + s\\;\\mathrm{softmax}\\!\\big(QK'^\\top/\\sqrt{d}\\big)V',
    \\qquad K' = u W'_k,\\quad V' = u W'_v

followed by the layer's output projection. Notation (variable -> paper):

==================  =========================================================
``query``           Q = x W_q (the image tokens' queries, shared by both branches)
``user_tokens``     u, shape (B, N_u, D_u)
``to_k_u``          W'_k (D_u -> inner dim), no bias
``to_v_u``          W'_v (D_u -> inner dim), no bias
``scale``           s (1 in the paper's formula; changeable at inference)
==================  =========================================================

Composition instead of a copy: the text branch is computed by the processor that was installed before (SDPA, xformers
or the math path, with or without LoRA), untouched. Since the output projection ``to_out[0]`` is affine,
``to_out(Z_t + s Z_u) = to_out(Z_t) + s (to_out(Z_u) - to_out(0))``, so the user branch is added after it. Hence:

* **No user tokens** (``user_tokens`` absent or ``None``) runs the original processor alone: bit-for-bit the base
  model (``tests/personalization/test_attention.py``).
* **Zero tokens** give ``V' = 0`` (no bias in W'_v), so the branch adds exactly 0: user-embedding dropout that
  zeroes ``u`` (the paper's) switches the branch off exactly.
* **At initialisation** ``W'_v = 0`` (``init="zero_v"``) or a zero gate (``init="zero_gate"``, output
  ``s · tanh(g) · Z_u`` with ``g = 0``), so the policy equals the reference at step 0 and the DPO loss is ln 2.

User tokens reach the processors through ``cross_attention_kwargs={"user_tokens": u}``. diffusers passes those kwargs
to *every* attention of a transformer block (self-attention too) and warns about names a processor does not declare,
so :func:`install_user_branch` also wraps the other processors in :class:`UserTokensIgnored`, which accepts and drops
them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

USER_KWARGS = ("user_tokens", "user_scale")
INITS = ("zero_v", "zero_gate")


def user_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, *,
                   fast: bool = True) -> torch.Tensor:
    """Multi-head ``softmax(Q K'^T / sqrt(d)) V'``.

    ``query`` (B, L, H·d), ``key``/``value`` (B, N_u, H·d) -> (B, L, H·d). ``fast`` uses PyTorch's
    ``scaled_dot_product_attention``; otherwise the plain reference path (the two agree, see the tests).
    """
    b, n_q, inner = query.shape
    d = inner // heads
    q = query.view(b, n_q, heads, d).transpose(1, 2)  # (B, H, L, d)
    k = key.view(b, -1, heads, d).transpose(1, 2)  # (B, H, N_u, d)
    v = value.view(b, -1, heads, d).transpose(1, 2)  # (B, H, N_u, d)
    if fast:
        z = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)  # (B, H, L, d)
    else:
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))  # (B, H, L, N_u)
        z = att.softmax(dim=-1) @ v  # (B, H, L, N_u) x (B, H, N_u, d) -> (B, H, L, d)
    return z.transpose(1, 2).reshape(b, n_q, inner)  # (B, L, H·d)


def _call_base(processor, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs):
    if temb is not None:
        kwargs = {**kwargs, "temb": temb}
    return processor(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                     attention_mask=attention_mask, **kwargs)


class UserTokensIgnored:
    """Wraps a processor that has no user branch (self-attention, or a cross-attention left alone): accepts the
    user kwargs so diffusers does not warn about them, and calls the wrapped processor without them."""

    def __init__(self, base):
        self.base = base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 user_tokens=None, user_scale=None, **kwargs):
        return _call_base(self.base, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)


class DecoupledUserAttnProcessor(nn.Module):
    """Text cross-attention (by the wrapped ``base`` processor) plus a user-token branch with its own W'_k, W'_v.

    ``inner_dim``: the attention's H·d (``attn.inner_dim``); ``user_dim``: D_u; ``heads``: H. Only ``to_k_u``,
    ``to_v_u`` (and ``gate`` for ``init="zero_gate"``) are parameters; ``base`` is kept as a plain attribute, so the
    branch's ``state_dict`` holds the new projections only.
    """

    def __init__(self, base, inner_dim: int, user_dim: int, heads: int, *, scale: float = 1.0,
                 init: str = "zero_v", fast: bool = True):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if inner_dim % heads:
            raise ValueError(f"inner_dim {inner_dim} is not divisible by heads {heads}")
        object.__setattr__(self, "base", base)  # not a submodule: its weights (if any) are not the branch's
        self.inner_dim, self.user_dim, self.heads = inner_dim, user_dim, heads
        self.scale, self.init, self.fast = scale, init, fast
        self.to_k_u = nn.Linear(user_dim, inner_dim, bias=False)  # W'_k: default (Kaiming-uniform) init
        self.to_v_u = nn.Linear(user_dim, inner_dim, bias=False)  # W'_v
        if init == "zero_v":
            nn.init.zeros_(self.to_v_u.weight)  # V' = 0: the branch adds exactly 0 at step 0
            self.gate = None
        else:
            self.gate = nn.Parameter(torch.zeros(()))  # tanh(0) = 0: the branch adds exactly 0 at step 0

    def user_branch(self, attn, hidden_states: torch.Tensor, user_tokens: torch.Tensor) -> torch.Tensor:
        """``softmax(Q K'^T/√d) V'`` through the layer's output projection, without its bias: (B, L, C).

        ``hidden_states``: the attention input, (B, L, C) or (B, C, h, w); ``user_tokens``: (B or 1, N_u, D_u).
        """
        x = hidden_states
        if x.ndim == 4:
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)  # (B, h·w, C)
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("user branch: attention layers with spatial/group norm are not supported")
        b = x.shape[0]
        if user_tokens.ndim != 3 or user_tokens.shape[0] not in (1, b) or user_tokens.shape[-1] != self.user_dim:
            raise ValueError(f"user_tokens must have shape (1 or {b}, N_u, {self.user_dim}), "
                             f"got {tuple(user_tokens.shape)}")
        u = user_tokens.to(self.to_k_u.weight.dtype).expand(b, -1, -1)  # (B, N_u, D_u)
        query = attn.to_q(x)  # (B, L, H·d)
        key = self.to_k_u(u).to(query.dtype)  # (B, N_u, H·d)
        value = self.to_v_u(u).to(query.dtype)  # (B, N_u, H·d)
        if attn.norm_q is not None:
            raise NotImplementedError("user branch: attention layers with q/k norms are not supported")
        z = user_attention(query, key, value, self.heads, fast=self.fast)  # (B, L, H·d)
        out = attn.to_out[0]
        z = out(z) - out(torch.zeros_like(z[:, :1]))  # the affine projection's linear part: to_out(Z) - to_out(0)
        z = attn.to_out[1](z)  # dropout (identity in eval)
        if hidden_states.ndim == 4:
            z = z.transpose(-1, -2).reshape(hidden_states.shape)
        return z / attn.rescale_output_factor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 user_tokens: torch.Tensor | None = None, user_scale: float | None = None, **kwargs):
        # nn.Module.__call__ is overridden on purpose: diffusers inspects this signature to route user kwargs here.
        out = _call_base(self.base, attn, hidden_states, encoder_hidden_states, attention_mask, temb, kwargs)
        if user_tokens is None:
            return out  # exactly the base processor's output
        s = self.scale if user_scale is None else user_scale
        if self.gate is not None:
            s = s * torch.tanh(self.gate)
        return out + s * self.user_branch(attn, hidden_states, user_tokens).to(out.dtype)


def cross_attention_layers(unet) -> dict[str, torch.nn.Module]:
    """The text cross-attention modules of a diffusers U-Net: every ``attn2`` that attends to encoder states.

    Returns ``{module name: Attention}``, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn2``.
    """
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in unet.named_modules()
            if isinstance(m, Attention) and name.endswith("attn2") and m.is_cross_attention}


def install_user_branch(unet, user_dim: int, *, scale: float = 1.0, init: str = "zero_v",
                        fast: bool = True) -> dict[str, DecoupledUserAttnProcessor]:
    """Put a :class:`DecoupledUserAttnProcessor` on every text cross-attention of ``unet``, wrapping the processor
    already there, and wrap every other processor in :class:`UserTokensIgnored`.

    The new projections are created in fp32 on the U-Net's device, with ``requires_grad=True``; they show up in
    ``unet.named_parameters()`` as ``<layer>.processor.to_k_u.weight`` etc. Returns ``{layer name: processor}``.
    Installing twice raises (remove the branch first with :func:`remove_user_branch`).
    """
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError("this U-Net has no text cross-attention (attn2) layers to attach a user branch to")
    if any(isinstance(m.processor, DecoupledUserAttnProcessor) for m in layers.values()):
        raise ValueError("the U-Net already has a user branch")
    device = next(unet.parameters()).device
    processors = {}
    for name, module in unet.named_modules():
        if not hasattr(module, "set_processor") or not hasattr(module, "processor"):
            continue
        base = module.processor
        if isinstance(base, UserTokensIgnored):
            base = base.base
        if name in layers:
            proc = DecoupledUserAttnProcessor(base, module.inner_dim, user_dim, module.heads, scale=scale, init=init,
                                              fast=fast).to(device)
            processors[name] = proc
            module.set_processor(proc)
        else:
            module.set_processor(UserTokensIgnored(base))
    return processors


def user_processors(unet) -> dict[str, DecoupledUserAttnProcessor]:
    """``{layer name: processor}`` for the user branch installed on ``unet`` (empty when there is none)."""
    return {name: m.processor for name, m in cross_attention_layers(unet).items()
            if isinstance(m.processor, DecoupledUserAttnProcessor)}


def remove_user_branch(unet) -> None:
    """Put back the processors :func:`install_user_branch` wrapped."""
    for _, module in unet.named_modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, (DecoupledUserAttnProcessor, UserTokensIgnored)) and hasattr(module, "set_processor"):
            module.set_processor(proc.base)
