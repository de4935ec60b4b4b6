"""The latent cache with ``random_flip``: the first visit of a pair caches both flips, so every later epoch hits."""

import io
import json

import numpy as np
import pytest
import torch
from fixtures.data import base_config

from diffalign.data.images import PairTransform
from diffalign.training.config import ConfigError, parse_config
from diffalign.training.trainer import PreferenceTrainer


def ramp_pairs(path, n=4):
    """Pick-a-Pic parquet whose images are horizontal colour ramps: a mirrored image differs from the original."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(n):
        rows["caption"].append(f"a ramp number {i}")
        for col in ("jpg_0", "jpg_1"):
            ramp = np.linspace(0, 1, 32)[None, :, None] * rng.integers(0, 255, 3)[None, None, :]
            buf = io.BytesIO()
            Image.fromarray(np.broadcast_to(ramp, (32, 32, 3)).astype(np.uint8)).save(buf, "PNG")
            rows[col].append(buf.getvalue())
        rows["label_0"].append(float(i % 2))
        rows["label_1"].append(float(1 - i % 2))
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path / "train.parquet")
    return path


class _Draw:
    """A stand-in ``random.Random`` whose draws decide the flip (< 0.5: flip)."""

    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


def test_flipped_pixels_are_the_mirror_of_the_unflipped_ones():
    """The cache encodes the other flip from the tensor (``pixels.flip(-1)``): that must be the flipped crop."""
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8))
    tf = PairTransform(resolution=32, center_crop=True, random_flip=True)
    plain_w, _, *_, flip_a = tf(img, img, _Draw(0.9))
    mirrored_w, _, *_, flip_b = tf(img, img, _Draw(0.1))
    assert (flip_a, flip_b) == (False, True)
    assert torch.equal(mirrored_w, plain_w.flip(-1))
    assert not torch.equal(mirrored_w, plain_w)


def _trainer(model_dir, data, out, mode, max_steps, batch_size=2):
    cfg = parse_config(base_config(model_dir, data, out / "run", max_steps=max_steps, batch_size=batch_size,
                                   **{"dataset.random_flip": True, "dataset.cache_dir": str(out / "cache"),
                                      "dataset.cache_flips": mode}))
    return PreferenceTrainer(cfg).setup()


def _train(model_dir, data, out, mode, max_steps, batch_size=2):
    tr = _trainer(model_dir, data, out, mode, max_steps, batch_size)
    tr.train()
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return tr, [r["data/latent_cache_hits"] for r in records]


def test_every_pair_hits_the_cache_after_the_first_epoch(tiny_sd15_dir, tmp_path):
    """4 pairs, 2 per step, 6 steps (3 epochs): ``auto`` (the default) caches both flips since pairs are
    visited again."""
    tr, hits = _train(tiny_sd15_dir, ramp_pairs(tmp_path / "data", n=4), tmp_path, "auto", max_steps=6)
    assert tr.cache_both_flips
    assert hits[:2] == [0.0, 0.0]  # epoch 1: every pair is encoded
    assert hits[2:] == [1.0] * 4  # epochs 2 and 3: whichever flip is drawn, it is cached

    tr.dataset.latent_cache = None  # decode pixels again, to encode them independently of the trainer
    vae = tr.components.vae
    for index in range(4):
        item = tr.dataset[index]
        pixels = torch.stack([item["pixels_w"], item["pixels_l"]])
        drawn, other = tr.cache.get_latents(index, item["flip"]), tr.cache.get_latents(index, not item["flip"])
        with torch.no_grad():
            dist, mirrored = vae.encode(pixels).latent_dist, vae.encode(pixels.flip(-1)).latent_dist
        torch.testing.assert_close(drawn["mean"], dist.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(other["mean"], mirrored.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(other["std"], mirrored.std, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(other["mean"], drawn["mean"].flip(-1), atol=1e-4)  # the VAE is not flip-equivariant


def test_drawn_caches_one_flip_and_later_epochs_miss_the_other(tiny_sd15_dir, tmp_path):
    """8 pairs, 4 per step, 6 steps (3 epochs): only the flips drawn are cached, so a pair whose flip changes
    from one epoch to the next is encoded again."""
    tr, hits = _train(tiny_sd15_dir, ramp_pairs(tmp_path / "data", n=8), tmp_path, "drawn", max_steps=6,
                      batch_size=4)
    assert not tr.cache_both_flips
    drawn = set()
    for epoch in range(3):
        tr.dataset.epoch = epoch
        drawn |= {(i, tr.dataset.transform.decide_flip(tr.dataset.rng(i))) for i in range(8)}
    cached = {(i, f) for i in range(8) for f in (False, True) if tr.cache.get_latents(i, f) is not None}
    assert cached == drawn and len(drawn) > 8  # some pair drew both flips over the 3 epochs
    assert hits[:2] == [0.0] * 2
    assert round(sum(4 * (1 - h) for h in hits[2:])) == len(drawn) - 8  # each later miss: a pair's other flip


def test_auto_caches_one_flip_when_no_pair_is_visited_twice_and_both_always_caches_two(tiny_sd15_dir, tmp_path):
    data = ramp_pairs(tmp_path / "data", n=4)
    tr, hits = _train(tiny_sd15_dir, data, tmp_path / "auto", "auto", max_steps=2)  # 4 visits of 4 pairs
    assert not tr.cache_both_flips and hits == [0.0, 0.0]
    assert sum(tr.cache.get_latents(i, f) is not None for i in range(4) for f in (False, True)) == 4
    assert _trainer(tiny_sd15_dir, data, tmp_path / "both", "both", max_steps=2).cache_both_flips


def test_cache_flips_must_be_auto_both_or_drawn(tiny_sd15_dir, pickapic_dir, tmp_path):
    with pytest.raises(ConfigError, match="dataset.cache_flips: must be auto, both or drawn, got 'mirror'"):
        parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path, **{"dataset.cache_flips": "mirror"}))
