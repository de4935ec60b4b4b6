"""Human Preference Score v2 / v2.1 (Wu et al., "Human Preference Score v2", 2023, https://arxiv.org/abs/2306.09341).

.. math::

    \\mathrm{HPS}(x, y) = \\langle \\hat v(y), \\hat t(x) \\rangle

the cosine between the L2-normalised open_clip ViT-H-14 image and text embeddings of the HPS checkpoint
(``logit_scale`` is not used). ``hpsv2.score`` returns this cosine (~0.2-0.35), which is what ``score`` returns; the
HPSv2 README benchmark tables report ``100 x`` it (:attr:`HPSv2.benchmark_scale`).

Official path: tgxs002/HPSv2 ``hpsv2/img_score.py`` @866735e (= PyPI ``hpsv2==1.2.0``): ``create_model_and_transforms(
'ViT-H-14', precision='amp', light_augmentation=True, output_dict=True)``, then ``load_state_dict(ckpt['state_dict'])``
of ``HPS_v2_compressed.pt`` (v2.0) or ``HPS_v2.1_compressed.pt`` (v2.1) from hub repo ``xswu/HPSv2``; the eval
transform is the letterbox of :func:`diffalign.evaluators._transforms.letterbox`; tokens from open_clip's
``SimpleTokenizer`` (77 tokens, truncated with EOT forced last). The model here is stock open_clip 3.x ``CLIP`` with
the same config and state-dict keys. Official scoring wraps the forward in CUDA autocast (fp16 matmuls on GPU);
pass ``dtype="fp16"`` for the closest match on GPU, fp32 (default) reproduces the CPU path exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import _weights
from ._transforms import letterbox, stack
from .base import Scorer, l2_normalize, parse_dtype

HUB_REPO = "xswu/HPSv2"
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
ARCH = "ViT-H-14"
CONFIG_FILENAME = (
    "open_clip_config.json"  # optional, next to the checkpoint: a non-ViT-H-14 (e.g. tiny) architecture
)


def build_open_clip(model_cfg: dict):
    """A stock open_clip ``CLIP`` from a model-config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...)."""
    from open_clip.model import CLIP

    cfg = dict(model_cfg)
    cfg.pop("custom_text", None)
    return CLIP(**cfg, output_dict=True)


def _checkpoint_and_config(weights: str | None, version: str, scorer: str) -> tuple[Path, dict]:
    import open_clip

    filename = CHECKPOINTS[version]
    if weights is None:
        path = _weights.hub_file(HUB_REPO, filename, scorer=scorer)
    elif _weights.is_local(weights):
        path = Path(weights).expanduser()
        if path.is_dir():
            hits = (
                [path / filename]
                if (path / filename).is_file()
                else sorted(path.glob("*.pt")) + sorted(path.glob("*.safetensors"))
            )
            if not hits:
                raise ValueError(f"{scorer}: no {filename} (or other .pt/.safetensors) in {path}.")
            path = hits[0]
    else:
        raise ValueError(
            f"{scorer}: weights must be a local checkpoint file or directory (or None). Got {weights!r}."
        )
    cfg_file = path.parent / CONFIG_FILENAME
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else open_clip.get_model_config(ARCH)
    return path, cfg


class HPSv2(Scorer):
    name = "hpsv2"
    benchmark_scale = 100.0  # README tables report 100 x cosine

    def __init__(
        self, model, tokenizer, *, image_size: int = 224, antialias: bool = True, version="v2.0", **kwargs
    ):
        super().__init__(**kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.antialias = antialias
        self.version = version

    @classmethod
    def from_pretrained(
        cls,
        weights: str | None = None,
        *,
        version: str = "v2.0",
        device="cpu",
        dtype=None,
        batch_size: int = 16,
        antialias: bool = True,
    ) -> HPSv2:
        """Load the HPS checkpoint (``{'state_dict': ...}`` or a bare state dict; fp16 tensors are up-cast) strictly
        into open_clip's ``CLIP``.

        Args:
            weights: the checkpoint file, or a directory holding it (and optionally ``open_clip_config.json``).
            version: "v2.0" or "v2.1" -- picks the hub file when ``weights`` is None or a directory.
            antialias: torchvision tensor-resize antialiasing (True = official package on torchvision >= 0.17).
        """
        from open_clip.tokenizer import SimpleTokenizer

        if version not in CHECKPOINTS:
            raise ValueError(f"version must be one of {sorted(CHECKPOINTS)}. Got {version!r}.")
        name = "hpsv2" if version == "v2.0" else "hpsv2.1"
        path, cfg = _checkpoint_and_config(weights, version, name)
        model = build_open_clip(cfg)
        state = _weights.load_state_dict(path)
        state = state.get("state_dict", state)
        model.load_state_dict(state, strict=True)
        model = model.float().to(device=device, dtype=parse_dtype(dtype)).eval().requires_grad_(False)
        tokenizer = SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))
        scorer = cls(
            model,
            tokenizer,
            image_size=cfg["vision_cfg"]["image_size"],
            antialias=antialias,
            version=version,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            weights=str(path),
        )
        scorer.name = name
        return scorer

    def _score_batch(self, images, prompts):
        pixels = stack([letterbox(im, size=self.image_size, antialias=self.antialias) for im in images])
        img = self.model.encode_image(pixels.to(self.device, self.dtype))
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device))
        return (l2_normalize(img) * l2_normalize(txt)).sum(-1)  # (B,)
