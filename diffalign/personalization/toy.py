r"""A toy multi-user world for PPD: users with conflicting, pixel-defined tastes label the same image pairs.

**Users are favourite looks of the whole image.** Two statistics of an image ``x`` (32x32 RGB in [0, 1]):

.. math::

    l(x) = \operatorname{mean}_p \tfrac13 (R_p + G_p + B_p) \quad(\text{light} \leftrightarrow \text{dark}), \qquad
    w(x) = \operatorname{mean}_p (R_p - B_p) \quad(\text{warm} \leftrightarrow \text{cold})

Both hold everywhere in the image, which matters: a convolutional U-Net is translation-equivariant and the user tokens
are the same at every position, so the easiest thing a user branch can learn is a change that is the same
everywhere. Earlier versions of this world, recorded in docs/ppd.md, used properties of the object: centredness (met
only by shrinking shapes), elongation (not learned), size with the object's lightness (learned, but size two to two
and a half times more weakly, so a user between the two axes was served better by the lightness user), and the
object's lightness with the background's (both became one "lighten everything" move).

The axes are **whitened over pair differences** (two base samples of one prompt, the pairs users label):

.. math::

    z_1(x) = l(x) / s_l, \qquad z_2(x) = (w(x) - k\,l(x)) / s_w

with ``s_l`` the standard deviation of Δl, ``k`` the slope of Δw on Δl and ``s_w`` the standard deviation of the
residual (:data:`TASTE_WHITENING`, measured by :func:`fit_taste_whitening` on 400 pairs of the base model:
``python -m diffalign.personalization.toy fit-axes``). Over those pairs Δz has identity covariance: "lighter" and
"warmer" are independent tastes of equal spread. User ``θ`` (an angle in that plane) has the reward
``r_θ(x) = cos θ · z_1(x) + sin θ · z_2(x)``. The four training users (:data:`TRAIN_USERS`) sit at 0° (light), 90°
(warm), 180° (dark) and 270° (cold): opposite users have exactly opposite rewards, so one pair of images gets
opposite labels from them. Held-out users (:data:`HELDOUT_USERS`, halfway between two training users: light-warm,
dark-warm, dark-cold, light-cold) are never trained on; PPD serves them from 4 examples. Because the axes are
whitened, the mean preference direction of a user's decisive pairs (what an encoder can read from examples) points
along the user's own ``θ``. :func:`training_users` can add users between the four, e.g. every 30°.

**Base model**: ``assets/toy-sd-ppd`` (:data:`TOY_MODEL_DIR`), the shapes-world pipeline pretrained by the same
script on images whose colours vary freely (:mod:`diffalign.toy.shapes`: the shape's and the background's colour each
blended up to 30 % toward white or black, then the whole image up to 20 % toward warm orange or cold azure) and with
text cross-attention at the 8x8 latent level too (``python -m diffalign.toy pretrain --out assets/toy-sd-ppd --seed 0
--threads 2 --shade-jitter 0.3 --background-jitter 0.3 --cast-jitter 0.2 --unet-down-block-types CrossAttnDownBlock2D
CrossAttnDownBlock2D``). None of this is in the captions, so the base model draws a spread of lightness and warmth for
any prompt and each user's taste can be met on every prompt; one PPD model has to learn from the user's embedding
which way to move. Without the folder, ``assets/toy-sd`` (palette colours: only the shapes' sizes and positions vary,
so the tastes are barely met).

    python -m diffalign.personalization.toy make-pairs --out runs/ppd-toy/pairs      # data for configs/toy_ppd.yaml
    python -m diffalign.personalization.toy fit-axes                                 # re-measure TASTE_WHITENING
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..inference import generate, load_pipeline
from ..toy import assets_path
from ..toy.components import DEFAULT_BATCH_SIZE, DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS
from ..toy.shapes import heldout_prompts, train_prompts
from .user_encoder import PreferenceExample

ASSETS = assets_path()
TOY_MODEL_DIR = ASSETS / "toy-sd-ppd"  # the PPD base (module doc); falls back to the demo's assets/toy-sd
TASTE_FEATURES = ("lightness", "warmth")
# Sampling defaults of the toy pipeline (diffalign.toy.components): 20 DDIM steps, CFG 5.
GENERATION = {"num_inference_steps": DEFAULT_NUM_INFERENCE_STEPS, "guidance_scale": DEFAULT_GUIDANCE_SCALE}
# (s_l, k, s_w) of the module doc, from `python -m diffalign.personalization.toy fit-axes` (400 pairs, seed 0, of
# assets/toy-sd-ppd on the training prompts; Δl and Δw correlate at -0.05 there). Re-measure when the base changes.
TASTE_WHITENING = (0.0278, -0.1242, 0.0628)


def image_features(images) -> np.ndarray:
    """(N, 2): lightness ``l`` and warmth ``w`` of each whole image (module doc); PIL images."""
    rgb = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0 for im in images])  # (N, H, W, 3)
    return np.stack([rgb.mean((1, 2, 3)), (rgb[..., 0] - rgb[..., 2]).mean((1, 2))], axis=1)


def taste_axes(images, whitening: tuple[float, float, float] = TASTE_WHITENING) -> np.ndarray:
    """(N, 2): the whitened taste coordinates ``z_1`` (lightness), ``z_2`` (warmth beyond lightness) of the module
    doc."""
    s_l, k, s_w = whitening
    f = image_features(images)
    return np.stack([f[:, 0] / s_l, (f[:, 1] - k * f[:, 0]) / s_w], axis=1)


def fit_taste_whitening(features_0: np.ndarray, features_1: np.ndarray) -> tuple[float, float, float]:
    """``(s_l, k, s_w)`` from the image features (N, 2) of the two images of N pairs: with ``Δ = f_0 - f_1``
    (zero-mean by symmetry), ``s_l² = E[Δl²]``, ``k = E[Δl Δw] / E[Δl²]``, ``s_w² = E[(Δw - k Δl)²]``."""
    d = np.asarray(features_0, np.float64) - np.asarray(features_1, np.float64)
    var_l = float(np.mean(d[:, 0] ** 2))
    k = float(np.mean(d[:, 0] * d[:, 1]) / var_l)
    return math.sqrt(var_l), k, float(np.sqrt(np.mean((d[:, 1] - k * d[:, 0]) ** 2)))


@dataclass(frozen=True)
class ToyUser:
    """A user who likes taste direction ``angle`` (degrees): ``reward = cos·z_1 + sin·z_2`` (:func:`taste_axes`)."""

    name: str
    angle: float

    @property
    def direction(self) -> np.ndarray:
        a = math.radians(self.angle)
        return np.array([math.cos(a), math.sin(a)])

    def reward(self, images) -> np.ndarray:
        """(N,) float64."""
        return taste_axes(images) @ self.direction


TRAIN_USERS = (ToyUser("light", 0.0), ToyUser("warm", 90.0), ToyUser("dark", 180.0), ToyUser("cold", 270.0))
HELDOUT_USERS = (ToyUser("light-warm", 45.0), ToyUser("dark-warm", 135.0), ToyUser("dark-cold", 225.0),
                 ToyUser("light-cold", 315.0))


def training_users(every: float = 90.0) -> tuple[ToyUser, ...]:
    """The training users: one every ``every`` degrees around the taste circle, starting at 0° (light). The four of
    :data:`TRAIN_USERS` keep their names; the others are ``taste-<angle>`` (e.g. ``taste-030``). ``every`` must
    divide 90 (so the four named users are among them) and must not put a user on a held-out angle."""
    if every <= 0 or 90.0 % every:
        raise ValueError(f"training users every {every:g}°: the spacing must divide 90°")
    angles = [k * every for k in range(round(360 / every))]
    clash = sorted({u.angle for u in HELDOUT_USERS} & set(angles))
    if clash:
        raise ValueError(f"training users every {every:g}° would train on the held-out angles {clash}")
    named = {u.angle: u for u in TRAIN_USERS}
    return tuple(named.get(a, ToyUser(f"taste-{a:03.0f}", a)) for a in angles)


def toy_prompts() -> tuple[list[str], list[str]]:
    """(training prompts, evaluation prompts): the shapes world's TRAIN / HELD-OUT captions."""
    return train_prompts(), heldout_prompts()


def toy_base_model() -> str:
    """The base pipeline's folder: ``assets/toy-sd-ppd``, else ``assets/toy-sd``, whichever holds a pipeline first
    (both ship as package data)."""
    folders = (TOY_MODEL_DIR, ASSETS / "toy-sd")
    for folder in folders:
        if (folder / "model_index.json").is_file():
            return str(folder)
    raise FileNotFoundError(f"no toy pipeline (model_index.json) in {' or '.join(str(f) for f in folders)}")


@dataclass
class ImagePairs:
    """Unlabelled pairs from the base model: ``captions[k]`` with images ``images_0[k]``, ``images_1[k]``."""

    captions: list[str]
    images_0: list
    images_1: list
    seeds_0: list[int]
    seeds_1: list[int]

    def part(self, i: int, n: int) -> ImagePairs:
        """The ``i``-th of ``n`` disjoint, contiguous slices of equal size (the remainder is left out): e.g. each
        user's own pairs to draw few-shot examples from."""
        if not 0 <= i < n:
            raise ValueError(f"part {i} of {n}: need 0 <= i < n")
        m = len(self.captions) // n
        sl = slice(i * m, (i + 1) * m)
        return ImagePairs(self.captions[sl], self.images_0[sl], self.images_1[sl], self.seeds_0[sl], self.seeds_1[sl])


def sample_pairs(pipe, prompts: list[str], n_pairs: int, *, seed: int = 0, **generation) -> ImagePairs:
    """Pair k: prompt ``prompts[k mod len]``, seeds ``10⁶·seed + 2k`` and ``+1``; each image from a
    ``torch.Generator("cpu")`` of its own seeded with its seed (:func:`diffalign.inference.generate`, 64 images per
    pipeline call)."""
    kw = {**GENERATION, **generation}
    captions = [prompts[k % len(prompts)] for k in range(n_pairs)]
    s0 = [1_000_000 * seed + 2 * k for k in range(n_pairs)]
    s1 = [s + 1 for s in s0]
    images = generate(pipe, captions + captions, s0 + s1, batch_size=DEFAULT_BATCH_SIZE, **kw)
    return ImagePairs(captions, images[:n_pairs], images[n_pairs:], s0, s1)


def label_pairs(pairs: ImagePairs, users, *, tie_margin: float = 0.01) -> dict[str, list]:
    """Every user labels every pair with their reward (ties, ``|Δr| <= tie_margin``, are left out).

    Returns Pick-a-Pic-schema columns with ``user_id`` (the user's name) and the two rewards.
    """
    png_0, png_1 = [_png(im) for im in pairs.images_0], [_png(im) for im in pairs.images_1]
    cols = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "user_id", "reward_0", "reward_1")}
    for user in users:
        r0, r1 = user.reward(pairs.images_0), user.reward(pairs.images_1)
        for k in np.flatnonzero(np.abs(r0 - r1) > tie_margin):
            first = bool(r0[k] > r1[k])
            cols["caption"].append(pairs.captions[k])
            cols["jpg_0"].append(png_0[k])
            cols["jpg_1"].append(png_1[k])
            cols["label_0"].append(1.0 if first else 0.0)
            cols["label_1"].append(0.0 if first else 1.0)
            cols["user_id"].append(user.name)
            cols["reward_0"].append(float(r0[k]))
            cols["reward_1"].append(float(r1[k]))
    return cols


def write_pairs(columns: dict[str, list], out_dir: str | Path) -> Path:
    """``out_dir/train.parquet`` (a folder ``dataset.source`` can point at)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "train.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def user_examples(pairs: ImagePairs, user: ToyUser, n: int = 4, *, draw: int = 0, tie_margin: float = 0.01):
    """``n`` pairs the user is not indifferent about, as few-shot examples (chosen first): the ``draw``-th group of
    ``n`` such pairs in order (draws are disjoint). Give each user pairs of their own (:meth:`ImagePairs.part`): on
    shared pairs, users with similar tastes give the same labels, hence the same examples."""
    r0, r1 = user.reward(pairs.images_0), user.reward(pairs.images_1)
    out = []
    for k in np.flatnonzero(np.abs(r0 - r1) > tie_margin)[draw * n:(draw + 1) * n]:
        w, l = (pairs.images_0[k], pairs.images_1[k]) if r0[k] > r1[k] else (pairs.images_1[k], pairs.images_0[k])
        out.append(PreferenceExample(pairs.captions[k], w, l))
    if len(out) < n:
        raise ValueError(f"only {len(out)} decisive pairs for user {user.name!r}; sample more")
    return out


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m diffalign.personalization.toy",
                                description="toy multi-user preference data for PPD")
    sub = p.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-pairs", help="sample base pairs, label them by every training user")
    mk.add_argument("--out", required=True)
    mk.add_argument("--model", help="base pipeline (default: assets/toy-sd-ppd, else assets/toy-sd)")
    mk.add_argument("--n-pairs", type=int, default=300)
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--train-every", type=float, default=90.0,
                    help="a training user every this many degrees (default 90: light, warm, dark, cold)")
    fit = sub.add_parser("fit-axes", help="measure TASTE_WHITENING on base-model pairs of the training prompts")
    fit.add_argument("--model", help="base pipeline (default: assets/toy-sd-ppd, else assets/toy-sd)")
    fit.add_argument("--n-pairs", type=int, default=400)
    fit.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train, _ = toy_prompts()
    model = args.model or toy_base_model()
    pairs = sample_pairs(load_pipeline(model, device="cpu"), train, args.n_pairs, seed=args.seed)
    if args.command == "fit-axes":
        whitening = fit_taste_whitening(image_features(pairs.images_0), image_features(pairs.images_1))
        print(json.dumps({"TASTE_WHITENING": [round(v, 4) for v in whitening], "n_pairs": args.n_pairs}))
        return 0
    users = training_users(args.train_every)
    cols = label_pairs(pairs, users)
    path = write_pairs(cols, args.out)
    counts = {u.name: cols["user_id"].count(u.name) for u in users}
    print(json.dumps({"model": model, "pairs": str(path), "rows_per_user": counts}))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
