"""Prompt encoding for SD1.x/2.x, SDXL, SD3 and FLUX, and SDXL's micro-conditioning.

* SD1.x/2.x: ``encoder_hidden_states`` = last hidden state of the CLIP text encoder, (N, 77, D).
* SDXL: penultimate hidden states (``hidden_states[-2]``) of CLIP-L and OpenCLIP-bigG concatenated, (N, 77, 2048);
  ``text_embeds`` = pooled projection of text encoder 2, (N, 1280); ``time_ids`` = (original_h, original_w,
  crop_top, crop_left, target_h, target_w) of **each image's own crop**, (N, 6).
* SD3 (as ``StableDiffusion3Pipeline.encode_prompt``): ``prompt_embeds`` = [CLIP-L ‖ CLIP-G penultimate
  hidden states, zero-padded to the T5 width] then the T5 sequence, (N, 77 + L_t5, D_t5) (zeros for T5 when
  the model has none); ``pooled_prompt_embeds`` = [CLIP-L ‖ CLIP-G projections], (N, 2048 for SD3).
* FLUX (as ``FluxPipeline.encode_prompt``): ``prompt_embeds`` = T5 sequence (N, L_t5, 4096),
  ``pooled_prompt_embeds`` = CLIP-L pooled output (N, 768). The text ids are zeros, built by the denoiser.
"""

from __future__ import annotations

import torch

from .denoiser import FlowCondition, UNetCondition
from .loading import Components


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(components: Components, prompts: list[str], device=None) -> dict[str, torch.Tensor]:
    """Text features for a list of prompts: ``{"encoder_hidden_states": (N, L, D)[, "text_embeds": (N, P)]}``;
    for sd3/flux ``{"prompt_embeds": (N, L, D), "pooled_prompt_embeds": (N, P)}``."""
    te = components.text_encoder
    device = device or next(te.parameters()).device
    if components.family == "sd3":
        return _encode_sd3(components, prompts, device)
    if components.family == "flux":
        return _encode_flux(components, prompts, device)
    ids = tokenize(components.tokenizer, prompts).to(device)
    if not components.is_sdxl:
        return {"encoder_hidden_states": te(ids, return_dict=False)[0]}
    ids2 = tokenize(components.tokenizer_2, prompts).to(device)
    out1 = te(ids, output_hidden_states=True)
    out2 = components.text_encoder_2(ids2, output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (N, L, D1 + D2)
    return {"encoder_hidden_states": hidden, "text_embeds": out2.text_embeds}


def _t5_tokenize(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     add_special_tokens=True, return_tensors="pt").input_ids


def _encode_sd3(c: Components, prompts: list[str], device) -> dict[str, torch.Tensor]:
    clip, pooled = [], []
    for tok, te in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
        out = te(tokenize(tok, prompts).to(device), output_hidden_states=True)
        clip.append(out.hidden_states[-2])  # (N, 77, D_i)
        pooled.append(out[0])  # text_embeds: (N, P_i)
    clip_embeds = torch.cat(clip, dim=-1).to(c.text_encoder.dtype)  # (N, 77, D1 + D2)
    length = c.t5_max_length
    if c.text_encoder_3 is None:  # SD3 without T5: zeros in its place, as the pipeline does
        t5 = torch.zeros((len(prompts), length, c.transformer.config.joint_attention_dim), device=device,
                         dtype=c.text_encoder.dtype)
    else:
        t5 = c.text_encoder_3(_t5_tokenize(c.tokenizer_3, prompts, length).to(device))[0]  # (N, L, D_t5)
    clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5.shape[-1] - clip_embeds.shape[-1]))
    return {"prompt_embeds": torch.cat([clip_embeds, t5], dim=-2),  # (N, 77 + L, D_t5)
            "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}  # (N, P1 + P2)


def _encode_flux(c: Components, prompts: list[str], device) -> dict[str, torch.Tensor]:
    clip = c.text_encoder(tokenize(c.tokenizer, prompts).to(device), output_hidden_states=False)
    pooled = clip.pooler_output  # (N, D_clip)
    ids = _t5_tokenize(c.tokenizer_2, prompts, c.t5_max_length).to(device)
    t5 = c.text_encoder_2(ids, output_hidden_states=False)[0]  # (N, L, D_t5)
    return {"prompt_embeds": t5, "pooled_prompt_embeds": pooled.to(c.text_encoder.dtype)}


def sdxl_time_ids(original_sizes: torch.Tensor, crops_top_left: torch.Tensor, target_size: tuple[int, int]):
    """(N, 2) original (h, w) + (N, 2) crop (top, left) + target (h, w) -> (N, 6) float ``add_time_ids``."""
    target = torch.tensor(target_size, dtype=torch.float32).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes.float(), crops_top_left.float(), target], dim=1)


def build_condition(text: dict[str, torch.Tensor], time_ids: torch.Tensor | None = None) -> UNetCondition:
    """Assemble the U-Net condition from :func:`encode_prompts` output (and SDXL ``time_ids``); for sd3/flux a
    :class:`FlowCondition` (``time_ids`` unused)."""
    if "pooled_prompt_embeds" in text:
        return FlowCondition.of(text["prompt_embeds"], text["pooled_prompt_embeds"])
    if "text_embeds" not in text:
        return UNetCondition(text["encoder_hidden_states"])
    if time_ids is None:
        raise ValueError("SDXL needs time_ids (original size, crop, target size) per image")
    added = {"text_embeds": text["text_embeds"], "time_ids": time_ids.to(text["text_embeds"])}
    return UNetCondition(text["encoder_hidden_states"], added)
