"""Imported once by the forkserver (see :mod:`bench.measure`), so every isolated job starts with these loaded."""

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of train() and of transformers' loaders
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import accelerate  # noqa: F401
import datasets  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

import bench.jobs  # noqa: F401
import diffalign.training.trainer  # noqa: F401
