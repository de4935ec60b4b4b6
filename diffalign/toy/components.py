"""The toy text-to-image pipeline's components: a real Stable Diffusion layout, shrunk to run on a laptop CPU.

=================  ==========================================================================================
component          shape
=================  ==========================================================================================
tokenizer          CLIP's real BPE vocabulary (49,408 ids, built offline), ``model_max_length`` 16
text encoder       ``CLIPTextModel``: hidden 32, 2 layers, 4 heads, 16 positions (captions are 9-10 tokens)
VAE                ``AutoencoderKL``: 32x32x3 <-> 4x8x8 (3 blocks, factor 4), ``scaling_factor`` = 1 / latent std
U-Net              ``UNet2DConditionModel`` on 4x8x8 latents: blocks (32, 64); plain ResNet at 8x8, cross-attention
                   at 4x4 and in the mid block; cross_attention_dim 32
scheduler          ``DDIMScheduler``: 1000 steps, ``scaled_linear`` β 0.00085-0.012 (SD1.x), ε-prediction
=================  ==========================================================================================

:func:`build_components` makes them with random weights; :mod:`diffalign.toy.pretrain` trains them and saves a
``StableDiffusionPipeline`` folder that ``from_pretrained`` loads like any SD1.5 checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import inference
from ..models.tokenizer import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, write_clip_tokenizer_files
from .shapes import IMAGE_SIZE


@dataclass
class ToyModelConfig:
    """Sizes of the toy pipeline. The defaults are what ``assets/toy-sd`` ships."""

    # Text encoder. The token table (49,408 x hidden) dominates the file size: hidden 32 keeps it at 6.3 MB.
    text_hidden_size: int = field(default=32, metadata={"help": "CLIP text hidden size = U-Net cross_attention_dim."})
    text_layers: int = field(default=2, metadata={"help": "CLIP text transformer layers."})
    text_heads: int = field(default=4, metadata={"help": "CLIP text attention heads."})
    text_intermediate_size: int = field(default=64, metadata={"help": "CLIP text MLP width."})
    max_length: int = field(
        default=16, metadata={"help": "Tokenizer model_max_length = text max_position_embeddings (captions: 9-10)."}
    )
    # VAE. Three blocks give the factor-4 downsampling 32 -> 8 that the pipeline derives from len(block_out_channels).
    vae_block_out_channels: tuple[int, ...] = field(default=(16, 32, 32), metadata={"help": "VAE channels per block."})
    latent_channels: int = field(default=4, metadata={"help": "VAE latent channels (SD: 4)."})
    vae_norm_groups: int = field(default=16, metadata={"help": "GroupNorm groups in the VAE."})
    # U-Net.
    unet_block_out_channels: tuple[int, ...] = field(default=(32, 64), metadata={"help": "U-Net channels per block."})
    unet_down_block_types: tuple[str, ...] = field(
        default=("DownBlock2D", "CrossAttnDownBlock2D"),
        metadata={"help": "U-Net down blocks, highest resolution first; up blocks mirror them."},
    )
    unet_layers_per_block: int = field(default=1, metadata={"help": "ResNet layers per U-Net block."})
    unet_attention_heads: int = field(default=4, metadata={"help": "Heads per U-Net attention (diffusers' attention_head_dim)."})
    # Scheduler (SD1.x values).
    num_train_timesteps: int = field(default=1000, metadata={"help": "Diffusion steps T."})
    beta_schedule: str = field(default="scaled_linear", metadata={"help": "β schedule, as in SD1.x."})
    beta_start: float = field(default=0.00085, metadata={"help": "β_1."})
    beta_end: float = field(default=0.012, metadata={"help": "β_T."})

    def __post_init__(self):
        self.vae_block_out_channels = tuple(self.vae_block_out_channels)
        self.unet_block_out_channels = tuple(self.unet_block_out_channels)
        self.unet_down_block_types = tuple(self.unet_down_block_types)
        if len(self.unet_down_block_types) != len(self.unet_block_out_channels):
            raise ValueError(
                f"Got {len(self.unet_down_block_types)} U-Net down block types for "
                f"{len(self.unet_block_out_channels)} block_out_channels."
            )

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return IMAGE_SIZE // self.vae_scale_factor

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def text_encoder_config(cfg: ToyModelConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_length,
        projection_dim=cfg.text_hidden_size,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
    )


def vae_kwargs(cfg: ToyModelConfig, scaling_factor: float = 1.0) -> dict:
    n = len(cfg.vae_block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_block_out_channels,
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


def unet_kwargs(cfg: ToyModelConfig) -> dict:
    up = tuple(t.replace("Down", "Up") for t in reversed(cfg.unet_down_block_types))
    return dict(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_block_out_channels,
        down_block_types=cfg.unet_down_block_types,
        up_block_types=up,
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=cfg.unet_attention_heads,
        norm_num_groups=8,
    )


def scheduler_kwargs(cfg: ToyModelConfig) -> dict:
    # SD1.x inference settings; StableDiffusionPipeline rewrites steps_offset / clip_sample otherwise.
    return dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def write_tokenizer(directory: str | os.PathLike, cfg: ToyModelConfig) -> Path:
    """CLIP's ``vocab.json`` + ``merges.txt`` (1.5 MB, vs 3.6 MB for ``tokenizer.json``) with the toy max length."""
    import json

    directory = write_clip_tokenizer_files(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = cfg.max_length
    config_path.write_text(json.dumps(config, indent=2))
    return directory


def build_components(cfg: ToyModelConfig | None = None, *, seed: int = 0, tokenizer_dir: str | None = None) -> dict:
    """Randomly initialised ``tokenizer, text_encoder, vae, unet, scheduler`` (the ``StableDiffusionPipeline``
    keyword arguments), seeded by ``seed``. ``tokenizer_dir``: where to write the tokenizer files (a temp dir if None).
    """
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    cfg = cfg or ToyModelConfig()
    tokenizer_dir = tokenizer_dir or tempfile.mkdtemp(prefix="diffalign-toy-tok-")
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(tokenizer_dir, cfg)))
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_encoder_config(cfg))
    vae = AutoencoderKL(**vae_kwargs(cfg))
    unet = UNet2DConditionModel(**unet_kwargs(cfg))
    scheduler = DDIMScheduler(**scheduler_kwargs(cfg))
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet, scheduler=scheduler)


def build_pipeline(components: dict):
    """A ``StableDiffusionPipeline`` around ``components``, with no safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, out_dir: str | os.PathLike, cfg: ToyModelConfig) -> Path:
    """``save_pretrained(safe_serialization=True)``, then swap the 3.6 MB ``tokenizer.json`` for vocab + merges."""
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    tok_dir = out_dir / "tokenizer"
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tok_dir / name).unlink(missing_ok=True)
    write_tokenizer(tok_dir, cfg)
    return out_dir


# Sampling defaults: 20 DDIM steps and CFG 5 give the quality in assets/README.md at ~20 ms per image on 2 CPU cores.
DEFAULT_NUM_INFERENCE_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 5.0
DEFAULT_BATCH_SIZE = 64  # images per pipeline call
# The toy flow world (assets/toy-flow, diffalign.toy.flow): 20 Euler steps of the rectified-flow ODE and CFG 5,
# and the 77 zero "T5" tokens the trainer also uses for a T5-less SD3 (the pipeline's own default would be 256).
DEFAULT_FLOW_NUM_INFERENCE_STEPS = 20
DEFAULT_FLOW_GUIDANCE_SCALE = 5.0
FLOW_MAX_SEQUENCE_LENGTH = 77


def is_flow_pipeline(pipe) -> bool:
    """A ``StableDiffusion3Pipeline`` (the toy flow world) rather than the U-Net toy pipeline."""
    return type(pipe).__name__.startswith("StableDiffusion3")


def generate(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **kwargs,
) -> list:
    """One 32x32 PIL image per ``(prompt, seed)``: :func:`diffalign.inference.generate` with the toy defaults
    (steps and guidance None: ``DEFAULT_*`` of the pipeline's world, U-Net or flow; a flow pipeline also gets
    ``max_sequence_length`` = :data:`FLOW_MAX_SEQUENCE_LENGTH`).

    Seed rule: each image's initial noise comes from its own ``torch.Generator("cpu").manual_seed(seed)``, so an image
    depends on its prompt and seed only, not on the batch it is generated in (up to one uint8 level of batched
    rounding); the same seeds give paired samples from two models (base vs aligned). Extra ``kwargs`` go to the
    pipeline call.
    """
    flow = is_flow_pipeline(pipe)
    if num_inference_steps is None:
        num_inference_steps = DEFAULT_FLOW_NUM_INFERENCE_STEPS if flow else DEFAULT_NUM_INFERENCE_STEPS
    if guidance_scale is None:
        guidance_scale = DEFAULT_FLOW_GUIDANCE_SCALE if flow else DEFAULT_GUIDANCE_SCALE
    if flow:
        kwargs.setdefault("max_sequence_length", FLOW_MAX_SEQUENCE_LENGTH)
    return inference.generate(
        pipe, prompts, seeds, batch_size=batch_size, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, height=IMAGE_SIZE, width=IMAGE_SIZE, **kwargs,
    )
