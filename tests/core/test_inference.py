"""diffalign.inference: one seed rule (image i from its own ``torch.Generator("cpu").manual_seed(seeds[i])``) and one
pipeline loader, shared by ``generate``, ``eval``, ``personalize`` and the toy worlds."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.inference import generate, load_pipeline

PROMPT = "a red circle on a blue background"
PROMPTS = [PROMPT, "a blue square on a yellow background", "a green triangle on a white background"]
SAMPLING = {"num_inference_steps": 2, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir):
    return load_pipeline(tiny_sd15_dir, device="cpu")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


class RecordingPipe:
    """Stands in for a pipeline: records each call's prompts, generator seeds and extra keyword arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, generator, **kwargs):
        self.calls.append((prompt, [g.initial_seed() for g in generator], kwargs))
        return SimpleNamespace(images=[f"{p}@{g.initial_seed()}" for p, g in zip(prompt, generator)])


def test_one_generator_per_image_in_batches_and_a_hook_around_each_call():
    fake, entered = RecordingPipe(), []

    class Hook:
        def __init__(self, call):
            self.n = len(call["prompt"])

        def __enter__(self):
            entered.append(self.n)
            return {"cross_attention_kwargs": {"n": self.n}}

        def __exit__(self, *exc):
            return False

    images = generate(fake, ["a", "b", "c"], [5, np.int64(6), 7], batch_size=2, hook=Hook, guidance_scale=2.0)
    assert images == ["a@5", "b@6", "c@7"]
    assert [(p, s) for p, s, _ in fake.calls] == [(["a", "b"], [5, 6]), (["c"], [7])]
    assert [kw for *_, kw in fake.calls] == [{"guidance_scale": 2.0, "cross_attention_kwargs": {"n": 2}},
                                             {"guidance_scale": 2.0, "cross_attention_kwargs": {"n": 1}}]
    assert entered == [2, 1]
    with pytest.raises(ValueError, match="got 3 prompts for 2 seeds"):
        generate(fake, ["a", "b", "c"], [1, 2])


def test_the_seed_rule_is_a_cpu_generator_per_image(pipe):
    ours = generate(pipe, [PROMPT], [11], **SAMPLING)[0]
    direct = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(11), **SAMPLING).images[0]
    assert np.array_equal(pixels(ours), pixels(direct))
    other = generate(pipe, [PROMPT], [12], **SAMPLING)[0]
    assert np.abs(pixels(ours) - pixels(other)).max() > 10


def test_an_image_does_not_depend_on_its_batch(pipe):
    alone = [generate(pipe, [p], [s], output_type="np", **SAMPLING)[0] for p, s in zip(PROMPTS, [3, 4, 5])]
    batched = generate(pipe, PROMPTS, [3, 4, 5], batch_size=3, output_type="np", **SAMPLING)
    shifted = generate(pipe, PROMPTS[1:] + PROMPTS[:1], [4, 5, 3], batch_size=2, output_type="np", **SAMPLING)
    for a, b, c in zip(alone, batched, shifted[2:] + shifted[:2]):
        np.testing.assert_allclose(a, b, atol=1e-4)  # batched kernels round differently, nothing more
        np.testing.assert_allclose(a, c, atol=1e-4)
    assert np.abs(alone[0] - alone[1]).max() > 0.05


def test_generate_eval_and_the_toy_path_make_the_same_image(tiny_sd15_dir, pipe, tmp_path):
    from diffalign import toy
    from diffalign.cli import main

    sampling = ["--steps", "2", "--guidance", "3", "--device", "cpu"]
    assert main(["generate", "--model", tiny_sd15_dir, "--prompt", PROMPT, "--seed", "0", *sampling,
                 "--out", str(tmp_path / "gen")]) == 0
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    assert main(["eval", "--model", tiny_sd15_dir, "--prompts", str(tmp_path / "p.txt"), "--seeds", "0",
                 "--metric", "toy", *sampling, "--out", str(tmp_path / "eval")]) == 0
    made = pixels(Image.open(tmp_path / "gen" / "0000_00.png"))
    assert np.array_equal(made, pixels(Image.open(tmp_path / "eval" / "images" / "A" / "00000_s0.png")))
    assert np.array_equal(made, pixels(toy.generate(pipe, [PROMPT], [0], **SAMPLING)[0]))
    assert np.array_equal(made, pixels(generate(pipe, [PROMPT], [0], **SAMPLING)[0]))


def test_a_lora_or_another_unet_changes_the_image(tiny_sd15_dir, pipe, tmp_path):
    from diffalign.models import add_lora, load_components, save_lora

    c = load_components(tiny_sd15_dir)
    add_lora(c.unet, rank=4, alpha=8, init=False)  # random A and B: a visible change
    with torch.no_grad():
        for n, p in c.unet.named_parameters():
            if "lora_B" in n:
                p.mul_(50)
    save_lora(c.unet, tmp_path / "lora")
    other = load_components(tiny_sd15_dir).unet
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    other.save_pretrained(tmp_path / "other" / "unet")

    base = pixels(generate(pipe, [PROMPT], [0], **SAMPLING)[0])
    same_unet = load_pipeline(tiny_sd15_dir, device="cpu", unet=tiny_sd15_dir)
    assert np.array_equal(base, pixels(generate(same_unet, [PROMPT], [0], **SAMPLING)[0]))
    for kw in ({"lora": str(tmp_path / "lora")}, {"unet": str(tmp_path / "other")}):
        changed = pixels(generate(load_pipeline(tiny_sd15_dir, device="cpu", **kw), [PROMPT], [0], **SAMPLING)[0])
        assert np.abs(base - changed).max() > 0, kw


def test_a_missing_model_is_one_line(tmp_path, tiny_sd15_dir):
    from diffalign.models import ModelNotFoundError

    for kw in ({"model": str(tmp_path / "nothing")}, {"model": tiny_sd15_dir, "unet": str(tmp_path / "nothing")}):
        with pytest.raises(ModelNotFoundError, match="could not load pipeline") as err:
            load_pipeline(device="cpu", **kw)
        assert "\n" not in str(err.value)
