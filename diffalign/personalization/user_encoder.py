"""User encoders: a user's few-shot preference examples -> a fixed-size feature matrix, and features -> tokens.

PPD feeds N = 4 examples ``(prompt, preferred image, dispreferred image)`` of a user to a VLM (LLaVA-OneVision) and
takes intermediate hidden states as the user embedding ``u`` (layer and pooling not published). diffalign splits this
in two:

1. A **frozen encoder** (this module's ``*UserEncoder`` classes) maps the examples to features ``f`` of a fixed shape
   (N_f, D_f). Encoding is the expensive part, so the trainer runs it once per user and caches the result
   (``user_embeddings.safetensors``).
2. A small **trainable projection** (:class:`UserProjection`) maps ``f`` to the tokens ``u`` (N_u, D_u) the
   decoupled cross-attention reads (:mod:`diffalign.personalization.attention`), like IP-Adapter's image projection.

Encoders (``UserEncoderConfig.type``):

==========  ===========================================================================================================
``clip``    default. A CLIP model (transformers ``CLIPModel``, by hub id / local folder, or ``tiny`` for a random
            test-size one). Per example k: ``d_k = ĝ(x_k^w) - ĝ(x_k^l)`` (unit-normalised image embeddings) and
            ``p_k = ĥ(c_k)`` (unit-normalised prompt embedding). Features: ``[mean_k d_k ; mean_k p_k]``, (2, D_clip).
``vlm``     the paper's choice: a transformers image-text-to-text model by hub id (e.g.
            ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``). One chat holding all examples; hidden states of layer
            ``layer`` pooled as ``[mean over tokens ; last token]``, (2, D_lm). Needs the model weights locally.
``pixels``  toy/debug: no pretrained network. ``ĝ(x)`` = the image average-pooled to a ``grid x grid`` thumbnail:
            RGB (``channels: rgb``, 3·grid² values in [-1, 1]) or the distance from the background colour
            (``channels: saliency``, grid² values in [0, 1]: where the object is, whatever its colour), or that
            plus the lightness relative to the background (``saliency_luma``, 2·grid² values); with ``centre: true``
            the maps are first shifted so that the saliency centroid sits at the image centre, so the thumbnails show
            the object's size, shape and shade and not where it is; or (``object``) three statistics of the object
            itself, :func:`object_statistics`: area, lightness, elongation. Features ``[mean_k d_k]``, (1, D).
            Stands in for CLIP in the toy world, which has no pretrained image encoder.
==========  ===========================================================================================================

Means over the examples make ``clip`` and ``pixels`` features independent of the examples' order and defined for
any number of examples >= 1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

ENCODER_TYPES = ("clip", "vlm", "pixels")
PIXEL_CHANNELS = ("rgb", "saliency", "saliency_luma", "object")
_PIXEL_CHANNEL_COUNT = {"rgb": 3, "saliency": 1, "saliency_luma": 2}
# Saliency above which a pixel is the object (channels: object); the toy palette's colours are >= 0.25 apart.
OBJECT_THRESHOLD = 0.2
VLM_POOLING = ("mean_last", "mean", "last")
# Used when ``model`` is not given. CLIP ViT-L/14 is SD1.5's text tower family; LLaVA-OneVision is the paper's VLM
# (its smallest size; the paper's size is not published).
DEFAULT_MODELS = {"clip": "openai/clip-vit-large-patch14", "vlm": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"}
# CLIP's image normalisation (what CLIPImageProcessor uses).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PreferenceExample:
    """One few-shot example of a user's taste: the prompt, the image they preferred and the one they did not."""

    prompt: str
    chosen: object  # PIL image
    rejected: object  # PIL image


@dataclass
class UserEncoderConfig:
    # Which encoder.
    type: str = field(default="clip", metadata={"help": "clip | vlm | pixels (see diffalign.personalization."
                                                          "user_encoder)."})
    model: str | None = field(default=None, metadata={
        "help": "clip: CLIPModel hub id or folder (default openai/clip-vit-large-patch14), or 'tiny' (random, "
                "tests); vlm: image-text-to-text hub id (default llava-hf/llava-onevision-qwen2-0.5b-ov-hf; paper: "
                "LLaVA-OneVision). Unused for pixels."})
    # vlm only.
    layer: int = field(default=-2, metadata={"help": "vlm: which hidden-state layer is u (paper: 'intermediate', "
                                                     "exact layer not published)."})
    pooling: str = field(default="mean_last", metadata={"help": "vlm: mean_last | mean | last pooling of the layer."})
    # pixels only.
    grid: int = field(default=4, metadata={
        "help": "pixels: thumbnail size (features 3·grid² for rgb, grid² for saliency, 2·grid² for saliency_luma)."})
    channels: str = field(default="rgb", metadata={
        "help": "pixels: rgb (colour thumbnails) | saliency (distance from the border colour: where the object is) | "
                "saliency_luma (that and the lightness minus the border's) | object (the object's area, lightness "
                "and elongation; grid and centre unused)."})
    centre: bool = field(default=False, metadata={
        "help": "pixels + saliency(_luma): shift the maps so that the saliency centroid is at the image centre before "
                "pooling (translation-invariant thumbnails: size, shape and shade, not position)."})
    batch_size: int = field(default=32, metadata={"help": "Images per encoder forward when caching features."})

    def __post_init__(self):
        # Messages start with the bare field name: the config loader prefixes the section (objective.encoder.).
        if self.type not in ENCODER_TYPES:
            raise ValueError(f"type: must be one of {ENCODER_TYPES}, got {self.type!r}")
        if self.model is None and self.type in DEFAULT_MODELS:
            self.model = DEFAULT_MODELS[self.type]
        if self.pooling not in VLM_POOLING:
            raise ValueError(f"pooling: must be one of {VLM_POOLING}, got {self.pooling!r}")
        if self.grid < 1:
            raise ValueError(f"grid: must be >= 1, got {self.grid}")
        if self.channels not in PIXEL_CHANNELS:
            raise ValueError(f"channels: must be one of {PIXEL_CHANNELS}, got {self.channels!r}")
        if self.centre and self.channels in ("rgb", "object"):
            raise ValueError(f"centre: needs channels: saliency or saliency_luma (rgb thumbnails have no zero "
                             f"background to shift in; object statistics have no position), got channels: "
                             f"{self.channels}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


class UserEncoder:
    """Interface: ``feature_shape`` (N_f, D_f) and ``encode(examples) -> (N_f, D_f)`` float32 on CPU."""

    feature_shape: tuple[int, int]

    def encode(self, examples: Sequence[PreferenceExample]) -> torch.Tensor:
        raise NotImplementedError

    def encode_users(self, users: Sequence[Sequence[PreferenceExample]]) -> torch.Tensor:
        """(U, N_f, D_f) for U users; subclasses batch across users where they can."""
        return torch.stack([self.encode(ex) for ex in users])


def _check_examples(examples):
    if len(examples) == 0:
        raise ValueError("a user needs at least one preference example")


class PooledDifferenceEncoder(UserEncoder):
    """Features ``[mean_k (ĝ(x_k^w) - ĝ(x_k^l)) ; mean_k ĥ(c_k)]`` from an image embedder ĝ and an optional prompt
    embedder ĥ (rows: 2 with a prompt embedder, 1 without)."""

    dim: int
    has_text: bool

    @property
    def feature_shape(self) -> tuple[int, int]:
        return (2 if self.has_text else 1, self.dim)

    def embed_images(self, images: list) -> torch.Tensor:  # (N, D)
        raise NotImplementedError

    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:  # (N, D)
        raise NotImplementedError

    def encode(self, examples):
        return self.encode_users([examples])[0]

    @torch.no_grad()
    def encode_users(self, users):
        for ex in users:
            _check_examples(ex)
        flat = [e for ex in users for e in ex]
        images = [e.chosen for e in flat] + [e.rejected for e in flat]
        emb = torch.cat([self.embed_images(images[i:i + self.batch_size])
                         for i in range(0, len(images), self.batch_size)]).float().cpu()  # (2E, D)
        diff = emb[: len(flat)] - emb[len(flat):]  # (E, D): chosen - rejected per example
        rows = [diff]
        if self.has_text:
            prompts = [e.prompt for e in flat]
            rows.append(torch.cat([self.embed_prompts(prompts[i:i + self.batch_size])
                                   for i in range(0, len(prompts), self.batch_size)]).float().cpu())  # (E, D)
        out, start = [], 0
        for ex in users:
            stop = start + len(ex)
            out.append(torch.stack([r[start:stop].mean(0) for r in rows]))  # (N_f, D): pooled over the examples
            start = stop
        return torch.stack(out)  # (U, N_f, D)


def _rgb_and_background(images) -> tuple[np.ndarray, np.ndarray]:
    """``(arr, background)``: the images as (N, H, W, 3) float32 in [0, 1] and each one's background colour (N, 3),
    the per-channel median of its one-pixel border."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])  # (N, H, W, 3)
    border = np.concatenate([arr[:, 0], arr[:, -1], arr[:, 1:-1, 0], arr[:, 1:-1, -1]], axis=1)  # (N, 2H+2W-4, 3)
    return arr, np.median(border, axis=1)


def saliency_maps(images) -> np.ndarray:
    """(N, H, W) in [0, 1]: each pixel's RGB distance (Euclidean, channels in [0, 1], divided by √3) from the image's
    background colour, estimated as the per-channel median of the one-pixel border. "Where is the object",
    whatever its colour."""
    return _saliency(*_rgb_and_background(images))


def _saliency(arr: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(N, H, W): RGB distance of ``arr`` (N, H, W, 3) from ``background`` (N, 3), divided by √3."""
    return np.sqrt(((arr - background[:, None, None, :]) ** 2).sum(-1) / 3.0)


def luma_maps(images) -> np.ndarray:
    """(N, H, W) in [-1, 1]: each pixel's lightness (mean of R, G, B in [0, 1]) minus the background's (as in
    :func:`saliency_maps`): 0 on the background."""
    arr, background = _rgb_and_background(images)
    return arr.mean(-1) - background.mean(-1)[:, None, None]


def object_statistics(images, threshold: float = OBJECT_THRESHOLD) -> np.ndarray:
    """(N, 3) float64 per image, from the object mask ``F`` = pixels whose :func:`saliency_maps` value exceeds
    ``threshold``: area ``|F| / HW``; lightness, the mean over ``F`` of (R + G + B) / 3 in [0, 1]; elongation
    ``½ log(Var_F[x] / Var_F[y])`` (0 for a wide-as-tall object). All three are 0 for an empty mask. What a
    perception model would say about "the object", whatever its colour and wherever it is."""
    arr, background = _rgb_and_background(images)  # one decoding for the mask and the lightness
    fg = _saliency(arr, background) > threshold  # (N, H, W)
    lum = arr.astype(np.float64).mean(-1)  # (N, H, W)
    out = np.zeros((len(fg), 3))
    for i, mask in enumerate(fg):
        ys, xs = np.nonzero(mask)
        if len(xs):
            out[i, 0] = len(xs) / mask.size
            out[i, 1] = lum[i][mask].mean()
            if xs.var() > 0 and ys.var() > 0:
                out[i, 2] = 0.5 * np.log(xs.var() / ys.var())
    return out


def centre_maps(maps: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W) -> (N, H, W): each map shifted by whole pixels so that the centroid of ``weights`` (default: the
    map itself; non-negative, pixel centres at ``i + 0.5``) lands on the image centre ``(H/2, W/2)``; what is
    shifted in is 0. A map whose weights are all zero is returned as it is."""
    weights = maps if weights is None else weights
    out = np.zeros_like(maps)
    _, height, width = maps.shape
    for i, (m, wt) in enumerate(zip(maps, weights)):
        total = float(wt.sum())
        if total <= 0:
            out[i] = m
            continue
        cy = float((wt.sum(1) * (np.arange(height) + 0.5)).sum()) / total
        cx = float((wt.sum(0) * (np.arange(width) + 0.5)).sum()) / total
        dy, dx = round(height / 2 - cy), round(width / 2 - cx)
        src_y, dst_y = slice(max(0, -dy), min(height, height - dy)), slice(max(0, dy), min(height, height + dy))
        src_x, dst_x = slice(max(0, -dx), min(width, width - dx)), slice(max(0, dx), min(width, width + dx))
        out[i, dst_y, dst_x] = m[src_y, src_x]
    return out


class PixelUserEncoder(PooledDifferenceEncoder):
    """ĝ(x) = the image as a ``grid x grid`` thumbnail (box filter), flattened. ``channels="rgb"``: RGB in [-1, 1],
    3·grid² values; ``channels="saliency"``: :func:`saliency_maps` in [0, 1], grid² values (layout, colour-blind);
    ``"saliency_luma"``: those and :func:`luma_maps`, 2·grid² values. With ``centre=True`` the maps are shifted to the
    saliency centroid first (:func:`centre_maps`: size, shape and shade, not position)."""

    has_text = False

    def __init__(self, grid: int = 4, batch_size: int = 32, channels: str = "rgb", centre: bool = False):
        if channels not in PIXEL_CHANNELS:
            raise ValueError(f"channels: must be one of {PIXEL_CHANNELS}, got {channels!r}")
        if centre and channels in ("rgb", "object"):
            raise ValueError("centre=True needs channels='saliency' or 'saliency_luma'")
        self.grid, self.batch_size, self.channels, self.centre = grid, batch_size, channels, centre
        self.dim = _pixel_feature_dim(channels, grid)

    def embed_images(self, images):
        from PIL import Image

        if self.channels == "object":
            return torch.from_numpy(object_statistics(images).astype(np.float32))  # (N, 3)
        if self.channels != "rgb":
            saliency = saliency_maps(images)  # (N, H, W)
            stacks = [saliency] + ([luma_maps(images)] if self.channels == "saliency_luma" else [])
            if self.centre:
                stacks = [centre_maps(m, saliency) for m in stacks]
            thumbs = [[np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize((self.grid, self.grid),
                                                                                       Image.BOX)) for m in maps]
                      for maps in stacks]  # per channel, N thumbnails (g, g)
            feats = np.concatenate([np.stack(t).reshape(len(images), -1) for t in thumbs], axis=1)
            return torch.from_numpy(feats.astype(np.float32))  # (N, g²) or (N, 2·g²): saliency first
        thumbs = [np.asarray(im.convert("RGB").resize((self.grid, self.grid), Image.BOX), dtype=np.float32)
                  for im in images]  # (g, g, 3) each
        arr = np.stack(thumbs) / 127.5 - 1.0  # (N, g, g, 3)
        return torch.from_numpy(arr.transpose(0, 3, 1, 2).reshape(len(images), -1))  # (N, 3·g²)


def tiny_clip_model(seed: int = 0):
    """A random test-size ``CLIPModel`` (vision 32 px, text 16 tokens, projection 16) built in code."""
    from transformers import CLIPConfig, CLIPModel

    from ..models.tokenizer import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE

    torch.manual_seed(seed)
    text = dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=CLIP_BOS_ID,
                eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


class ClipUserEncoder(PooledDifferenceEncoder):
    """ĝ, ĥ = unit-normalised CLIP image / text embeddings (``get_image_features`` / ``get_text_features``)."""

    has_text = True

    def __init__(self, model="tiny", *, device=None, dtype=torch.float32, batch_size: int = 32):
        from transformers import CLIPModel, CLIPTokenizer

        from ..models.tokenizer import clip_tokenizer

        if isinstance(model, str) and model == "tiny":
            self.model = tiny_clip_model()
            self.tokenizer = clip_tokenizer(model_max_length=self.model.config.text_config.max_position_embeddings)
        elif isinstance(model, str):
            self.model = CLIPModel.from_pretrained(model, dtype=dtype)
            self.tokenizer = CLIPTokenizer.from_pretrained(model)
        else:  # an instance (tests, or a model already in memory)
            self.model = model
            self.tokenizer = clip_tokenizer(model_max_length=model.config.text_config.max_position_embeddings)
        self.device = torch.device(device or "cpu")
        self.model = self.model.to(self.device).requires_grad_(False).eval()
        self.dim = self.model.config.projection_dim
        self.image_size = self.model.config.vision_config.image_size
        self.batch_size = batch_size

    def pixel_values(self, images) -> torch.Tensor:
        """CLIP preprocessing: resize the shorter side (bicubic), center-crop, normalise. (N, 3, S, S)."""
        from PIL import Image

        s, out = self.image_size, []
        for im in images:
            im = im.convert("RGB")
            scale = s / min(im.size)
            im = im.resize((max(s, round(im.width * scale)), max(s, round(im.height * scale))), Image.BICUBIC)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            out.append(np.asarray(im.crop((left, top, left + s, top + s)), dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)  # (N, 3, S, S)
        mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device, self.model.dtype)

    @staticmethod
    def _embeds(out) -> torch.Tensor:
        # transformers 5 returns a model output (pooler_output = projected embeddings); older ones a tensor.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def embed_images(self, images):
        emb = self._embeds(self.model.get_image_features(pixel_values=self.pixel_values(images))).float()
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def embed_prompts(self, prompts):
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        emb = self._embeds(self.model.get_text_features(input_ids=ids.to(self.device))).float()
        return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class VLMUserEncoder(UserEncoder):
    """The paper's encoder: a VLM reads all examples in one chat; ``u`` = pooled hidden states of one layer.

    Loading code only (needs the weights; not exercised by the offline tests). Features (2, D) for
    ``pooling="mean_last"`` (mean over the sequence; last token), else (1, D).
    """

    INSTRUCTION = ("Each example shows a prompt and two images generated for it; the user preferred the first. "
                   "Describe this user's visual preferences.")

    def __init__(self, model: str, *, layer: int = -2, pooling: str = "mean_last", device=None,
                 dtype=torch.bfloat16):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).eval().requires_grad_(False)
        self.device = torch.device(device or "cpu")
        self.model.to(self.device)
        self.layer, self.pooling = layer, pooling
        cfg = self.model.config
        dim = getattr(cfg, "text_config", cfg).hidden_size
        self.feature_shape = (2 if pooling == "mean_last" else 1, dim)

    @torch.no_grad()
    def encode(self, examples):
        _check_examples(examples)
        content, images = [], []
        for k, ex in enumerate(examples, 1):
            content += [{"type": "text", "text": f"Example {k}. Prompt: {ex.prompt}\nPreferred:"}, {"type": "image"},
                        {"type": "text", "text": "Not preferred:"}, {"type": "image"}]
            images += [ex.chosen.convert("RGB"), ex.rejected.convert("RGB")]
        content.append({"type": "text", "text": self.INSTRUCTION})
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = self.processor(text=[text], images=images, return_tensors="pt").to(self.device)
        hidden = self.model(**inputs, output_hidden_states=True).hidden_states[self.layer][0].float()  # (L, D)
        mask = inputs["attention_mask"][0].bool()
        h = hidden[mask]  # (L', D)
        rows = {"mean": [h.mean(0)], "last": [h[-1]], "mean_last": [h.mean(0), h[-1]]}[self.pooling]
        return torch.stack(rows).cpu()  # (N_f, D)


def _pixel_feature_dim(channels: str, grid: int) -> int:
    return 3 if channels == "object" else _PIXEL_CHANNEL_COUNT[channels] * grid * grid


def build_user_encoder(config: UserEncoderConfig, device=None) -> UserEncoder:
    """The encoder a :class:`UserEncoderConfig` names."""
    if config.type == "pixels":
        return PixelUserEncoder(config.grid, config.batch_size, config.channels, config.centre)
    if config.type == "clip":
        return ClipUserEncoder(config.model, device=device, batch_size=config.batch_size)
    return VLMUserEncoder(config.model, layer=config.layer, pooling=config.pooling, device=device)


def encoder_feature_shape(config: UserEncoderConfig) -> tuple[int, int]:
    """(N_f, D_f) of an encoder's features from its config alone (no weights are loaded)."""
    if config.type == "pixels":
        return (1, _pixel_feature_dim(config.channels, config.grid))
    if config.type == "clip":
        if config.model == "tiny":
            return (2, tiny_clip_model().config.projection_dim)
        from transformers import CLIPConfig

        return (2, CLIPConfig.from_pretrained(config.model).projection_dim)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(config.model)
    return (2 if config.pooling == "mean_last" else 1, getattr(cfg, "text_config", cfg).hidden_size)


class UserProjection(nn.Module):
    """Features (B, N_f, D_f) -> user tokens (B, N_u, D_u): ``LayerNorm(W · flatten(g / ‖g‖))`` reshaped, with
    ``g = f / s`` (per dimension; ``‖·‖`` per row).

    The trainable half of the user encoder (IP-Adapter's ``ImageProjModel`` has the same Linear + LayerNorm form).
    Two choices make users distinguishable from the first step:

    * each feature row is scaled to unit L2 norm (no parameters): raw feature scales vary by encoder and shrink when
      a user's examples are few or disagree, and a small ``f`` would otherwise leave every user with nearly the same
      tokens. Only the scale goes; the direction, which is the taste, stays whole (an earlier version standardised
      each row to zero mean and unit variance, which also removed the row mean: with D_f = 2 it left only the sign
      of f_1 - f_2);
    * before that, each feature dimension is divided by its root-mean-square ``s`` over the training users' feature
      sets (:meth:`fit_feature_scale`, called by the trainer; a buffer, saved with the branch; 1 until fitted), so
      that a dimension with a small spread (the toy encoder's lightness beside its saliency) still counts;
    * ``W`` has no bias, so at initialisation opposite preferences (``f`` and ``-f``) give opposite tokens.

    Zeroed tokens (user-embedding dropout) are produced by the trainer *after* this module, so they switch the branch
    off exactly.
    """

    def __init__(self, feature_shape: tuple[int, int], num_tokens: int, token_dim: int):
        super().__init__()
        self.feature_shape = tuple(int(v) for v in feature_shape)
        self.num_tokens, self.token_dim = num_tokens, token_dim
        n_f, d_f = self.feature_shape
        self.proj = nn.Linear(n_f * d_f, num_tokens * token_dim, bias=False)
        self.norm = nn.LayerNorm(token_dim)
        self.register_buffer("feature_scale", torch.ones(n_f, d_f))

    @torch.no_grad()
    def fit_feature_scale(self, features: torch.Tensor) -> None:
        """``s`` = root-mean-square of each feature dimension over ``features`` (S, N_f, D_f), e.g. every training
        user's cached sets; dimensions that are always 0 keep ``s = 1``."""
        rms = features.reshape(-1, *self.feature_shape).double().pow(2).mean(0).sqrt()
        self.feature_scale.copy_(torch.where(rms > 0, rms, torch.ones_like(rms)).to(self.feature_scale.dtype))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim == 2:
            features = features[None]
        if tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(f"user features must have shape (B, {self.feature_shape[0]}, {self.feature_shape[1]}), "
                             f"got {tuple(features.shape)}")
        x = features.to(self.proj.weight.dtype) / self.feature_scale.to(self.proj.weight.dtype)
        x = torch.nn.functional.normalize(x, dim=-1)  # unit L2 norm per row (an all-zero row stays zero)
        tokens = self.proj(x.flatten(1)).view(-1, self.num_tokens, self.token_dim)  # (B, N_u, D_u)
        return self.norm(tokens)


# ---------------------------------------------------------------- examples files (CLI, toy world)
def load_examples(path: str | Path) -> list[PreferenceExample]:
    """Read a user's examples: a ``.json`` list or ``.jsonl`` lines of ``{"prompt", "chosen", "rejected"}`` with image
    paths relative to the file's folder."""
    from ..data.images import decode_image

    path = Path(path)
    text = path.read_text()
    rows = json.loads(text) if path.suffix == ".json" else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty list of {{prompt, chosen, rejected}} records")
    out = []
    for i, row in enumerate(rows):
        missing = {"prompt", "chosen", "rejected"} - set(row)
        if missing:
            raise ValueError(f"{path}: record {i} lacks {sorted(missing)}")
        out.append(PreferenceExample(str(row["prompt"]), decode_image(row["chosen"], path.parent),
                                     decode_image(row["rejected"], path.parent)))
    return out


def save_examples(examples: Sequence[PreferenceExample], path: str | Path) -> Path:
    """Write examples as ``path`` (.jsonl) plus PNGs in ``<stem>_images/`` next to it."""
    path = Path(path)
    img_dir = path.parent / f"{path.stem}_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(examples):
        c, r = img_dir / f"{i:03d}_chosen.png", img_dir / f"{i:03d}_rejected.png"
        ex.chosen.save(c)
        ex.rejected.save(r)
        lines.append(json.dumps({"prompt": ex.prompt, "chosen": str(c.relative_to(path.parent)),
                                 "rejected": str(r.relative_to(path.parent))}))
    path.write_text("\n".join(lines) + "\n")
    return path
