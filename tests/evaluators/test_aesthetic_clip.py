"""Aesthetic predictor and CLIP score against re-derivations of their official code.

* Aesthetic: improved-aesthetic-predictor ``simple_inference.py`` @6934dd8 -- openai-clip's ``_transform(224)``
  (torchvision ``Resize``/``CenterCrop`` on PIL), the 768-d projected CLIP image embedding, numpy ``normalized()``
  (zero norms -> 1), the repo's ``MLP`` class; here with the tower as transformers ``CLIPModel`` (tiny).
* CLIP score: torchmetrics 1.9.0 ``_get_features`` / ``_clip_score_update`` re-typed (the recorded output of the
  real package is checked in ``test_official_scorer_fixtures.py``; if torchmetrics is installed it is also run live).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from diffalign.evaluators import load

openai_clip_transform = Compose(  # clip/clip.py _transform(n_px=224)
    [
        Resize(224, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(224),
        lambda im: im.convert("RGB"),
        ToTensor(),
        Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ]
)


class ReferenceMLP(nn.Module):
    """simple_inference.py ``MLP(input_size)`` (the ``pl.LightningModule`` base swapped for nn.Module)."""

    def __init__(self, input_size):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(self.input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


def normalized(a, axis=-1, order=2):
    l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, axis)


def test_aesthetic_matches_reference(tiny_dirs, cases):
    from transformers import CLIPModel

    from diffalign.evaluators.aesthetic import HEAD_FILENAME

    images, _ = cases
    model = CLIPModel.from_pretrained(tiny_dirs["aesthetic"], attn_implementation="eager").eval()
    head = ReferenceMLP(16)
    head.load_state_dict(
        torch.load(tiny_dirs["aesthetic"] / HEAD_FILENAME, map_location="cpu", weights_only=True)
    )
    head.eval()
    expected = []
    with torch.no_grad():
        for pil_image in images:
            # RGB first: the official order (resize, then convert) resizes RGBA with premultiplied alpha; diffalign
            # converts first on purpose (documented deviation), so the reference gets the RGB image.
            image = openai_clip_transform(pil_image.convert("RGB")).unsqueeze(0)
            image_features = model.get_image_features(pixel_values=image).pooler_output
            im_emb_arr = normalized(image_features.cpu().detach().numpy())
            prediction = head(torch.from_numpy(im_emb_arr).float())
            expected.append(prediction[0, 0])
    expected = torch.stack(expected)
    scorer = load("aesthetic", weights=str(tiny_dirs["aesthetic"]), attn_implementation="eager")
    got = scorer.score(images, [""] * len(images), batch_size=4)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert expected.std() > 1e-3
    # The prompt is ignored.
    torch.testing.assert_close(scorer.score(images, "anything at all"), got, atol=1e-6, rtol=0)


def test_aesthetic_uses_torchvision_center_crop(tiny_dirs, case_images):
    """(299 - 224) is odd: torchvision rounds the crop offset (38), transformers floors it (37)."""
    scorer = load("aesthetic", weights=str(tiny_dirs["aesthetic"]))
    image = case_images["oddcrop"]
    torch.testing.assert_close(scorer.image_config(image), openai_clip_transform(image), atol=1e-6, rtol=0)
    pick = load("pickscore", weights=str(tiny_dirs["pickscore"]))
    assert (pick.image_config(image) - openai_clip_transform(image)).abs().max() > 1e-2


def torchmetrics_raw(model, processor, images, prompts):
    """``_clip_score_update`` re-typed: 100 * <norm(img), norm(txt)>, text padded, no truncation, sliced to 77."""
    processed = processor(images=[im.convert("RGB") for im in images], return_tensors="pt", padding=True)
    img = model.get_image_features(processed["pixel_values"]).pooler_output
    text = processor(text=prompts, return_tensors="pt", padding=True)
    max_pos = model.config.text_config.max_position_embeddings
    if text["attention_mask"].shape[-1] > max_pos:
        text["attention_mask"] = text["attention_mask"][..., :max_pos]
        text["input_ids"] = text["input_ids"][..., :max_pos]
    txt = model.get_text_features(text["input_ids"], text["attention_mask"]).pooler_output
    img = img / img.norm(p=2, dim=-1, keepdim=True)
    txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
    return 100 * (img * txt).sum(axis=-1)


def test_clip_score_matches_torchmetrics_rederivation(tiny_dirs, cases):
    from transformers import CLIPModel, CLIPProcessor

    images, prompts = cases
    model = CLIPModel.from_pretrained(tiny_dirs["clip"], attn_implementation="eager").eval()
    processor = CLIPProcessor.from_pretrained(tiny_dirs["clip"], backend="pil")
    with torch.no_grad():
        expected = torchmetrics_raw(model, processor, images, prompts)
    scorer = load("clip", weights=str(tiny_dirs["clip"]), attn_implementation="eager")
    torch.testing.assert_close(scorer.raw(images, prompts, batch_size=2), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(scorer.score(images, prompts), expected.clamp(min=0), atol=1e-4, rtol=0)
    assert (expected < 0).any() and (expected > 0).any()  # both sides of the clamp are exercised


def test_clip_score_live_torchmetrics(tiny_dirs, cases):
    tm = pytest.importorskip(
        "torchmetrics.functional.multimodal.clip_score",
        reason="torchmetrics not installed (recorded fixture covers it)",
    )
    from transformers import CLIPModel, CLIPProcessor

    class Tensors(nn.Module):  # torchmetrics 1.9.0 expects tensors from get_*_features (transformers 4.x)
        def __init__(self, clip):
            super().__init__()
            self.clip, self.config = clip, clip.config

        def get_image_features(self, *a, **k):
            return self.clip.get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return self.clip.get_text_features(*a, **k).pooler_output

    images, prompts = cases
    model = Tensors(CLIPModel.from_pretrained(tiny_dirs["clip"], attn_implementation="eager").eval())
    processor = CLIPProcessor.from_pretrained(tiny_dirs["clip"], backend="pil")
    pixels = [torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1) for im in images]
    with torch.no_grad():
        expected, _ = tm._clip_score_update(pixels, prompts, model, processor)
    scorer = load("clip", weights=str(tiny_dirs["clip"]), attn_implementation="eager")
    torch.testing.assert_close(scorer.raw(images, prompts), expected, atol=1e-4, rtol=0)
