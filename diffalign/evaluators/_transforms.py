"""Image preprocessing of the official scorers, written out so that library backend changes cannot move scores.

Two pipelines cover all five scorers (constants and steps: ``shared/research/evaluators.md`` §2.2, §3.3, §4.3, §6.3):

* :func:`resize_center_crop` -- resize the *shortest* side with PIL bicubic, centre-crop, ``/255``, normalise.
  PickScore and CLIP score (transformers ``CLIPImageProcessor``, PIL backend: crop offset ``(h - c) // 2``),
  ImageReward and the aesthetic predictor (torchvision ``Resize`` + ``CenterCrop`` on PIL: crop offset
  ``int(round((h - c) / 2))``). The two crop conventions differ by one pixel when ``h - c`` is odd.
* :func:`letterbox` -- HPSv2's ``ResizeMaxSize``: ``ToTensor`` first, resize the *longest* side on the float tensor
  (torchvision bicubic, ``antialias`` as torchvision's default), pad with 0 to a square, normalise.

Deliberate deviation: every image is converted to RGB before anything else. ImageReward and openai-clip convert
after the resize (a palette image would be resized with nearest neighbour) and HPSv2 keeps RGBA as 4 channels
(a crash). Generated images are RGB, so scores of model outputs are unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# OpenAI CLIP pixel statistics, used by all five scorers.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_float_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HxWx3 PIL -> float32 3xHxW in [0, 1], as torchvision ``to_tensor`` does it (divide after the cast)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().float().div(255)


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean_t) / std_t


def resize_center_crop(
    image: Image.Image,
    *,
    size: int = 224,
    crop: tuple[int, int] = (224, 224),
    resample: int = Image.BICUBIC,
    crop_rounding: str = "floor",
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """Shortest side to ``size`` (long side ``int(size * long / short)``), centre crop ``crop`` = (h, w), normalise.

    Args:
        crop_rounding: "floor" (transformers: offset ``(h - ch) // 2``) or "round" (torchvision ``CenterCrop``:
            ``int(round((h - ch) / 2))``, Python's round-half-to-even).

    Returns:
        float32 tensor (3, crop_h, crop_w).
    """
    if crop_rounding not in ("floor", "round"):
        raise ValueError(f"crop_rounding must be 'floor' or 'round'. Got {crop_rounding!r}.")
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=resample)
    ch, cw = crop
    if ch > new_h or cw > new_w:
        raise ValueError(f"crop {crop} is larger than the resized image {(new_h, new_w)}.")
    if crop_rounding == "floor":
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
    else:
        top, left = round((new_h - ch) / 2.0), round((new_w - cw) / 2.0)  # half to even, as torchvision
    image = image.crop((left, top, left + cw, top + ch))
    return _normalize(_to_float_tensor(image), mean, std)


def letterbox(
    image: Image.Image,
    *,
    size: int = 224,
    antialias: bool = True,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """HPSv2's eval transform: longest side to ``size`` on the float tensor, zero-pad to a square, normalise.

    ``scale = size / max(h, w)``; if ``scale != 1`` the tensor is resized to ``(round(h*scale), round(w*scale))``
    with bicubic interpolation (no clamp: bicubic may overshoot [0, 1]) and padded (left, top, right, bottom) =
    ``(pw//2, ph//2, pw - pw//2, ph - ph//2)`` with 0 *before* normalisation. ``antialias=True`` is what the
    official package does on torchvision >= 0.17; ``False`` reproduces torchvision <= 0.16 runs.

    Returns:
        float32 tensor (3, size, size).
    """
    import torchvision.transforms.functional as TF

    x = _to_float_tensor(image.convert("RGB"))  # (3, H, W) in [0, 1]
    h, w = x.shape[1:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)
        x = TF.resize(x, [new_h, new_w], interpolation=TF.InterpolationMode.BICUBIC, antialias=antialias)
    new_h, new_w = x.shape[1:]
    if (new_h, new_w) != (size, size):
        # The official code pads only after a resize, so a (size x w<size) image would reach the ViT unpadded and
        # fail there; padding it too is a deliberate, score-neutral deviation.
        pad_h, pad_w = size - new_h, size - new_w
        x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return _normalize(x, mean, std)


def stack(pixels: list[torch.Tensor]) -> torch.Tensor:
    """List of (3, H, W) -> (N, 3, H, W)."""
    return torch.stack(pixels, dim=0)
