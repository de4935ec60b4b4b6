"""Inference: a diffusers pipeline over trained weights, and images from prompts with one seed rule.

Every command that makes images (``generate``, ``personalize``, ``eval --model``, ``demo``, the toy worlds, the
trainer's validation) goes through this module. Seed rule: image ``i`` comes from its own
``torch.Generator("cpu").manual_seed(seeds[i])``, so an image does not depend on batching or on the device.
"""

from __future__ import annotations

import torch


def pipeline_from_components(components):
    """A diffusers pipeline (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``) over the components."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sched = DDIMScheduler.from_config(components.noise_scheduler.config)
    if components.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
            scheduler=sched,
        )
    return StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )



def load_pipeline(model: str, lora: str | None = None, device: str | None = None, dtype: str = "float32"):
    """Any diffusers text-to-image pipeline by id or folder, with a diffalign LoRA loaded when given."""
    import diffusers
    from diffusers import DiffusionPipeline
    from packaging.version import Version

    from .models.loading import ModelNotFoundError

    # diffusers 0.36 renamed ``torch_dtype`` to ``dtype``; older releases know only the former.
    key = "dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype"
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **{key: getattr(torch, dtype)})
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"could not load pipeline {model!r}: {str(err).splitlines()[0]}") from None
    if lora:
        from .models.lora import load_lora_into_pipeline

        load_lora_into_pipeline(pipe, lora)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(pipe, prompts: list[str], seeds: list[int], **kwargs):
    """One image per (prompt, seed), each from its own ``torch.Generator(seed)`` so images do not depend on batching."""
    images = []
    for prompt, seed in zip(prompts, seeds):
        g = torch.Generator(device="cpu").manual_seed(seed)
        images.append(pipe(prompt, generator=g, **kwargs).images[0])
    return images
