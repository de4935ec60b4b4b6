"""Tiny SD1.x-like and SDXL-like components built from configs in code (tests, benchmarks, offline demos).

Same classes as the real models (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``), a real CLIP
tokenizer built offline (:mod:`diffalign.models.tokenizer`), random weights. :func:`save_tiny_pipeline` writes them
as a diffusers pipeline folder so every ``from_pretrained`` path is exercised without a download.
"""

from __future__ import annotations

import torch

from .loading import Components
from .tokenizer import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, clip_tokenizer

TEXT_LEN = 16  # short prompts are enough for tests; keeps the text encoder tiny


def _text_config(hidden: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kw = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID,
        hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=TEXT_LEN, hidden_act="gelu", **kw,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], sample_size=32,
    )


def tiny_components(family: str = "sd15", seed: int = 0, prediction_type: str = "epsilon") -> Components:
    """Random-weight components: 32x32 images, 4x16x16 latents. ``family``: ``sd15`` or ``sdxl``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(model_max_length=TEXT_LEN)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=prediction_type, clip_sample=False, steps_offset=1,
    )
    common = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    if family == "sdxl":
        unet = UNet2DConditionModel(
            **common, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 16,
        )
        te = CLIPTextModel(_text_config(16))
        te2 = CLIPTextModelWithProjection(_text_config(16, projection_dim=16))
        tok2 = clip_tokenizer(model_max_length=TEXT_LEN)
        return Components("sdxl", unet, _vae(), te, tokenizer, scheduler, te2, tok2, source="tiny-sdxl")
    if family not in ("sd15", "sd21"):
        raise ValueError(f"family must be sd15, sd21 or sdxl, got {family!r}")
    unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=4)
    te = CLIPTextModel(_text_config(32))
    return Components(family, unet, _vae(), te, tokenizer, scheduler, source=f"tiny-{family}")


def save_tiny_pipeline(path, family: str = "sd15", seed: int = 0, prediction_type: str = "epsilon") -> str:
    """Write a random tiny pipeline folder at ``path`` and return it as a string."""
    from ..inference import pipeline_from_components

    pipe = pipeline_from_components(tiny_components(family, seed, prediction_type))
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)
