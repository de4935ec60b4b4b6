"""ImageReward (Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image Generation",
NeurIPS 2023, https://arxiv.org/abs/2304.05977), on transformers' BLIP modules instead of the vendored BLIP code
(no timm==0.6.13 / fairscale pins).

.. math::

    E = \\mathrm{ViT}(y), \\quad H = \\mathrm{BERT}_{\\times E}(x), \\quad
    \\mathrm{IR}(x, y) = \\frac{\\mathrm{MLP}(H_{[CLS]}) - μ}{σ}, \\quad μ = 0.16717362830052426,\\ σ = 1.0333394966054072

``E``: all 197 tokens of BLIP's ViT-L/16 (post-norm); ``H``: the MED text encoder run bidirectionally with
cross-attention to ``E`` (mode "multimodal"), ``[CLS]`` state (the first token stays ``[CLS]``, not ``[ENC]``).

Official path: THUDM/ImageReward ``ImageReward/ImageReward.py`` ``ImageReward.score`` @c1392c6 (= PyPI
``image-reward==1.5``): ``_transform(224)`` (PIL bicubic shortest side, torchvision ``CenterCrop``, OpenAI mean/std),
``BertTokenizer('bert-base-uncased')`` + ``[DEC]``/``[ENC]`` special tokens, ``padding='max_length',
truncation=True, max_length=35``; fp32. The official loader uses ``strict=False``; here every checkpoint key is
renamed explicitly (:func:`convert_state_dict`) and loaded strictly, and the only keys dropped are listed in
:data:`UNUSED_KEYS`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from . import _weights
from ._transforms import resize_center_crop, stack
from .aesthetic import AestheticMLP
from .base import Scorer, parse_dtype

HUB_REPO = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
TOKENIZER_REPO = "bert-base-uncased"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35

# train/src/config/med_config.json of the official repo (encoder_width is overwritten by the ViT width).
OFFICIAL_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}

# Checkpoint keys with no counterpart: BLIP's contrastive projections (unused by score) and med.py's persistent
# position_ids buffer (non-persistent in transformers).
UNUSED_KEYS = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")

_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.mlp\.fc(\d)\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "post_layernorm."),
]


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``ImageReward.pt`` key names -> :class:`ImageRewardModel` key names.

    ``blip.visual_encoder.*`` -> ``vision_model.*`` (table in ``shared/research/evaluators.md`` §4.6),
    ``blip.text_encoder.*`` -> ``text_encoder.*`` (identical below the prefix), ``mlp.*`` unchanged. A key that
    matches no rule and is not in :data:`UNUSED_KEYS` raises.
    """
    out = {}
    for key, value in state.items():
        if UNUSED_KEYS.search(key):
            continue
        if key.startswith("blip.visual_encoder."):
            sub = key[len("blip.visual_encoder.") :]
            for pattern, repl in _VISION_RENAMES:
                new, n = re.subn(pattern, repl, sub)
                if n:
                    out["vision_model." + new] = value
                    break
            else:
                raise KeyError(f"imagereward: unexpected vision key {key!r} in the checkpoint.")
        elif key.startswith("blip.text_encoder."):
            out["text_encoder." + key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            out[key] = value
        else:
            raise KeyError(f"imagereward: unexpected key {key!r} in the checkpoint.")
    return out


def vision_config_from_state(state: dict[str, torch.Tensor], head_dim: int = 64):
    """BLIP ViT config inferred from checkpoint shapes (ViT-L/16 for the real file: width 1024, 24 blocks, 16 heads
    of 64, patch 16, 224 px). BLIP's ViT uses LayerNorm eps 1e-6 and exact GELU."""
    from transformers import BlipVisionConfig

    prefix = "blip.visual_encoder."
    width = state[prefix + "cls_token"].shape[-1]
    patch = state[prefix + "patch_embed.proj.weight"].shape[-1]
    n_pos = state[prefix + "pos_embed"].shape[1]
    depth = 1 + max(
        int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))
    )
    grid = round((n_pos - 1) ** 0.5)
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=state[prefix + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=width // head_dim,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
    )


def text_config_from_med(med: dict, encoder_width: int):
    """``BlipTextConfig`` from a BLIP ``med_config.json``. ``is_decoder=True`` only makes transformers build the
    cross-attention modules; the forward runs with ``is_decoder=False`` (bidirectional mask), as BLIP does."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        layer_norm_eps=med["layer_norm_eps"],
        hidden_act=med["hidden_act"],
        hidden_dropout_prob=med.get("hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.0),
        pad_token_id=med.get("pad_token_id", 0),
        bos_token_id=None,  # BLIP's [DEC]/[SEP] ids are tokenizer matters; unused by the encoder
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,
    )


class ImageRewardModel(nn.Module):
    """BLIP ViT (``vision_model``) + BLIP text encoder with cross-attention (``text_encoder``) + ``mlp`` head."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        vision_config._attn_implementation = "eager"
        text_config._attn_implementation = "eager"
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        """pixel_values (B, 3, 224, 224), input_ids/attention_mask (B, 35) -> standardised rewards (B,)."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, 197, 1024)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        cls = text.last_hidden_state[:, 0, :].float()  # (B, 768)
        return ((self.mlp(cls) - MEAN) / STD).squeeze(-1)  # (B, 1) -> (B,)


def load_tokenizer(directory: str | Path):
    """BLIP's ``init_tokenizer``: BERT uncased + ``[DEC]`` as bos + ``[ENC]`` as additional special token."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(directory))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def _resolve(weights: str | None, scorer: str) -> tuple[Path, dict, Path]:
    """(checkpoint path, med config, tokenizer directory) for ``weights`` = None, a directory or a file."""
    med = OFFICIAL_MED_CONFIG
    tok_dir = None
    if weights is None:
        legacy = Path.home() / ".cache" / "ImageReward" / CHECKPOINT  # where the official package caches it
        ckpt = legacy if legacy.is_file() else _weights.hub_file(HUB_REPO, CHECKPOINT, scorer=scorer)
    elif _weights.is_local(weights):
        path = Path(weights).expanduser()
        if path.is_dir():
            hits = (
                [path / CHECKPOINT]
                if (path / CHECKPOINT).is_file()
                else sorted(path.glob("*.pt")) + sorted(path.glob("*.safetensors"))
            )
            if not hits:
                raise ValueError(f"{scorer}: no {CHECKPOINT} (or other .pt/.safetensors) in {path}.")
            ckpt = hits[0]
        else:
            ckpt = path
        if (ckpt.parent / MED_CONFIG).is_file():
            med = json.loads((ckpt.parent / MED_CONFIG).read_text())
        if (ckpt.parent / "vocab.txt").is_file():
            tok_dir = ckpt.parent
    else:
        raise ValueError(
            f"{scorer}: weights must be a local checkpoint file or directory (or None). Got {weights!r}."
        )
    if tok_dir is None:
        tok_dir = _weights.hub_dir(TOKENIZER_REPO, scorer=scorer, patterns=["vocab.txt", "*.json"])
    return ckpt, med, tok_dir


class ImageReward(Scorer):
    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, *, image_size: int = 224, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size

    @classmethod
    def from_pretrained(
        cls, weights: str | None = None, *, device="cpu", dtype=None, batch_size: int = 16
    ) -> ImageReward:
        """``weights``: ``ImageReward.pt`` (official state dict, loaded with ``weights_only=True``) or a directory
        holding it, optionally with ``med_config.json`` and the BERT tokenizer files (``vocab.txt``); missing
        pieces come from ``THUDM/ImageReward`` / ``bert-base-uncased`` on the hub."""
        ckpt, med, tok_dir = _resolve(weights, cls.name)
        state = _weights.load_state_dict(ckpt)
        vision_config = vision_config_from_state(state)
        model = ImageRewardModel(vision_config, text_config_from_med(med, vision_config.hidden_size))
        model.load_state_dict(convert_state_dict(state), strict=True)
        model = model.float().to(device=device, dtype=parse_dtype(dtype)).eval().requires_grad_(False)
        model.mlp.float()  # the head runs in fp32 on the float() [CLS] state, as in the official score()
        return cls(
            model,
            load_tokenizer(tok_dir),
            image_size=vision_config.image_size,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            weights=str(ckpt),
        )

    def _score_batch(self, images, prompts):
        pixels = stack(
            [
                resize_center_crop(
                    im, size=self.image_size, crop=(self.image_size,) * 2, crop_rounding="round"
                )
                for im in images
            ]
        )
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        return self.model(
            pixels.to(self.device, self.dtype),
            tokens["input_ids"].to(self.device),
            tokens["attention_mask"].to(self.device),
        )
