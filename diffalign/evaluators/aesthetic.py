"""LAION improved aesthetic predictor v2 ("sac+logos+ava1-l14-linearMSE"): an MLP on the normalised CLIP ViT-L/14
image embedding, predicting the AVA 1-10 rating.

.. math::

    \\mathrm{aesthetic}(I) = \\mathrm{MLP}\\big(E_I / \\lVert E_I \\rVert\\big), \\qquad
    \\mathrm{MLP} = L_5 \\circ L_4 \\circ L_3 \\circ L_2 \\circ L_1 \\ \\text{(no activations: an affine map in eval)}

Official path: christophschuhmann/improved-aesthetic-predictor ``simple_inference.py`` @6934dd8 (openai-clip
``ViT-L/14``: shortest side 224 bicubic on PIL, torchvision ``CenterCrop`` 224, OpenAI mean/std; the prompt is not
used). Here the tower is transformers' ``openai/clip-vit-large-patch14`` ``get_image_features`` (the same 768-d
projected embedding; the route DiffusionDPO's ``aes_utils`` takes), run in fp32 unless ``dtype`` says otherwise;
the reference script runs the tower in fp16 on CUDA.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import _hf_clip, _weights
from ._transforms import stack
from .base import Scorer, l2_normalize, parse_dtype

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
HEAD_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
HEAD_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """``Linear(d,1024) Dropout(.2) Linear(1024,128) Dropout(.2) Linear(128,64) Dropout(.1) Linear(64,16)
    Linear(16,1)``; the dropouts keep the official state-dict indices ``layers.{0,2,4,6,7}``. Also ImageReward's
    head (same layout, input 768)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, d) -> (B, 1)


def _find_head(directory: Path) -> Path | None:
    for pattern in (HEAD_FILENAME, "*.safetensors", "*.pth", "*.pt"):
        hits = sorted(p for p in directory.glob(pattern) if p.name != "model.safetensors")
        if hits:
            return hits[0]
    return None


class AestheticScore(Scorer):
    name = "aesthetic"

    def __init__(self, clip_model, image_config: _hf_clip.ClipImageConfig, head: AestheticMLP, **kwargs):
        super().__init__(**kwargs)
        self.model = clip_model
        self.image_config = image_config
        self.head = head

    @classmethod
    def from_pretrained(
        cls,
        weights: str | None = None,
        *,
        clip: str | None = None,
        device="cpu",
        dtype=None,
        batch_size: int = 16,
        attn_implementation=None,
    ) -> AestheticScore:
        """``weights``: the MLP head file (``.pth`` or ``.safetensors``), or a directory holding it -- and, when the
        directory also holds a ``CLIPModel`` + ``CLIPProcessor`` (``config.json``), the CLIP tower too.
        ``weights=None`` downloads the head from the official GitHub repo into ``~/.cache/diffalign/aesthetic``.
        ``clip``: the CLIP tower (hub id or directory), default ``openai/clip-vit-large-patch14``.
        """
        head_path, clip_dir = None, None
        if weights is not None and _weights.is_local(weights):
            path = Path(weights).expanduser()
            if path.is_dir():
                head_path = _find_head(path)
                if head_path is None:
                    raise ValueError(
                        f"aesthetic: no {HEAD_FILENAME} (or other .pth/.safetensors head) in {path}."
                    )
                if (path / "config.json").is_file():
                    clip_dir = path
            else:
                head_path = path
        elif weights is None:
            head_path = _weights.url_file(HEAD_URL, HEAD_FILENAME, scorer=cls.name)
        else:
            raise ValueError(
                f"aesthetic: weights must be a local file or directory (or None). Got {weights!r}."
            )
        if clip is not None or clip_dir is None:
            clip_dir = _hf_clip.resolve_dir(clip, DEFAULT_CLIP, scorer=cls.name)

        torch_dtype = parse_dtype(dtype)
        model = _hf_clip.load_clip_model(
            clip_dir, device=device, dtype=torch_dtype, attn_implementation=attn_implementation
        )
        state = _weights.load_state_dict(head_path)
        head = AestheticMLP(state["layers.0.weight"].shape[1])
        head.load_state_dict(state, strict=True)
        image_config = _hf_clip.ClipImageConfig.from_pretrained(clip_dir, crop_rounding="round")
        return cls(
            model,
            image_config,
            head.float().to(device).eval().requires_grad_(False),
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            weights=str(head_path),
        )

    def embed_images(self, images) -> torch.Tensor:
        pixels = stack([self.image_config(im) for im in images]).to(self.device, self.dtype)
        return l2_normalize(_hf_clip.features(self.model.get_image_features(pixel_values=pixels)))  # (B, 768)

    def _score_batch(self, images, prompts):
        del prompts  # the aesthetic predictor ignores the prompt
        return self.head(self.embed_images(images)).squeeze(-1)  # (B, 1) -> (B,)
