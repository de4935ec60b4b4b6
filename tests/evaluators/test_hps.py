"""HPSv2 against an independent re-derivation of ``hpsv2/img_score.py`` + ``hpsv2/src/open_clip/transform.py``
(@866735e), written here from the official code: the eval transform is rebuilt from torchvision pieces exactly as
``image_transform(224, is_train=False, resize_longest_max=True)`` composes them, and the score is the diagonal of
``image_features @ text_features.T`` of open_clip's ``output_dict`` forward. (The recorded scores of the real
package are checked in ``test_official_scorer_fixtures.py``.)"""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import Compose, InterpolationMode, Normalize, ToTensor

from diffalign.evaluators import load
from diffalign.evaluators._transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, letterbox


class ResizeMaxSize(torch.nn.Module):
    """transform.py ``ResizeMaxSize(max_size, interpolation=BICUBIC, fn='max', fill=0)``, re-typed."""

    def __init__(self, max_size, fill=0):
        super().__init__()
        self.max_size, self.fill = max_size, fill

    def forward(self, img):
        height, width = img.shape[1:]
        scale = self.max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = TF.resize(img, new_size, InterpolationMode.BICUBIC)
            pad_h = self.max_size - new_size[0]
            pad_w = self.max_size - new_size[1]
            img = TF.pad(
                img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=self.fill
            )
        return img


official_preprocess_val = Compose(
    [
        lambda im: im.convert("RGB"),
        ToTensor(),
        ResizeMaxSize(224, fill=0),
        Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ]
)


def test_letterbox_matches_official_transform(case_images):
    for name, image in case_images.items():
        expected = official_preprocess_val(image)
        torch.testing.assert_close(letterbox(image), expected, atol=1e-6, rtol=0, msg=name)
    # antialias=False (torchvision <= 0.16 behaviour) is a different resize, selectable on purpose.
    delta = (
        (
            letterbox(case_images["square512"], antialias=False)
            - official_preprocess_val(case_images["square512"])
        )
        .abs()
        .max()
    )
    assert delta > 1e-2


def test_letterbox_padding_split():
    """900x300 (h x w): scale 224/900 -> (224, round(74.67)=75); pad_w = 149 -> 74 left, 75 right, of black (0
    before normalisation)."""
    from PIL import Image

    x = letterbox(Image.new("RGB", (300, 900), (255, 255, 255)))
    black = (torch.zeros(3) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    white = (torch.ones(3) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(x[:, :, :74], black.view(3, 1, 1).expand(3, 224, 74))
    torch.testing.assert_close(x[:, :, 224 - 75 :], black.view(3, 1, 1).expand(3, 224, 75))
    torch.testing.assert_close(
        x[:, 10:-10, 80:140], white.view(3, 1, 1).expand(3, 204, 60), atol=1e-5, rtol=0
    )


def test_scores_match_official_forward(tiny_dirs, cases):
    """img_score.score loop: per image, ``model(image, text)`` -> diag(image_features @ text_features.T)."""
    from open_clip import get_tokenizer

    from diffalign.evaluators.hps import build_open_clip

    images, prompts = cases
    scorer = load("hpsv2", weights=str(tiny_dirs["hpsv2"]))
    import json

    cfg = json.loads((tiny_dirs["hpsv2"] / "open_clip_config.json").read_text())
    model = build_open_clip(cfg)
    checkpoint = torch.load(
        tiny_dirs["hpsv2"] / "HPS_v2_compressed.pt", map_location="cpu", weights_only=True
    )
    model.load_state_dict(checkpoint["state_dict"])  # strict, fp16 values up-cast into fp32 parameters
    model.eval()
    tokenizer = get_tokenizer("ViT-H-14")
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            outputs = model(official_preprocess_val(image).unsqueeze(0), tokenizer([prompt]))
            logits_per_image = outputs["image_features"] @ outputs["text_features"].T
            expected.append(torch.diagonal(logits_per_image)[0])
    expected = torch.stack(expected)
    got = scorer.score(images, prompts, batch_size=4)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert expected.std() > 1e-2


def test_checkpoint_is_fp16_and_keys_are_strict(tiny_dirs, tmp_path):
    state = torch.load(tiny_dirs["hpsv2"] / "HPS_v2_compressed.pt", weights_only=True)["state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    state["visual.extra.weight"] = torch.zeros(1)
    (tmp_path / "bad").mkdir()
    torch.save({"state_dict": state}, tmp_path / "bad" / "HPS_v2_compressed.pt")
    (tmp_path / "bad" / "open_clip_config.json").write_text(
        (tiny_dirs["hpsv2"] / "open_clip_config.json").read_text()
    )
    with pytest.raises(RuntimeError, match="visual.extra.weight"):
        load("hpsv2", weights=str(tmp_path / "bad"))


def test_v21_reads_its_own_file(tiny_dirs, cases):
    """hpsv2.1 picks HPS_v2.1_compressed.pt (different tiny weights here), so its scores differ from v2.0's."""
    images, prompts = cases
    v20 = load("hpsv2", weights=str(tiny_dirs["hpsv2"]))
    v21 = load("hpsv2.1", weights=str(tiny_dirs["hpsv2.1"]))
    assert v21.weights.endswith("HPS_v2.1_compressed.pt") and v21.name == "hpsv2.1"
    assert (v20.score(images, prompts) - v21.score(images, prompts)).abs().max() > 1e-3
