"""Prompt encoding for SD1.x/2.x and SDXL, and SDXL's micro-conditioning.

* SD1.x/2.x: ``encoder_hidden_states`` = last hidden state of the CLIP text encoder, (N, 77, D).
* SDXL: penultimate hidden states (``hidden_states[-2]``) of CLIP-L and OpenCLIP-bigG concatenated, (N, 77, 2048);
  ``text_embeds`` = pooled projection of text encoder 2, (N, 1280); ``time_ids`` = (original_h, original_w,
  crop_top, crop_left, target_h, target_w) of **each image's own crop**, (N, 6).
"""

from __future__ import annotations

import torch

from .denoiser import UNetCondition
from .loading import Components


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(components: Components, prompts: list[str], device=None) -> dict[str, torch.Tensor]:
    """Text features for a list of prompts: ``{"encoder_hidden_states": (N, L, D)[, "text_embeds": (N, P)]}``."""
    te = components.text_encoder
    device = device or next(te.parameters()).device
    ids = tokenize(components.tokenizer, prompts).to(device)
    if not components.is_sdxl:
        return {"encoder_hidden_states": te(ids, return_dict=False)[0]}
    ids2 = tokenize(components.tokenizer_2, prompts).to(device)
    out1 = te(ids, output_hidden_states=True)
    out2 = components.text_encoder_2(ids2, output_hidden_states=True)
    hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (N, L, D1 + D2)
    return {"encoder_hidden_states": hidden, "text_embeds": out2.text_embeds}


def sdxl_time_ids(original_sizes: torch.Tensor, crops_top_left: torch.Tensor, target_size: tuple[int, int]):
    """(N, 2) original (h, w) + (N, 2) crop (top, left) + target (h, w) -> (N, 6) float ``add_time_ids``."""
    target = torch.tensor(target_size, dtype=torch.float32).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes.float(), crops_top_left.float(), target], dim=1)


def build_condition(text: dict[str, torch.Tensor], time_ids: torch.Tensor | None = None) -> UNetCondition:
    """Assemble the U-Net condition from :func:`encode_prompts` output (and SDXL ``time_ids``)."""
    if "text_embeds" not in text:
        return UNetCondition(text["encoder_hidden_states"])
    if time_ids is None:
        raise ValueError("SDXL needs time_ids (original size, crop, target size) per image")
    added = {"text_embeds": text["text_embeds"], "time_ids": time_ids.to(text["text_embeds"])}
    return UNetCondition(text["encoder_hidden_states"], added)
