"""The model configurations the bench runs on, built from configs in code (random weights, no download), and the
preference data they train on.

=========  ==================================================================================================
world      what it is
=========  ==================================================================================================
``toy``    ``assets/toy-sd`` (+ ``assets/toy-pairs``) when present, else random-weight tiny components from
           the test fixtures (``tests/fixtures/tiny_models.py``: 32 px, 4x16x16 latents); 8 pairs per step
``sd15``   SD1.5-shaped: U-Net (320, 640, 1280, 1280) 859.5 M params, VAE (128, 256, 512, 512) 83.7 M, CLIP-L-shaped
           text encoder (768 hidden, 12 layers) 123.1 M; 512 px images, 4x64x64 latents, 77 tokens; 1 pair per step
``sd35m``  SD3.5-Medium-shaped flow world (:func:`sd35m_components`): ``SD3Transformer2DModel`` with the real
           config (24 heads x 64 = 1536 wide, joint_attention_dim 4096, pooled 2048, patch 2, 16 latent
           channels, RMS q/k norm, ``dual_attention_layers``, pos_embed_max_size 384) but **4 of 24 blocks**;
           CLIP-L (768) 2 of 12 layers, CLIP-G (1280) 5 of 32 layers, T5 (4096, d_ff 10240, 64 heads) 1 of 24
           layers, all at real widths; the SD3 VAE config (128, 256, 512, 512), 16 channels, x8; 256 px,
           16x32x32 latents, 77 CLIP + 128 T5 tokens (flow_grpo's max_sequence_length); 1 pair per step
=========  ==================================================================================================

``sd3_tiny``: the tiny SD3.5-like components of ``tests/fixtures/tiny_flow.py`` (32 px, 16x16x16 latents,
2 pairs per step), for the flow bench's smoke test.

The tiny scorers of the ``evaluators`` section are test fixtures too (``tests/fixtures/tiny_scorers.py``):
:func:`fixture_module` puts ``tests/`` on ``sys.path`` to import them.

Every strategy of the bench reads the same rows of the same Pick-a-Pic-schema parquet (``caption, jpg_0, jpg_1,
label_0, label_1``, no ties), written here with smooth random JPEG images at the world's resolution.
"""

from __future__ import annotations

import copy
import importlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_SD = REPO_ROOT / "assets" / "toy-sd"
TOY_PAIRS = REPO_ROOT / "assets" / "toy-pairs"
WORLDS = ("toy", "sd15", "sd35m", "sd3_tiny")
FLOW_WORLDS = ("sd35m", "sd3_tiny")


def fixture_module(name: str):
    """``tests/fixtures/<name>.py`` (random-weight models and scorers live with the tests, not the library)."""
    tests = str(REPO_ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(f"fixtures.{name}")


# SD1.5 configs (stable-diffusion-v1-5 unet/vae/text_encoder config.json, written out so nothing is downloaded).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=0.18215,
)
CLIP_L_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)

# SD3.5-Medium (stabilityai/stable-diffusion-3.5-medium transformer/vae/text_encoder*/scheduler config.json
# values, written out so nothing is downloaded). Depths are cut (``SD35M_LAYERS``) to fit a 2-core, 8 GiB per
# job budget: the full model is 2.5 B (transformer) + 0.8 B (CLIPs) + 4.8 B (T5-XXL) parameters, ~32 GiB
# in fp32.
SD35M_LAYERS = {"transformer": 4, "clip_l": 2, "clip_g": 5, "t5": 1}  # real: 24, 12, 32, 24
SD35M_RESOLUTION = 256  # 16x32x32 latents, 256 image tokens (real training: 512-1024 px)
SD35M_T5_TOKENS = 128  # flow_grpo's compute_text_embeddings(max_sequence_length=128)
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)),
)
SD35M_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2, sample_size=1024,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False,
)
SD35M_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD35M_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
SD35M_T5 = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                relative_attention_num_buckets=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                is_encoder_decoder=False)


@dataclass
class World:
    """A model configuration plus the data every strategy reads."""

    name: str
    components: object  # diffalign.models.Components
    data_dir: Path
    resolution: int
    batch_pairs: int
    num_pairs: int
    source: str  # where the components came from, for the report

    def fresh_components(self):
        """A deep copy: each strategy mutates its U-Net (LoRA injection, training)."""
        return copy.deepcopy(self.components)

    def describe(self) -> dict:
        c = self.components
        count = lambda m: sum(p.numel() for p in m.parameters())
        if getattr(c, "is_flow", False):
            f = self.resolution // _vae_factor(c.vae)
            return {
                "world": self.name, "source": self.source, "resolution": self.resolution,
                "batch_pairs": self.batch_pairs, "transformer_params": count(c.transformer),
                "transformer_layers": c.transformer.config.num_layers, "vae_params": count(c.vae),
                "text_encoder_params": [count(m) for m in c.text_encoders()],
                "latent_shape": [c.transformer.config.in_channels, f, f], "t5_tokens": c.t5_max_length,
                "reduced": dict(SD35M_LAYERS, real={"transformer": 24, "clip_l": 12, "clip_g": 32, "t5": 24})
                if self.name == "sd35m" else "tiny test fixture",
            }
        return {
            "world": self.name, "source": self.source, "resolution": self.resolution,
            "batch_pairs": self.batch_pairs, "unet_params": count(c.unet), "vae_params": count(c.vae),
            "text_encoder_params": count(c.text_encoder),
            "latent_shape": [4, self.resolution // _vae_factor(c.vae), self.resolution // _vae_factor(c.vae)],
            "text_tokens": int(c.tokenizer.model_max_length),
        }


def _vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def sd15_components(seed: int = 0):
    """SD1.5-shaped U-Net, VAE and CLIP-L text encoder with random weights (seeded)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffalign.models.loading import Components
    from diffalign.models.tokenizer import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    text_config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID,
                                 pad_token_id=CLIP_EOS_ID, **CLIP_L_TEXT)
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False, steps_offset=1)
    return Components("sd15", unet, vae, text_encoder, clip_tokenizer(model_max_length=77), scheduler,
                      source="sd15-shaped-random")


def sd35m_components(seed: int = 0, layers: dict | None = None):
    """SD3.5-Medium-shaped components with random weights (seeded), depths cut to ``layers`` (default
    :data:`SD35M_LAYERS`), widths real. T5's vocabulary is the offline test tokenizer's (~130 pieces, not
    32128): the embedding table is a lookup, so this cuts 0.5 GiB of memory and no compute."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffalign.models.loading import Components
    from diffalign.models.tokenizer import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, clip_tokenizer

    n = dict(SD35M_LAYERS, **(layers or {}))
    torch.manual_seed(seed)
    cfg = dict(SD35M_TRANSFORMER, num_layers=n["transformer"])
    # SD3.5-M: blocks 0-12 of 24 carry the second (dual) attention; keep the same share of the kept blocks
    cfg["dual_attention_layers"] = tuple(range(round(n["transformer"] * 13 / 24)))
    transformer = SD3Transformer2DModel(**cfg)
    vae = AutoencoderKL(**SD35M_VAE)

    def clip(shape, layers):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID,
            pad_token_id=CLIP_EOS_ID, **dict(shape, num_hidden_layers=layers)))

    t5_tokenizer = fixture_module("tiny_flow").t5_tokenizer(model_max_length=SD35M_T5_TOKENS)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **dict(SD35M_T5, num_layers=n["t5"])))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return Components("sd3", None, vae, clip(SD35M_CLIP_L, n["clip_l"]), clip_tokenizer(model_max_length=77),
                      scheduler, clip(SD35M_CLIP_G, n["clip_g"]), clip_tokenizer(model_max_length=77),
                      source="sd35m-shaped-random", transformer=transformer, text_encoder_3=t5,
                      tokenizer_3=t5_tokenizer, max_sequence_length=SD35M_T5_TOKENS)


def sd3_tiny_components(seed: int = 0):
    """The tiny SD3.5-like fixture (RMS q/k norm, a dual-attention block), T5 at 16 tokens."""
    c = fixture_module("tiny_flow").tiny_flow_components("sd3", seed=seed, sd35=True)
    c.max_sequence_length = fixture_module("tiny_flow").T5_LEN
    return c


def _complete(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and any((folder / "unet").glob("*.safetensors"))


def _committed_toy_sd(workdir: Path) -> tuple[Path, str] | None:
    """``assets/toy-sd`` as committed at HEAD, extracted read-only (``git archive``) into ``workdir``: the working
    tree copy can be mid-rewrite while another worker regenerates it."""
    import subprocess
    import tarfile

    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        target = Path(workdir) / f"toy-sd-{commit}"
        if not _complete(target / "assets" / "toy-sd"):
            blob = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "HEAD", "assets/toy-sd"],
                                  capture_output=True, check=True).stdout
            with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                tar.extractall(target, filter="data")
    except (OSError, subprocess.CalledProcessError, tarfile.TarError):
        return None
    folder = target / "assets" / "toy-sd"
    return (folder, f"assets/toy-sd @ {commit} (committed copy)") if _complete(folder) else None


def toy_components(seed: int = 0, workdir: Path | None = None):
    """``assets/toy-sd`` (working tree, else the committed copy), else the tiny random SD1.5-like components."""
    from diffalign.models import load_components

    if _complete(TOY_SD):
        return load_components(str(TOY_SD), family="sd15"), str(TOY_SD.relative_to(REPO_ROOT))
    committed = _committed_toy_sd(workdir) if workdir is not None else None
    if committed is not None:
        return load_components(str(committed[0]), family="sd15"), committed[1]
    tiny_components = fixture_module("tiny_models").tiny_components
    return tiny_components("sd15", seed=seed), "tests/fixtures/tiny_models.py: tiny_components('sd15')"


def _smooth_image(rng: np.random.Generator, size: int):
    """A smooth random RGB image: 8x8 noise upsampled bicubically (JPEG-compressible like a photo, not like noise)."""
    from PIL import Image

    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return small.resize((size, size), Image.BICUBIC)


def write_pairs(path: Path, num_pairs: int, resolution: int, seed: int = 0, fmt: str = "JPEG") -> Path:
    """Pick-a-Pic-schema parquet with ``num_pairs`` untied pairs of ``resolution``-px images and unique captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    done = path / "train-00000-of-00001.parquet"
    if done.is_file() and pq.read_metadata(done).num_rows == num_pairs:
        return path
    rng = np.random.default_rng(seed)
    colors = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    shapes = ("circle", "square", "triangle", "star")
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(num_pairs):
        rows["caption"].append(f"a {colors[i % 8]} {shapes[(i // 8) % 4]} on a plain background, photo {i}")
        for col in ("jpg_0", "jpg_1"):
            buf = io.BytesIO()
            _smooth_image(rng, resolution).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            rows[col].append(buf.getvalue())
        won = i % 2
        rows["label_0"].append(1.0 - won)
        rows["label_1"].append(float(won))
    path.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    pq.write_table(pa.table(rows), tmp)
    tmp.replace(done)
    return path


_TOY_CACHE: dict = {}


def build_world(name: str, workdir: Path, num_pairs: int, seed: int = 0) -> World:
    """Components + data for world ``name`` (one of :data:`WORLDS`); data is written under ``workdir``.

    Toy worlds are built once per process and handed out as deep copies (several jobs may share a process with
    ``--isolation none``); the SD1.5-shaped world is always built fresh (a cached copy would double its memory).
    """
    if name == "toy":
        key = (str(workdir), num_pairs, seed)
        if key not in _TOY_CACHE:
            _TOY_CACHE[key] = _build_world(name, workdir, num_pairs, seed)
        world = _TOY_CACHE[key]
        return World(world.name, copy.deepcopy(world.components), world.data_dir, world.resolution,
                     world.batch_pairs, world.num_pairs, world.source)
    return _build_world(name, workdir, num_pairs, seed)


def _build_world(name: str, workdir: Path, num_pairs: int, seed: int = 0) -> World:
    if name not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {name!r}")
    workdir = Path(workdir)
    if name == "toy":
        components, source = toy_components(seed, workdir)
        resolution = 32
        data = TOY_PAIRS if _has_enough_pairs(TOY_PAIRS, num_pairs) else write_pairs(
            workdir / f"pairs-toy-{num_pairs}", num_pairs, resolution, seed, fmt="PNG")
        return World("toy", components, Path(data), resolution, batch_pairs=8, num_pairs=num_pairs, source=source)
    if name == "sd35m":
        res = SD35M_RESOLUTION
        data = write_pairs(workdir / f"pairs-sd35m-{num_pairs}", num_pairs, res, seed, fmt="JPEG")
        return World("sd35m", sd35m_components(seed), data, res, batch_pairs=1, num_pairs=num_pairs,
                     source="sd35m-shaped-random (depth cut, bench/worlds.py)")
    if name == "sd3_tiny":
        data = write_pairs(workdir / f"pairs-sd3tiny-{num_pairs}", num_pairs, 32, seed, fmt="PNG")
        return World("sd3_tiny", sd3_tiny_components(seed), data, 32, batch_pairs=2, num_pairs=num_pairs,
                     source="tests/fixtures/tiny_flow.py: tiny_flow_components('sd3', sd35=True)")
    components = sd15_components(seed)
    data = write_pairs(workdir / f"pairs-sd15-{num_pairs}", num_pairs, 512, seed, fmt="JPEG")
    return World("sd15", components, data, 512, batch_pairs=1, num_pairs=num_pairs, source="sd15-shaped-random")


def _has_enough_pairs(path: Path, num_pairs: int) -> bool:
    """``assets/toy-pairs`` is used when it exists and has at least ``num_pairs`` untied rows."""
    files = sorted(path.glob("*.parquet")) if path.is_dir() else []
    if not files:
        return False
    import pyarrow.parquet as pq

    table = pq.read_table(files[0], columns=["label_0", "label_1"])
    untied = sum(a != b for a, b in zip(table["label_0"].to_pylist(), table["label_1"].to_pylist()))
    return untied >= num_pairs
