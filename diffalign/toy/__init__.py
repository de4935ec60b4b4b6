"""The toy world: a tiny real Stable Diffusion pipeline, procedural captioned shapes and an oracle reward.

Everything here runs on a CPU in seconds to minutes, so Diffusion-DPO can be shown end to end without a GPU or a
download:

* :mod:`~diffalign.toy.shapes`: 32x32 images of one coloured shape on a coloured background, captioned
  ``"a red circle on a blue background"``; 78 TRAIN and 12 HELD-OUT prompts.
* :mod:`~diffalign.toy.oracle`: a pixel-level reward (caption fidelity + a taste for bigger shapes).
* ``assets/toy-sd``: a ``StableDiffusionPipeline`` pretrained from scratch by :mod:`~diffalign.toy.pretrain`.
* ``assets/toy-pairs``: oracle-labelled pairs in the Pick-a-Pic v2 schema, made by :mod:`~diffalign.toy.pairs`.
* The toy **flow** world (:mod:`~diffalign.toy.flow`): ``assets/toy-flow``, a ``StableDiffusion3Pipeline``
  (small MMDiT, two small CLIP encoders, no T5, toy-sd's VAE) pretrained by :mod:`~diffalign.toy.flow_pretrain`, and
  ``assets/toy-flow-pairs`` labelled by the same oracle.

    >>> from diffusers import StableDiffusionPipeline
    >>> from diffalign import toy
    >>> pipe = StableDiffusionPipeline.from_pretrained(toy.toy_model_path())
    >>> prompts = toy.heldout_prompts()
    >>> images = toy.generate(pipe, prompts, seeds=list(range(len(prompts))))
    >>> toy.oracle_reward(images, prompts).mean()  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

from .components import (
    DEFAULT_FLOW_GUIDANCE_SCALE,
    DEFAULT_FLOW_NUM_INFERENCE_STEPS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    ToyModelConfig,
    build_components,
    build_pipeline,
    generate,
)
from .oracle import TERMS, caption_match, oracle_reward, oracle_terms
from .shapes import (
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    ShapeSpec,
    heldout_prompts,
    make_caption,
    parse_caption,
    render,
    render_batch,
    train_prompts,
)

ASSETS_ENV = "DIFFALIGN_ASSETS"


def assets_path() -> Path:
    """The shipped data (toy pipelines, pairs, prompt lists): ``$DIFFALIGN_ASSETS`` if set, else the package's
    ``diffalign/assets`` (package data, so a wheel install has it; ``assets`` at the repo root links there)."""
    override = os.environ.get(ASSETS_ENV)
    return Path(override) if override else Path(__file__).resolve().parents[1] / "assets"


def toy_model_path() -> Path:
    """The shipped toy pipeline folder, ``assets/toy-sd`` (load it with ``StableDiffusionPipeline.from_pretrained``)."""
    return assets_path() / "toy-sd"


def toy_pairs_path() -> Path:
    """The shipped pair set folder, ``assets/toy-pairs`` (``load_dataset("parquet", data_dir=...)`` reads it)."""
    return assets_path() / "toy-pairs"


def toy_flow_path() -> Path:
    """The shipped toy flow pipeline, ``assets/toy-flow`` (``StableDiffusion3Pipeline.from_pretrained``)."""
    return assets_path() / "toy-flow"


def toy_flow_pairs_path() -> Path:
    """The shipped pairs of the flow world, ``assets/toy-flow-pairs`` (same schema as ``toy-pairs``)."""
    return assets_path() / "toy-flow-pairs"


def load_toy_pipeline(path: str | os.PathLike | None = None):
    """The toy pipeline at ``path`` (default :func:`toy_model_path`) on the CPU, progress bar off
    (:func:`diffalign.inference.load_pipeline`)."""
    from ..inference import load_pipeline

    return load_pipeline(str(path or toy_model_path()), device="cpu")


__all__ = [
    "ASSETS_ENV",
    "COLOURS",
    "DEFAULT_FLOW_GUIDANCE_SCALE",
    "DEFAULT_FLOW_NUM_INFERENCE_STEPS",
    "DEFAULT_GUIDANCE_SCALE",
    "DEFAULT_NUM_INFERENCE_STEPS",
    "IMAGE_SIZE",
    "SHAPES",
    "TERMS",
    "ShapeSpec",
    "ToyModelConfig",
    "assets_path",
    "build_components",
    "build_pipeline",
    "caption_match",
    "generate",
    "heldout_prompts",
    "load_toy_pipeline",
    "make_caption",
    "oracle_reward",
    "oracle_terms",
    "parse_caption",
    "render",
    "render_batch",
    "toy_flow_pairs_path",
    "toy_flow_path",
    "toy_model_path",
    "toy_pairs_path",
    "train_prompts",
]
