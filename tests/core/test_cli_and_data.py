"""The command line as a user meets it: clear one-line errors, a run that survives missing images."""

import json

import pytest
import yaml

from diffalign.cli import main
from diffalign.data import DatasetFormatError, PairTransform, PreferencePairs, collate_pairs, pickapic_winner
from fixtures.data import base_config, png_bytes


def write_config(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(learning_rate=1e-4), "config error: learning_rate: unknown key"),
        (lambda c: c["optimizer"].update(learning_rate=0), "optimizer.learning_rate: must be > 0"),
        (lambda c: c.update(objective={"name": "dpo", "beta": -5}), "objective.beta: must be > 0"),
        (lambda c: c["model"].update(lora={"rank": 0}), "model.lora.rank: must be >= 1"),
        (lambda c: c.update(max_steps="many"), "max_steps: expected an integer"),
        (lambda c: c.update(objective="dpoo"), "objective.name: unknown objective 'dpoo'"),
        (lambda c: c.pop("output_dir"), "output_dir: required key is missing"),
    ],
)
def test_bad_config_is_one_clear_line(mutate, message, tmp_path, capsys, pickapic_dir):
    cfg = base_config(tmp_path / "model", pickapic_dir, tmp_path / "out")
    mutate(cfg)
    assert main(["train", write_config(tmp_path / "c.yaml", cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_missing_model_is_one_clear_line(tmp_path, capsys, pickapic_dir):
    cfg = base_config(tmp_path / "no-such-model", pickapic_dir, tmp_path / "out")
    assert main(["train", write_config(tmp_path / "c.yaml", cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no-such-model" in err and len(err.splitlines()) == 1, err


def write_manifest(tmp_path, missing: set[int], n=6):
    rows = []
    for i in range(n):
        for kind in ("w", "l"):
            if not (kind == "l" and i in missing):
                (tmp_path / f"{i}_{kind}.png").write_bytes(png_bytes((40 * i, 100, 200 if kind == "w" else 0)))
        rows.append({"prompt": f"prompt {i}", "chosen": f"{i}_w.png", "rejected": f"{i}_l.png"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_manifest_with_missing_image_trains_and_counts_the_skip(tiny_sd15_dir, tmp_path, capsys):
    manifest = write_manifest(tmp_path, missing={2})
    cfg = base_config(tiny_sd15_dir, manifest, tmp_path / "out", max_steps=4, batch_size=2)
    assert main(["train", write_config(tmp_path / "c.yaml", cfg)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["skipped_samples"] >= 1  # 6 pairs, 4 steps x 2 crosses the bad pair at least once
    assert "skipped" in capsys.readouterr().out
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


def test_dataset_without_required_columns(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "a", "image": "b"}))
    with pytest.raises(DatasetFormatError, match="expected Pick-a-Pic columns"):
        PreferencePairs(str(path))


def test_ties_and_bad_labels_dropped(pickapic_dir):
    ds = PreferencePairs(str(pickapic_dir))
    assert (ds.stats.rows, ds.stats.ties_dropped, ds.stats.kept) == (12, 4, 8)
    assert pickapic_winner(0.0, 1.0, False) == 1 and pickapic_winner(1, 0, False) == 0
    assert pickapic_winner(0.5, 0.5, False) is None and pickapic_winner(0.5, 0.5, True) == 0
    assert pickapic_winner(float("nan"), 1.0, False) is None and pickapic_winner(2.0, 0.0, False) is None


def test_winner_and_loser_get_the_same_crop_and_flip():
    import random

    import numpy as np
    from PIL import Image

    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:, :10] = 255  # a white band on the left edge
    img = Image.fromarray(arr)
    tf = PairTransform(resolution=32, center_crop=False, random_flip=True)
    for seed in range(20):
        w, l, original, crop, flip = tf(img, img.copy(), random.Random(seed))
        assert original == (40, 60)
        assert w.shape == (3, 32, 32) and (w == l).all()


def test_winner_is_the_labelled_image(pickapic_dir):
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(pickapic_dir / "train.parquet").to_pylist()
    ds = PreferencePairs(str(pickapic_dir), transform=PairTransform(8, random_flip=False))
    batch = collate_pairs([ds[i] for i in range(len(ds))])
    kept = [r for r in table if r["label_0"] != r["label_1"]]
    for j, row in enumerate(kept):
        win = row["jpg_0"] if row["label_0"] == 1 else row["jpg_1"]
        color = Image.open(io.BytesIO(win)).getpixel((0, 0))
        got = ((batch["pixels_w"][j, :, 0, 0] + 1) * 127.5).round().tolist()
        assert got == pytest.approx(list(color), abs=1)


def test_every_shipped_config_parses():
    from pathlib import Path

    from diffalign.training.config import load_config

    configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    assert len(configs) >= 11
    for path in configs:
        cfg = load_config(path)
        assert cfg.max_steps > 0 and cfg.model.pretrained and path.read_text().startswith(
            f"# diffalign train configs/{path.name}")
