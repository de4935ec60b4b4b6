"""``diffalign eval`` from a user's side: one-line errors (exit 2, no traceback), the toy oracle as a metric, and a
self-contained HTML report that survives being moved."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffalign.evaluators as ev
from diffalign.evaluators.cli import build_parser
from diffalign.evaluators.cli import main as eval_main
from diffalign.toy import caption_match, oracle_reward
from diffalign.toy.shapes import ShapeSpec, render

PNG_URI = "data:image/png;base64,"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("diffalign eval: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _toy_folder(folder: Path, specs: dict[str, ShapeSpec]) -> tuple[Path, list[Image.Image], list[str]]:
    """Render ``{file name: spec}`` into ``folder`` (PNG, lossless) and write ``prompts.csv`` (file, prompt)."""
    folder.mkdir(parents=True)
    images, captions = [], []
    for name, spec in sorted(specs.items()):
        im = render(spec)
        im.save(folder / name)
        images.append(im)
        captions.append(spec.caption)
    with open(folder.parent / f"{folder.name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "prompt"])
        w.writerows((name, spec.caption) for name, spec in specs.items())
    return folder.parent / f"{folder.name}.csv", images, captions


def _scores(out: Path) -> list[dict]:
    with open(out / "scores.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("flag", ["--images", "--images-b"])
def test_missing_image_folder_is_one_line(flag, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (8, 8)).save(real / "x.png")
    missing = tmp_path / "nofolder"
    argv = (
        ["--images", str(missing)]
        if flag == "--images"
        else ["--images", str(real), "--images-b", str(missing)]
    )
    rc = eval_main(argv + ["--metric", "aesthetic", "--out", str(tmp_path / "out")])
    line = _one_error_line(capsys)
    assert rc == 2
    assert line == f"diffalign eval: error: {flag} {missing}: no such folder"
    assert not (tmp_path / "out").exists()  # nothing written for a run that could not start


def test_images_pointing_at_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(f)
    rc = eval_main(["--images", str(f), "--metric", "aesthetic", "--out", str(tmp_path / "out")])
    assert rc == 2
    assert _one_error_line(capsys) == f"diffalign eval: error: --images {f}: not a folder"


def _clip_load_error(folder: Path) -> str:
    """The first line of what transformers raises for this folder (what the CLI must pass on)."""
    from transformers import CLIPModel

    with pytest.raises(Exception) as info:  # whatever transformers raises
        CLIPModel.from_pretrained(str(folder))
    return str(info.value).strip().splitlines()[0]


@pytest.mark.parametrize("kind", ["hpsv2.1", "empty"])
def test_clip_pointed_at_another_model_is_one_line(kind, tiny_dirs, tmp_path, capsys):
    folder = tiny_dirs[kind] if kind != "empty" else tmp_path / "empty"
    folder.mkdir(exist_ok=True)
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(images / "a.png")
    (tmp_path / "p.txt").write_text("a red square\n")
    rc = eval_main(
        ["--images", str(images), "--prompts", str(tmp_path / "p.txt"), "--metric", f"clip={folder}"]
        + ["--device", "cpu", "--out", str(tmp_path / "out")]
    )
    line = _one_error_line(capsys)
    assert rc == 2
    assert line.startswith(
        f"diffalign eval: error: --metric clip={folder}: cannot load the clip scorer from {folder}: "
    )
    assert _clip_load_error(folder)[:200] in line


def test_toy_with_weights_is_one_line(tmp_path, capsys):
    path, _, _ = _toy_folder(
        tmp_path / "imgs", {"a.png": ShapeSpec("red", "circle", "blue", 9.0, 16.0, 16.0)}
    )
    rc = eval_main(
        ["--images", str(tmp_path / "imgs"), "--prompts", str(path), "--metric", f"toy={tmp_path}"]
        + ["--out", str(tmp_path / "out")]
    )
    assert rc == 2
    line = _one_error_line(capsys)
    assert f"--metric toy={tmp_path}" in line and "takes no weights" in line
    with pytest.raises(ValueError, match="takes no weights"):
        ev.load("toy", weights=str(tmp_path))


def test_toy_on_non_toy_prompts_is_one_line(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    (tmp_path / "p.txt").write_text("a cat sitting on a chair\n")
    rc = eval_main(
        ["--images", str(folder), "--prompts", str(tmp_path / "p.txt"), "--metric", "toy"]
        + ["--out", str(tmp_path / "out")]
    )
    assert rc == 2
    line = _one_error_line(capsys)
    assert "--metric toy: prompt 0: not a toy caption: 'a cat sitting on a chair'" in line


# --------------------------------------------------------------------------------------------------- toy as metric
TOY_SPECS = {
    "a_big.png": ShapeSpec("red", "circle", "blue", 11.5, 16.0, 16.0),
    "b_small.png": ShapeSpec("red", "circle", "blue", 6.0, 12.0, 14.0),
    "c_square.png": ShapeSpec("yellow", "square", "purple", 8.0, 15.0, 17.0),
    "d_triangle.png": ShapeSpec("green", "triangle", "white", 10.0, 16.0, 15.0),
}


def test_toy_is_registered_and_listed():
    assert "toy" in ev.available() and "toy" in ev.DEFAULT_WEIGHTS
    assert "toy" in build_parser().format_help()
    scorer = ev.load("toy")
    images = [render(s) for s in TOY_SPECS.values()]
    captions = [s.caption for s in TOY_SPECS.values()]
    got = scorer.score(images, captions)
    np.testing.assert_allclose(got.numpy(), oracle_reward(images, captions), rtol=0, atol=1e-6)
    assert ev.load("toy", taste_weight=0.0).score(images, captions).max() <= 1.0 + 1e-6


def test_eval_metric_toy_scores_like_the_oracle(tmp_path, capsys):
    prompts, images, captions = _toy_folder(tmp_path / "imgs", TOY_SPECS)
    out = tmp_path / "out"
    rc = eval_main(
        ["--images", str(tmp_path / "imgs"), "--prompts", str(prompts), "--metric", "toy"]
        + ["--n-boot", "50", "--out", str(out)]
    )
    assert rc == 0, capsys.readouterr().err
    rows = _scores(out)
    assert [r["key"] for r in rows] == ["a_big", "b_small", "c_square", "d_triangle"]
    assert [r["prompt"] for r in rows] == captions
    direct = oracle_reward(images, captions)  # the oracle called directly on the drawn images
    np.testing.assert_allclose([float(r["toy"]) for r in rows], direct, rtol=0, atol=1e-6)
    assert caption_match(images, captions).all()  # clean renderings show their captions
    by_key = {r["key"]: float(r["toy"]) for r in rows}
    assert by_key["a_big"] > by_key["b_small"] + 0.5  # the oracle's taste: bigger shapes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["toy"]["imgs"]["mean"] == pytest.approx(direct.mean(), abs=1e-6)
    assert summary["meta"]["metrics"] == {"toy": "official"}


def test_eval_metric_toy_prefers_the_oracles_choice_in_ab(tmp_path, capsys):
    """A: big shapes with the right colours; B: the same captions drawn small, or in the wrong colour."""
    a = {f"{i}.png": ShapeSpec("red", "circle", "blue", 11.0, 16.0, 16.0) for i in range(3)}
    b = {
        "0.png": ShapeSpec("red", "circle", "blue", 6.0, 16.0, 16.0),  # too small for the oracle's taste
        "1.png": ShapeSpec("green", "circle", "blue", 11.0, 16.0, 16.0),  # wrong shape colour
        "2.png": ShapeSpec("red", "square", "blue", 11.0, 16.0, 16.0),  # wrong shape class
    }
    prompts, _, _ = _toy_folder(tmp_path / "a", a)  # every file's prompt: "a red circle on a blue background"
    _toy_folder(tmp_path / "b", b)  # B is scored against A's prompts (paired by file name)
    out = tmp_path / "out"
    rc = eval_main(
        ["--images", str(tmp_path / "a"), "--images-b", str(tmp_path / "b"), "--prompts", str(prompts)]
        + ["--metric", "toy", "--n-boot", "50", "--out", str(out)]
    )
    assert rc == 0, capsys.readouterr().err
    rows = _scores(out)
    score = {(r["model"], r["key"]): float(r["toy"]) for r in rows}
    for k in ("0", "1", "2"):
        assert score[("A", k)] > score[("B", k)], k
    w = json.loads((out / "summary.json").read_text())["win_rates"]["toy"]
    assert (w["wins"], w["ties"], w["losses"], w["rate"]) == (3, 0, 0, 1.0)


# ------------------------------------------------------------------------------------------ self-contained report
class _Refs(HTMLParser):
    """Every URL-carrying attribute of the document (src, href, srcset, ...), and inline ``url(`` uses."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.css_urls = 0

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href", "srcset", "data", "poster", "background", "action") and v is not None:
                self.refs.append((tag, k, v))
            if k == "style" and v and "url(" in v:
                self.css_urls += 1

    def handle_data(self, data):
        self.css_urls += data.count("url(")


def _decode(uri: str) -> Image.Image:
    assert uri.startswith(PNG_URI), uri[:60]
    im = Image.open(io.BytesIO(base64.b64decode(uri[len(PNG_URI) :], validate=True)))
    im.load()
    return im


def test_report_is_self_contained_and_survives_a_move(tmp_path, capsys):
    specs = dict(TOY_SPECS)
    prompts, _, _ = _toy_folder(tmp_path / "imgs", specs)
    big = render(specs["a_big.png"]).resize((600, 300), Image.NEAREST)  # a large image: must be downscaled
    big.save(tmp_path / "imgs" / "e_large.png")
    with open(prompts, "a", newline="") as f:
        csv.writer(f).writerow(["e_large.png", specs["a_big.png"].caption])
    out = tmp_path / "out"
    rc = eval_main(
        ["--images", str(tmp_path / "imgs"), "--prompts", str(prompts), "--metric", "toy"]
        + ["--n-boot", "50", "--out", str(out)]
    )
    assert rc == 0, capsys.readouterr().err
    rows = _scores(out)

    # Move the report alone to another folder and delete everything it could have linked to.
    moved = tmp_path / "elsewhere" / "report.html"
    moved.parent.mkdir()
    shutil.move(str(out / "report.html"), moved)
    shutil.rmtree(out)
    shutil.rmtree(tmp_path / "imgs")
    text = moved.read_text(encoding="utf-8")
    assert "src='images/" not in text and "src='charts/" not in text and "../" not in text

    parser = _Refs()
    parser.feed(text)
    assert parser.css_urls == 0
    assert parser.refs, "no images in the report"
    assert all(v.startswith(PNG_URI) for _, _, v in parser.refs), [v[:40] for _, _, v in parser.refs]
    grid = [(_decode(v), v) for tag, _, v in parser.refs if tag == "img"]
    # one chart per: means + histogram of toy; then one image per record
    assert len(grid) == 2 + len(rows) == 2 + 5
    assert text.count(PNG_URI) == len(grid)
    thumbs = [im for im, _ in grid[2:]]
    for im in thumbs:
        assert max(im.size) <= 256
    sizes = sorted(im.size for im in thumbs)
    assert sizes == [(32, 32)] * 4 + [(256, 128)]  # 600x300 -> 256 on the long side, aspect kept
    # the small images are embedded pixel-exact
    first = next(im for im in thumbs if im.size == (32, 32))
    assert np.array_equal(np.asarray(first.convert("RGB")), np.asarray(render(specs["a_big.png"])))
    charts = [im for im, _ in grid[:2]]
    assert all(im.size[0] >= 300 for im in charts)
