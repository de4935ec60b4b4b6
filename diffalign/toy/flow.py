"""The toy flow world: a tiny SD3-style pipeline (MMDiT, two CLIP encoders, no T5) on the shapes world.

=================  ==========================================================================================
component          shape
=================  ==========================================================================================
tokenizer(s)       toy-sd's CLIP BPE tokenizer (49,408 ids, ``model_max_length`` 16), shared by both encoders
text_encoder       ``CLIPTextModelWithProjection`` ("CLIP-L"): hidden 32, 2 layers, 4 heads, projection 32
text_encoder_2     ``CLIPTextModelWithProjection`` ("CLIP-G"): hidden 16, 2 layers, 2 heads, projection 16
text_encoder_3     none (SD3 without T5: the pipeline puts ``max_sequence_length`` zero tokens in its place)
VAE                toy-sd's ``AutoencoderKL`` reused frozen (32x32x3 <-> 4x8x8), ``shift_factor`` 0.0 added
transformer        ``SD3Transformer2DModel`` on 4x8x8 latents: patch 2 (4x4 = 16 image tokens), 4 joint
                   blocks, 4 heads of 16 (width 64), ``joint_attention_dim`` 48 = 32 + 16, pooled 48
scheduler          ``FlowMatchEulerDiscreteScheduler``, 1000 steps, ``shift`` 1.0
=================  ==========================================================================================

Text features as ``StableDiffusion3Pipeline.encode_prompt`` builds them (:func:`encode_token_ids`):
``prompt_embeds = [h_L ‖ h_G ; 0_{77×48}]`` (N, 16 + 77, 48), the penultimate hidden states of both CLIPs
concatenated, then :data:`T5_TOKENS` zero rows (T5's place; 77 = what the trainer uses for sd3, so training,
pretraining and sampling all see the same sequence), and ``pooled = [p_L ‖ p_G]`` (N, 48).

``shift`` 1.0 (no shift): SD3 shifts σ toward noise by ``α = sqrt(m / n)`` for m latent tokens against a
256² base (n = 1024 tokens at f8·p2); that pushes more steps to high noise for large images, whose redundant
pixels keep their content recognisable under more noise. Our 16 tokens would give α < 1; 1.0 keeps the
plain rectified-flow grid, which 8x8 latents already train well on.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..models.tokenizer import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE
from .components import FLOW_MAX_SEQUENCE_LENGTH
from .shapes import IMAGE_SIZE

T5_TOKENS = FLOW_MAX_SEQUENCE_LENGTH  # zero "T5" rows: the trainer's T5_MAX_LENGTH["sd3"]
PIPELINE_CLASS = "StableDiffusion3Pipeline"


@dataclass
class ToyFlowConfig:
    """Sizes of the toy SD3 pipeline. The defaults are what ``assets/toy-flow`` ships."""

    text_hidden_size: int = field(default=32, metadata={"help": "CLIP-L hidden size (= its projection)."})
    text_2_hidden_size: int = field(default=16, metadata={"help": "CLIP-G hidden size (= its projection)."})
    text_layers: int = field(default=2, metadata={"help": "Layers of each CLIP text encoder."})
    text_heads: int = field(default=4, metadata={"help": "Heads of CLIP-L (CLIP-G: half)."})
    max_length: int = field(default=16, metadata={"help": "CLIP tokens per prompt (captions: 9-10)."})
    num_layers: int = field(default=4, metadata={"help": "MMDiT joint blocks."})
    attention_head_dim: int = field(default=16, metadata={"help": "MMDiT head size."})
    num_attention_heads: int = field(default=4, metadata={"help": "MMDiT heads; width = heads x head size."})
    patch_size: int = field(default=2, metadata={"help": "Latent patch size: 8x8 latents -> 4x4 tokens."})
    qk_norm: str | None = field(default="rms_norm", metadata={"help": "q/k norm (SD3.5's; None: SD3)."})
    shift: float = field(default=1.0, metadata={"help": "Flow scheduler shift (module doc)."})
    num_train_timesteps: int = field(default=1000, metadata={"help": "Flow training grid size T."})

    @property
    def joint_attention_dim(self) -> int:
        return self.text_hidden_size + self.text_2_hidden_size

    @property
    def latent_size(self) -> int:
        return IMAGE_SIZE // 4  # the toy-sd VAE downsamples by 4

    def to_dict(self) -> dict:
        return asdict(self)


def _clip(hidden: int, layers: int, heads: int, max_length: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
        projection_dim=hidden, bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID,
    ))


def transformer_kwargs(cfg: ToyFlowConfig) -> dict:
    width = cfg.num_attention_heads * cfg.attention_head_dim
    return {
        "sample_size": cfg.latent_size, "patch_size": cfg.patch_size, "in_channels": 4, "out_channels": 4,
        "num_layers": cfg.num_layers, "attention_head_dim": cfg.attention_head_dim,
        "num_attention_heads": cfg.num_attention_heads, "joint_attention_dim": cfg.joint_attention_dim,
        "caption_projection_dim": width, "pooled_projection_dim": cfg.joint_attention_dim,
        "pos_embed_max_size": cfg.latent_size // cfg.patch_size, "qk_norm": cfg.qk_norm,
    }


def load_toy_vae(toy_sd: str | os.PathLike | None = None):
    """toy-sd's trained ``AutoencoderKL`` (frozen, eval) with ``shift_factor = 0.0`` registered, which
    ``StableDiffusion3Pipeline`` needs to decode (``latents / scaling_factor + shift_factor``)."""
    from diffusers import AutoencoderKL

    from . import toy_model_path

    vae = AutoencoderKL.from_pretrained(str(toy_sd or toy_model_path()), subfolder="vae")
    vae.register_to_config(shift_factor=0.0)
    vae.requires_grad_(False)
    return vae.eval()


def build_flow_components(cfg: ToyFlowConfig | None = None, *, seed: int = 0, vae=None) -> dict:
    """``StableDiffusion3Pipeline`` keyword arguments: random transformer and CLIP encoders seeded by
    ``seed``, toy-sd's tokenizer (twice) and VAE (:func:`load_toy_vae` unless ``vae`` is given), no T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTokenizer

    from . import toy_model_path

    cfg = cfg or ToyFlowConfig()
    tokenizer = CLIPTokenizer.from_pretrained(str(toy_model_path()), subfolder="tokenizer")
    if tokenizer.model_max_length != cfg.max_length:
        raise ValueError(f"toy-sd's tokenizer has model_max_length {tokenizer.model_max_length}, config "
                         f"max_length {cfg.max_length}")
    torch.manual_seed(seed)
    te1 = _clip(cfg.text_hidden_size, cfg.text_layers, cfg.text_heads, cfg.max_length)
    te2 = _clip(cfg.text_2_hidden_size, cfg.text_layers, max(1, cfg.text_heads // 2), cfg.max_length)
    transformer = SD3Transformer2DModel(**transformer_kwargs(cfg))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, shift=cfg.shift)
    return {"transformer": transformer, "scheduler": scheduler,
            "vae": vae if vae is not None else load_toy_vae(),
            "text_encoder": te1, "tokenizer": tokenizer, "text_encoder_2": te2, "tokenizer_2": tokenizer,
            "text_encoder_3": None, "tokenizer_3": None}


def build_flow_pipeline(components: dict):
    """A ``StableDiffusion3Pipeline`` around ``components``, progress bar off."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_token_ids(text_encoder, text_encoder_2, ids: torch.Tensor, t5_tokens: int = T5_TOKENS):
    """SD3 text features of token ids (N, L) (both encoders share the tokenizer), as
    ``StableDiffusion3Pipeline.encode_prompt`` and :func:`diffalign.models.text.encode_prompts` make them:
    ``prompt_embeds`` (N, L + t5_tokens, D1 + D2) = [h_1 ‖ h_2 (penultimate layers) ; zeros], ``pooled``
    (N, D1 + D2) = [p_1 ‖ p_2] (text projections)."""
    out1 = text_encoder(ids, output_hidden_states=True)
    out2 = text_encoder_2(ids, output_hidden_states=True)
    clip = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (N, L, D)
    zeros = clip.new_zeros(clip.shape[0], t5_tokens, clip.shape[-1])
    return torch.cat([clip, zeros], dim=1), torch.cat([out1[0], out2[0]], dim=-1)


def save_flow_pipeline(pipe, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained(safe_serialization=True)``, then one tokenizer written as vocab + merges (no 3.6 MB
    ``tokenizer.json``) into ``tokenizer`` and ``tokenizer_2``."""
    from . import toy_model_path

    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        shutil.copytree(Path(toy_model_path()) / "tokenizer", out_dir / sub)
    index = json.loads((out_dir / "model_index.json").read_text())
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ValueError(f"saved a {index.get('_class_name')}, expected {PIPELINE_CLASS}")
    return out_dir


class _RepeatedLastTokenAttnProcessor:
    """``JointAttnProcessor2_0`` for a context whose last token stands for ``copies`` identical tokens.

    The ``T5_TOKENS`` zero rows of a T5-less SD3 prompt enter every block identically, so they stay identical
    and each gets the same attention output; in every query's softmax, ``copies`` equal keys weigh as one key
    with logit ``+ log(copies)``. So the transformer on ``[clip ; 0]`` with this processor gives exactly
    (up to float rounding) the image and CLIP outputs of the standard processor on ``[clip ; 0 × copies]``,
    at a third of the pretraining cost (16 + 16 + 1 tokens instead of 16 + 16 + 77).
    """

    def __init__(self, copies: int):
        self.log_copies = float(torch.log(torch.tensor(float(copies))))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        import torch.nn.functional as F

        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):  # (B, L, H·d) -> (B, H, L, d)
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = (split(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_copies
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(q.shape[2], -1))  # (Lq, Lk) bias
        out = out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1]).to(q.dtype)
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, ctx


def set_repeated_zero_tokens(transformer, copies: int | None) -> None:
    """``copies``: every attention treats the context's last token as ``copies`` copies
    (:class:`_RepeatedLastTokenAttnProcessor`); None: back to diffusers' ``JointAttnProcessor2_0``."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer.set_attn_processor(JointAttnProcessor2_0() if copies is None
                                   else _RepeatedLastTokenAttnProcessor(copies))
