"""``diffalign eval`` end to end: a tiny StableDiffusionPipeline (+ a tiny LoRA for model A) generates the bundled toy
prompts with fixed seeds, every tiny scorer scores them, and the CSV / JSON / HTML / PNG outputs are checked
against the scores recomputed directly."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffalign.cli import main as diffalign_main
from diffalign.evaluators import load
from diffalign.evaluators.cli import main as eval_main
from diffalign.evaluators.stats import win_rate

ALL = ["pickscore", "clip", "aesthetic", "hpsv2", "hpsv2.1", "imagereward"]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from fixtures import tiny_scorers as tiny

    root = tmp_path_factory.mktemp("tiny_sd")
    pipe = tiny.save_tiny_sd_pipeline(root / "pipe")
    return pipe, tiny.save_tiny_lora(pipe, root / "lora")


@pytest.mark.slow
def test_eval_generates_scores_and_reports(tiny_pipeline, tiny_dirs, tmp_path, capsys):
    pipe, lora = tiny_pipeline
    out = tmp_path / "eval"
    metrics = [arg for m in ALL for arg in ("--metric", f"{m}={tiny_dirs[m]}")]
    argv = [
        "eval",
        "--model",
        str(pipe),
        "--lora",
        str(lora),
        "--model-b",
        str(pipe),
        "--name-a",
        "dpo",
        "--name-b",
        "base",
    ]
    argv += [
        "--prompts",
        "toy",
        "--seeds",
        "0",
        "1",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--device",
        "cpu",
    ]
    argv += metrics + ["--batch-size", "3", "--n-boot", "200", "--out", str(out)]
    assert diffalign_main(argv) == 0  # through the top-level dispatcher
    assert "win rate" in capsys.readouterr().out

    with open(out / "scores.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 4 * 2  # models x toy prompts x seeds
    assert set(rows[0]) == {"model", "key", "prompt_idx", "seed", "prompt", "image", *ALL}
    toy = (Path(__file__).resolve().parents[2] / "assets" / "prompts" / "toy.txt").read_text().splitlines()
    assert {r["prompt"] for r in rows} == set(toy)

    # CSV scores == the scorers run directly on the saved images.
    for m in ALL:
        scorer = load(m, weights=str(tiny_dirs[m]))
        images = [Image.open(out / r["image"]).convert("RGB") for r in rows]
        direct = scorer.score(images, [r["prompt"] for r in rows]).numpy()
        np.testing.assert_allclose([float(r[m]) for r in rows], direct, atol=1e-5)

    # Same seed and prompt in A and B, but the LoRA changes the image.
    a = {r["key"]: r for r in rows if r["model"] == "dpo"}
    b = {r["key"]: r for r in rows if r["model"] == "base"}
    assert set(a) == set(b) == {f"{i:05d}_s{s}" for i in range(4) for s in (0, 1)}
    assert np.asarray(Image.open(out / a["00000_s0"]["image"])).shape == (32, 32, 3)
    assert not np.array_equal(
        np.asarray(Image.open(out / a["00000_s0"]["image"])),
        np.asarray(Image.open(out / b["00000_s0"]["image"])),
    )
    assert not np.array_equal(
        np.asarray(Image.open(out / a["00000_s0"]["image"])),
        np.asarray(Image.open(out / a["00000_s1"]["image"])),
    )

    summary = json.loads((out / "summary.json").read_text())
    assert summary["win_rates"]["_pair"] == "dpo vs base"
    for m in ALL:
        for model, recs in (("dpo", a), ("base", b)):
            s = summary["metrics"][m][model]
            values = [float(r[m]) for r in recs.values()]
            assert s["n"] == 8 and s["mean"] == pytest.approx(np.mean(values), abs=1e-9)
            assert s["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-9)
            assert s["ci_low"] <= s["mean"] <= s["ci_high"]
        keys = sorted(a)
        w = summary["win_rates"][m]
        assert w["rate"] == pytest.approx(
            win_rate([float(a[k][m]) for k in keys], [float(b[k][m]) for k in keys])
        )
        assert w["wins"] + w["ties"] + w["losses"] == 8
    assert 0 < summary["pickscore_preference"] < 1
    assert summary["meta"]["seeds"] == [0, 1]

    # report.html is self-contained: 3 + 6 histogram charts and 16 images, all embedded as PNG data URIs.
    html = (out / "report.html").read_text()
    sources = re.findall(r"src='([^']+)'", html)
    assert len(sources) == 2 + len(ALL) + 16
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) for s in sources]
    charts, grid = embedded[: 2 + len(ALL)], embedded[2 + len(ALL) :]
    assert [c.size for c in charts[:1]] == [Image.open(out / "charts" / "means.png").size]
    first = min(a)  # the grid's first row: A (dpo) then B (base), 32x32 images embedded unscaled
    assert np.array_equal(np.asarray(grid[0].convert("RGB")), np.asarray(Image.open(out / a[first]["image"])))
    assert np.array_equal(np.asarray(grid[1].convert("RGB")), np.asarray(Image.open(out / b[first]["image"])))
    with Image.open(out / "charts" / "means.png") as chart:
        assert chart.size[0] >= 800


def test_eval_scores_a_folder_with_csv_prompts(tiny_dirs, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = ["b.png", "a.png", "c.jpg"]
    for n in names:
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / n)
    prompts = {"a.png": "a cat", "b.png": "a dog", "c.jpg": "a castle"}
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "prompt"])
        w.writerows(prompts.items())
    out = tmp_path / "out"
    rc = eval_main(
        [
            "--images",
            str(folder),
            "--prompts",
            str(tmp_path / "p.csv"),
            "--metric",
            f"imagereward={tiny_dirs['imagereward']}",
            "--metric",
            f"aesthetic={tiny_dirs['aesthetic']}",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--n-boot",
            "50",
        ]
    )
    assert rc == 0
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == ["a", "b", "c"]
    assert [r["prompt"] for r in rows] == ["a cat", "a dog", "a castle"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["win_rates"] == {}  # one model: no win rates
    assert (out / "report.html").is_file() and (out / "charts" / "hist_imagereward.png").is_file()

    # A .txt must align with the sorted files.
    (tmp_path / "two.txt").write_text("one\ntwo\n")
    rc = eval_main(
        [
            "--images",
            str(folder),
            "--prompts",
            str(tmp_path / "two.txt"),
            "--metric",
            f"clip={tiny_dirs['clip']}",
            "--out",
            str(out),
        ]
    )
    assert rc == 2


def test_eval_missing_weights_prints_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    (tmp_path / "p.txt").write_text("a cat\n")
    rc = eval_main(
        [
            "--images",
            str(folder),
            "--prompts",
            str(tmp_path / "p.txt"),
            "--metric",
            "pickscore",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("diffalign eval: error: pickscore:") and "yuvalkirstain/PickScore_v1" in err
