"""Tiny, seeded, randomly initialised copies of every scorer architecture, saved in the *official* on-disk format,
for tests and CI (no download). Each ``save_tiny_*`` writes a directory that ``load(name, weights=DIR)`` accepts:

=====================  =========================================================================================
scorer                 what the directory holds
=====================  =========================================================================================
pickscore, clip        ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained`` (real CLIP BPE vocab)
aesthetic              the above + ``sac+logos+ava1-l14-linearMSE.pth`` (``torch.save`` of the MLP state dict)
hpsv2, hpsv2.1         ``HPS_v2[.1]_compressed.pt`` = ``{'state_dict': fp16 tensors}`` + ``open_clip_config.json``
imagereward            ``ImageReward.pt`` with the official ``blip.visual_encoder.*``/``blip.text_encoder.*``/``mlp.*``
                       names + ``med_config.json`` + a small BERT ``vocab.txt``
=====================  =========================================================================================

Also :func:`save_tiny_sd_pipeline`, a tiny ``StableDiffusionPipeline`` (diffusers' test-sized components).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

TINY_CLIP_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
TINY_CLIP_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 224,
    "patch_size": 32,
}
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# BLIP ViT: heads are inferred as width // 64 when loading (16 for the real ViT-L), so keep 64-wide heads.
TINY_BLIP_VISION = {"width": 128, "depth": 2, "patch": 32, "image_size": 224, "mlp": 256}
TINY_MED = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
}


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Re-draw every floating parameter from a seeded generator so tiny models give well-spread scores.

    Each parameter gets its own generator seeded from ``seed`` and its name, so the weights do not depend on the
    order in which a library version registers modules. Matrices: N(0, 1/fan_in) with fan_in = prod(shape[1:]); 1-D ``*norm*``/``ln*`` weights: 1 + N(0, 0.1); other 1-D:
    N(0, 0.1); 0-d parameters (``logit_scale``) keep their value.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.is_floating_point() or p.ndim == 0:
                continue
            # One generator per parameter, keyed by its name: the draw does not depend on module order.
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(max(1, math.prod(p.shape[1:]))))
            elif re.search(r"(norm|ln|LayerNorm)[^.]*\.weight$", name):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return module


@lru_cache(maxsize=1)
def _clip_tokenizer():
    # Building the fast tokenizer from the BPE merges takes seconds; do it once per process.
    from diffalign.models.tokenizer import clip_tokenizer

    return clip_tokenizer()


def tiny_clip_model(seed: int = 0):
    """A random ``transformers.CLIPModel`` (32-wide, 2 layers per tower, 224 px / patch 32, projection 16)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=TINY_CLIP_TEXT, vision_config=TINY_CLIP_VISION, projection_dim=16)
    return randomize_(CLIPModel(config), seed).eval()


def tiny_clip_processor(kind: str = "laion"):
    """``CLIPProcessor`` with the real CLIP tokenizer and the image settings of the official processors
    (laion ViT-H-14 and openai ViT-L/14 share them: shortest side 224, bicubic, crop 224, OpenAI mean/std)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    if kind not in ("laion", "openai"):
        raise ValueError(f"kind must be 'laion' or 'openai'. Got {kind!r}.")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3, do_center_crop=True
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=_clip_tokenizer())


def save_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """A tiny CLIPModel + CLIPProcessor directory: valid ``weights`` for ``pickscore`` and ``clip``."""
    directory = Path(directory)
    tiny_clip_model(seed).save_pretrained(directory)
    tiny_clip_processor().save_pretrained(directory)
    return directory


def save_tiny_aesthetic(directory: str | Path, seed: int = 0) -> Path:
    """Tiny CLIP tower + the aesthetic MLP head (input = projection dim 16) saved like the official ``.pth``."""
    from .aesthetic import HEAD_FILENAME, AestheticMLP

    directory = save_tiny_clip(directory, seed)
    head = randomize_(AestheticMLP(16), seed + 1)
    torch.save(head.state_dict(), directory / HEAD_FILENAME)
    return directory


def tiny_open_clip(seed: int = 0):
    from .hps import build_open_clip

    torch.manual_seed(seed)
    return randomize_(build_open_clip(TINY_OPEN_CLIP), seed).eval()


def save_tiny_hps(directory: str | Path, version: str = "v2.0", seed: int = 0) -> Path:
    """Tiny open_clip model saved as HPS's compressed checkpoint: ``{'state_dict': fp16 tensors}``."""
    from .hps import CHECKPOINTS, CONFIG_FILENAME

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.half() if v.is_floating_point() else v for k, v in tiny_open_clip(seed).state_dict().items()
    }
    torch.save({"state_dict": state}, directory / CHECKPOINTS[version])
    (directory / CONFIG_FILENAME).write_text(json.dumps(TINY_OPEN_CLIP, indent=2))
    return directory


def tiny_bert_vocab() -> list[str]:
    """A small uncased WordPiece vocabulary with BERT's special-token ids ([PAD]=0, [UNK]=100, [CLS]=101,
    [SEP]=102, [MASK]=103)."""
    words = [
        "a",
        "an",
        "the",
        "of",
        "and",
        "in",
        "on",
        "with",
        "at",
        "by",
        "for",
        "to",
        "from",
        "is",
        "are",
        "photo",
        "painting",
        "picture",
        "drawing",
        "portrait",
        "image",
        "cat",
        "dog",
        "bird",
        "fish",
        "horse",
        "car",
        "house",
        "tree",
        "city",
        "street",
        "sky",
        "sea",
        "ocean",
        "cloud",
        "clouds",
        "mountain",
        "river",
        "forest",
        "red",
        "blue",
        "green",
        "yellow",
        "black",
        "white",
        "golden",
        "dark",
        "bright",
        "small",
        "large",
        "old",
        "young",
        "beautiful",
        "cute",
        "man",
        "woman",
        "child",
        "people",
        "astronaut",
        "robot",
        "dragon",
        "castle",
        "flower",
        "flowers",
        "sunset",
        "night",
        "day",
        "time",
        "light",
        "oil",
        "watercolor",
        "digital",
        "art",
        "style",
        "detailed",
        "realistic",
        "anime",
        "fantasy",
        "landscape",
        "field",
        "effect",
        "depth",
        "low",
        "high",
    ]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,!?'\"-:;()&/")
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += chars + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab += [w for w in dict.fromkeys(words) if w not in vocab]
    return vocab


def _blip_vision_state(gen_seed: int) -> dict[str, torch.Tensor]:
    """Random BLIP-ViT tensors under the official ``blip.visual_encoder.*`` names (tiny sizes)."""
    from .imagereward import vision_config_from_state  # noqa: F401  (documents the inverse)

    c = TINY_BLIP_VISION
    d, n_pos = c["width"], (c["image_size"] // c["patch"]) ** 2 + 1
    gen = torch.Generator().manual_seed(gen_seed)

    def mat(*shape):
        return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))

    def vec(n, one=False):
        return (1.0 if one else 0.0) + 0.1 * torch.randn(n, generator=gen)

    p = "blip.visual_encoder."
    state = {
        p + "cls_token": 0.1 * torch.randn(1, 1, d, generator=gen),
        p + "pos_embed": 0.1 * torch.randn(1, n_pos, d, generator=gen),
        p + "patch_embed.proj.weight": mat(d, 3, c["patch"], c["patch"]),
        p + "patch_embed.proj.bias": vec(d),
    }
    for i in range(c["depth"]):
        b = f"{p}blocks.{i}."
        state.update(
            {
                b + "norm1.weight": vec(d, True),
                b + "norm1.bias": vec(d),
                b + "attn.qkv.weight": mat(3 * d, d),
                b + "attn.qkv.bias": vec(3 * d),
                b + "attn.proj.weight": mat(d, d),
                b + "attn.proj.bias": vec(d),
                b + "norm2.weight": vec(d, True),
                b + "norm2.bias": vec(d),
                b + "mlp.fc1.weight": mat(c["mlp"], d),
                b + "mlp.fc1.bias": vec(c["mlp"]),
                b + "mlp.fc2.weight": mat(d, c["mlp"]),
                b + "mlp.fc2.bias": vec(d),
            }
        )
    state.update({p + "norm.weight": vec(d, True), p + "norm.bias": vec(d)})
    return state


def tiny_med_config(vocab_size: int) -> dict:
    from .imagereward import OFFICIAL_MED_CONFIG

    return {
        **OFFICIAL_MED_CONFIG,
        **TINY_MED,
        "vocab_size": vocab_size,
        "encoder_width": TINY_BLIP_VISION["width"],
    }


def save_tiny_imagereward(directory: str | Path, seed: int = 0) -> Path:
    """Tiny ImageReward checkpoint with the official key names (incl. the unused ``vision_proj``/``text_proj`` and
    ``position_ids`` entries the real file has), ``med_config.json`` and a small ``vocab.txt``."""
    from transformers import BlipTextModel

    from .aesthetic import AestheticMLP
    from .imagereward import text_config_from_med

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = tiny_bert_vocab()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": 512})
    )
    med = tiny_med_config(len(vocab) + 2)  # + [DEC], [ENC]
    (directory / "med_config.json").write_text(json.dumps(med, indent=2))

    torch.manual_seed(seed)
    text = randomize_(
        BlipTextModel(text_config_from_med(med, TINY_BLIP_VISION["width"]), add_pooling_layer=False), seed
    )
    mlp = randomize_(AestheticMLP(med["hidden_size"]), seed + 1)
    state = _blip_vision_state(seed + 2)
    state.update({"blip.text_encoder." + k: v for k, v in text.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    state.update({"mlp." + k: v for k, v in mlp.state_dict().items()})
    gen = torch.Generator().manual_seed(seed + 3)
    state["blip.vision_proj.weight"] = torch.randn(256, TINY_BLIP_VISION["width"], generator=gen)
    state["blip.vision_proj.bias"] = torch.zeros(256)
    state["blip.text_proj.weight"] = torch.randn(256, med["hidden_size"], generator=gen)
    state["blip.text_proj.bias"] = torch.zeros(256)
    torch.save(state, directory / "ImageReward.pt")
    return directory


def save_tiny_scorer(name: str, directory: str | Path, seed: int = 0) -> Path:
    """Write tiny weights for registry name ``name`` into ``directory`` and return it."""
    if name in ("pickscore", "clip"):
        return save_tiny_clip(directory, seed)
    if name == "aesthetic":
        return save_tiny_aesthetic(directory, seed)
    if name in ("hpsv2", "hpsv2.1"):
        return save_tiny_hps(directory, "v2.0" if name == "hpsv2" else "v2.1", seed)
    if name == "imagereward":
        return save_tiny_imagereward(directory, seed)
    raise ValueError(f"no tiny config for {name!r}.")


def save_tiny_sd_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """A tiny ``StableDiffusionPipeline`` (UNet (4, 8) channels, VAE downsampling 2: 8x8 latents -> 16x16 images by
    default, any multiple of 2 via height/width; DDIM) saved with ``save_pretrained``. It makes noise-like images in
    milliseconds on CPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
        attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=49408,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return Path(directory)


def save_tiny_lora(pipeline_dir: str | Path, directory: str | Path, seed: int = 0, rank: int = 2) -> Path:
    """A random LoRA on the tiny pipeline's UNet attention projections, saved with ``save_lora_weights`` (what
    ``pipe.load_lora_weights(directory)`` reads); it changes the samples visibly."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(seed)
    state = {k: 0.5 * torch.randn(v.shape, generator=gen) for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=state)
    return Path(directory)
