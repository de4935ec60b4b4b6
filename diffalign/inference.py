"""Inference: a diffusers pipeline over trained weights, and images from prompts with one seed rule.

Every command that makes images (``generate``, ``personalize``, ``eval --model``, ``demo``, the toy worlds, the
trainer's validation) goes through this module. Seed rule: image ``i`` comes from its own
``torch.Generator("cpu").manual_seed(seeds[i])``, so an image depends on its prompt and seed, not on the other images
of its batch or on the device (up to the rounding of batched kernels: one uint8 level between batch sizes).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def pipeline_from_components(components):
    """A diffusers pipeline over the components (sharing their modules): ``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline`` (with a DDIM sampler), ``StableDiffusion3Pipeline`` or ``FluxPipeline`` (with a
    copy of the flow scheduler, so sampling never touches the training one)."""
    import diffusers

    c = components
    if c.is_flow:
        sched = type(c.noise_scheduler).from_config(c.noise_scheduler.config)
        common = dict(transformer=c.transformer, scheduler=sched, vae=c.vae, text_encoder=c.text_encoder,
                      tokenizer=c.tokenizer, text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2)
        if c.family == "sd3":
            return diffusers.StableDiffusion3Pipeline(**common, text_encoder_3=c.text_encoder_3,
                                                      tokenizer_3=c.tokenizer_3)
        return diffusers.FluxPipeline(**common)
    sched = diffusers.DDIMScheduler.from_config(c.noise_scheduler.config)
    if c.is_sdxl:
        return diffusers.StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
            tokenizer_2=c.tokenizer_2, unet=c.unet, scheduler=sched,
        )
    return diffusers.StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_pipeline(model: str, lora: str | None = None, device: str | None = None,
                  dtype: str | torch.dtype = "float32", unet: str | None = None):
    """Any diffusers text-to-image pipeline by hub id or folder, progress bar off, on ``device`` (default: cuda when
    available).

    ``unet``: a U-Net (hub id or folder with a ``unet/`` subfolder, e.g. ``mhdang/dpo-sd1.5-text2image-v1``) in place
    of the model's; ``lora``: a diffalign LoRA folder loaded on top; ``dtype``: a ``torch.dtype`` or its name. A model
    or U-Net that cannot be loaded raises :class:`~diffalign.models.ModelNotFoundError` (one line).
    """
    import diffusers
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from packaging.version import Version

    from .models.loading import ModelNotFoundError

    # diffusers 0.36 renamed ``torch_dtype`` to ``dtype``; older releases know only the former.
    key = "dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype"
    dtype = {key: getattr(torch, dtype) if isinstance(dtype, str) else dtype}
    try:
        parts = {name: None for name in _absent_components(model)}  # e.g. SD3 without T5
        if unet is not None:
            parts["unet"] = UNet2DConditionModel.from_pretrained(unet, subfolder="unet", **dtype)
        pipe = DiffusionPipeline.from_pretrained(model, **dtype, **parts)
    except (OSError, ValueError) as err:
        what = f"pipeline {model!r}" + (f" with U-Net {unet!r}" if unet else "")
        raise ModelNotFoundError(f"could not load {what}: {str(err).strip().splitlines()[0]}") from None
    if lora:
        from .models.lora import load_lora_into_pipeline

        load_lora_into_pipeline(pipe, lora)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _flow_family(pipe) -> str | None:
    """``sd3`` / ``flux`` for a StableDiffusion3*/Flux* pipeline, else None."""
    name = type(pipe).__name__
    return "sd3" if name.startswith("StableDiffusion3") else "flux" if name.startswith("Flux") else None


def _absent_components(model: str) -> list[str]:
    """Components a local pipeline folder lists as ``[null, null]`` in ``model_index.json`` (an SD3 model saved
    without T5: ``text_encoder_3``, ``tokenizer_3``), which ``from_pretrained`` must be told are ``None``; the optional
    ones diffusers handles itself (safety checker, feature extractor, image encoder) are left out."""
    import json
    from pathlib import Path

    index = Path(model) / "model_index.json"
    if not index.is_file():
        return []
    info = json.loads(index.read_text())
    optional = {"safety_checker", "feature_extractor", "image_encoder"}
    return [k for k, v in info.items() if isinstance(v, list) and v == [None, None] and k not in optional]


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], *, batch_size: int = 1, hook=None, **kwargs) -> list:
    """One image per (prompt, seed) (PIL unless ``output_type`` says otherwise), in pipeline calls of ``batch_size``
    prompts.

    Seed rule: image ``i`` comes from its own ``torch.Generator("cpu").manual_seed(seeds[i])`` (module doc).
    ``kwargs`` go to every pipeline call (``num_inference_steps``, ``guidance_scale``, ``height``, ...).
    SD3/FLUX pipelines get ``max_sequence_length`` = the trainer's T5 length (:data:`~diffalign.models.loading.
    T5_MAX_LENGTH`: 77 for SD3, as diffusers' SD3 LoRA script; 512 for FLUX) unless ``kwargs`` set it: the SD3
    pipeline's own default, 256, conditions on other tokens than the model was aligned with (zeros without T5).
    ``hook(call)``, given the keyword arguments of one call (``prompt``, ``generator``, ``kwargs``), returns a context
    manager entered around that call whose value is a dict of extra keyword arguments for it (e.g. the PPD user
    tokens sized for the batch: :func:`diffalign.personalization.cli.serve_users`).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts for {len(seeds)} seeds")
    family = _flow_family(pipe)
    if family is not None and "max_sequence_length" not in kwargs:
        from .models.loading import T5_MAX_LENGTH

        kwargs["max_sequence_length"] = T5_MAX_LENGTH[family]  # the T5 length the trainer encodes with
    images = []
    for i in range(0, len(prompts), batch_size):
        call = {"prompt": list(prompts[i:i + batch_size]),
                "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]], **kwargs}
        with hook(call) if hook else nullcontext({}) as extra:
            images.extend(pipe(**call, **extra).images)
    return images
