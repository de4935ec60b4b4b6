"""PickScore against its official path, live: the README's "Inference with PickScore" code is plain transformers
(``CLIPProcessor`` + ``CLIPModel``), so it runs here as written (PIL processor backend, as in transformers 4.27.3,
and ``.pooler_output`` for transformers 5.x)."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.evaluators import load, preference_probability


def readme_pickscore(model, processor, images, prompt):
    """yuvalkirstain/PickScore README @f79607f, ``calc_probs`` body."""
    image_inputs = processor(images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
    text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(**image_inputs).pooler_output
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs).pooler_output
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        scores = model.logit_scale.exp() * (text_embs @ image_embs.T)[0]
        probs = torch.softmax(scores, dim=-1)
    return scores, probs


@pytest.fixture(scope="module")
def official(tiny_dirs):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_dirs["pickscore"], attn_implementation="eager").eval()
    return model, CLIPProcessor.from_pretrained(tiny_dirs["pickscore"], backend="pil")


@pytest.fixture(scope="module")
def scorer(tiny_dirs):
    return load("pickscore", weights=str(tiny_dirs["pickscore"]), attn_implementation="eager")


@pytest.mark.parametrize("prompt_idx", [0, 2, 3])  # short, >77 tokens (truncated, EOS kept), non-ASCII
def test_scores_and_probabilities_match_readme(official, scorer, cases, prompt_idx):
    images, prompts = cases
    prompt = prompts[prompt_idx]
    # transformers 4.27 (PickScore's pin) converted RGBA with a plain convert("RGB"), as diffalign does; 5.x
    # composites onto white instead, so hand the README path RGB images.
    scores, probs = readme_pickscore(*official, [im.convert("RGB") for im in images], prompt)
    torch.testing.assert_close(scorer.score(images, prompt, batch_size=4), scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(scorer.probabilities(images, prompt), probs, atol=1e-5, rtol=0)
    assert scores.std() > 0.1  # the tiny model does tell the images apart

    # Pairwise preference = README softmax over exactly two candidates.
    _, pair_probs = readme_pickscore(*official, [im.convert("RGB") for im in images[:2]], prompt)
    p = scorer.preference([images[0]], [images[1]], [prompt])
    assert float(p[0]) == pytest.approx(float(pair_probs[0]), abs=1e-5)


def test_logit_scale_is_read_from_checkpoint(official, scorer):
    model, _ = official
    assert scorer.logit_scale == pytest.approx(math.exp(float(model.logit_scale.detach())), rel=1e-6)
    assert scorer.logit_scale != pytest.approx(100.0)  # not hard-coded


def test_cosine_is_unscaled(scorer, cases):
    images, prompts = cases
    torch.testing.assert_close(
        scorer.cosine(images, prompts) * scorer.logit_scale, scorer.score(images, prompts), atol=1e-4, rtol=0
    )


def test_pixels_match_clip_image_processor_pil_backend(tiny_dirs, scorer, case_images):
    """diffalign's own pixel pipeline == transformers' CLIPImageProcessor with the PIL backend (atol 1e-6)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(tiny_dirs["pickscore"], backend="pil")
    for name, image in case_images.items():
        expected = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(scorer.image_config(image), expected, atol=1e-6, rtol=0, msg=name)


def test_preference_probability_hand_worked():
    """P(a > b) = e^{s_a} / (e^{s_a} + e^{s_b}) = sigmoid(s_a - s_b): s = (2, 0) -> 0.8808; equal -> 0.5."""
    a, b = torch.tensor([2.0, 21.5, -1.0]), torch.tensor([0.0, 21.5, 1.0])
    p = preference_probability(a, b)
    torch.testing.assert_close(p, torch.tensor([1 / (1 + math.exp(-2)), 0.5, 1 / (1 + math.exp(2))]))
    torch.testing.assert_close(p + preference_probability(b, a), torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        preference_probability(a, b[:2])
