"""Shared loading for the transformers-``CLIPModel`` scorers (PickScore, CLIP score, the aesthetic tower)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import _weights
from ._transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resize_center_crop


@dataclass(frozen=True)
class ClipImageConfig:
    """The fields of a ``CLIPImageProcessor`` config that the pixel pipeline needs (see ``_transforms``)."""

    size: int = 224  # shortest edge after resize
    crop: tuple[int, int] = (224, 224)  # (h, w)
    resample: int = Image.BICUBIC
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    crop_rounding: str = "floor"  # transformers' convention; "round" = torchvision CenterCrop

    @classmethod
    def from_pretrained(cls, directory: str | Path, crop_rounding: str = "floor") -> ClipImageConfig:
        """Read the image-processor config that ``CLIPProcessor.save_pretrained`` wrote into ``directory``."""
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(str(directory))
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if getattr(proc, flag, True) is False:
                raise ValueError(f"{directory}: image processor has {flag}=False; CLIP scorers expect True.")
        rescale = float(getattr(proc, "rescale_factor", 1 / 255))
        if abs(rescale - 1 / 255) > 1e-12:
            raise ValueError(f"{directory}: rescale_factor must be 1/255. Got {rescale}.")
        return cls(
            size=int(_field(proc.size, "shortest_edge")),
            crop=(int(_field(proc.crop_size, "height")), int(_field(proc.crop_size, "width"))),
            resample=int(proc.resample),
            mean=tuple(float(v) for v in proc.image_mean),
            std=tuple(float(v) for v in proc.image_std),
            crop_rounding=crop_rounding,
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL -> normalised float32 (3, crop_h, crop_w)."""
        return resize_center_crop(
            image,
            size=self.size,
            crop=self.crop,
            resample=self.resample,
            crop_rounding=self.crop_rounding,
            mean=self.mean,
            std=self.std,
        )


def _field(d, key: str):
    # transformers 5.x stores sizes as SizeDict (attributes), 4.x as plain dicts.
    value = d.get(key) if isinstance(d, dict) else getattr(d, key, None)
    if value is None:
        raise ValueError(f"image processor size {d} has no {key!r}")
    return value


def resolve_dir(weights: str | None, default_id: str, *, scorer: str, metric: str | None = None) -> Path:
    """A local directory for ``weights`` (a directory path, or a hub id resolved through the cache/download)."""
    repo = weights or default_id
    if _weights.is_local(repo):
        path = Path(repo).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"{scorer}: {path} is a file; pass a directory holding a CLIPModel and its CLIPProcessor."
            )
        return path
    return _weights.hub_dir(repo, scorer=scorer, metric=metric)


def load_clip_model(directory: Path, *, device, dtype: torch.dtype, attn_implementation: str | None = None):
    """``CLIPModel`` from ``directory`` in eval mode on ``device``/``dtype`` (loaded in fp32 first: transformers 5
    loads in the checkpoint's dtype by default)."""
    from transformers import CLIPModel

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = CLIPModel.from_pretrained(str(directory), **kwargs)
    return model.float().to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4.x and a ``BaseModelOutputWithPooling`` in 5.x."""
    return output.pooler_output if hasattr(output, "pooler_output") else output
