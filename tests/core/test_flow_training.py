"""``diffalign train`` on tiny SD3 and FLUX pipelines (random weights, built in code): every supported objective trains
from ln 2 on velocity errors, the exported LoRA loads into the diffusers pipeline and changes its transformer, and
what a flow model does not run stops with one line before anything trains."""

import math

import numpy as np
import pytest
import torch
from fixtures.data import base_config
from fixtures.tiny_flow import save_tiny_flow_pipeline

from diffalign.data import collate_pairs
from diffalign.models import FlowCondition, load_lora_into_pipeline, make_denoiser
from diffalign.models.text import build_condition
from diffalign.training.config import ConfigError, parse_config
from diffalign.training.trainer import trainer_class

OBJECTIVES = {"dpo": "dpo", "mapo": "mapo", "dcpo": {"name": "dcpo", "loser_caption": "word_swap"},
              "seppo": {"name": "seppo", "snapshot_every": 1, "max_snapshots": 2, "sampling_steps": 2,
                        "guidance_scale": 2.0}}


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {family: save_tiny_flow_pipeline(root / family, family) for family in ("sd3", "flux")}


def _trainer(model_dir, data_dir, out, **kw):
    cfg = parse_config(base_config(model_dir, data_dir, out, **{"dataset.resolution": 32, **kw}))
    return trainer_class(cfg)(cfg).setup()


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_objective_trains_on_velocity_errors(family, objective, flow_dirs, pickapic_dir, tmp_path):
    tr = _trainer(flow_dirs[family], pickapic_dir, tmp_path / "run", objective=OBJECTIVES[objective],
                  max_steps=3, checkpoint_every=None, **{"optimizer.learning_rate": 1e-2})
    assert tr.components.family == family and isinstance(tr.policy, type(make_denoiser(family, tr.unet)))
    summary = tr.train()
    tr.cleanup()
    losses = [r["loss"] for r in tr.history]
    assert all(math.isfinite(v) for v in losses) and summary["steps"] == 3
    if objective != "mapo":  # DPO-type losses start at ln 2: the LoRA's B = 0, so policy == reference
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_timesteps_are_float_grid_values_shared_by_the_pair(family, flow_dirs, pickapic_dir, tmp_path):
    tr = _trainer(flow_dirs[family], pickapic_dir, tmp_path / "run", max_steps=1)
    batch = collate_pairs([tr.dataset[0], tr.dataset[1]])
    x0, cond = tr.inputs(batch)
    t, noise = tr.noise(x0, cond)
    tr.cleanup()
    assert isinstance(cond, FlowCondition) and t.is_floating_point()
    assert torch.equal(t[:2], t[2:]) and torch.equal(noise[:2], noise[2:])
    grid = torch.as_tensor(type(tr.components.noise_scheduler).from_config(
        tr.components.noise_scheduler.config).timesteps, dtype=torch.float32)
    assert all(bool((grid == v).any()) for v in t)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_exported_lora_loads_into_the_pipeline_and_changes_the_transformer(family, flow_dirs, pickapic_dir,
                                                                           tmp_path):
    from diffusers import DiffusionPipeline

    tr = _trainer(flow_dirs[family], pickapic_dir, tmp_path / "run", max_steps=3, checkpoint_every=None,
                  **{"optimizer.learning_rate": 1e-2})
    tr.train()
    trained = tr.accelerator.unwrap_model(tr.unet).eval()
    pipe = DiffusionPipeline.from_pretrained(flow_dirs[family])
    load_lora_into_pipeline(pipe, str(tmp_path / "run"))
    vae = tr.components.vae.config
    side = 32 // 2 ** (len(vae.block_out_channels) - 1)
    x0 = torch.randn(2, vae.latent_channels, side, side, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([250.0, 750.0])
    cond = build_condition(tr.encode_text(["a red circle", "a blue square"]))
    ours, theirs = make_denoiser(family, trained, 3.5), make_denoiser(family, pipe.transformer, 3.5)
    with torch.no_grad():
        a, b = ours(x0, t, cond), theirs(x0, t, cond)
        pipe.transformer.disable_lora()
        base = theirs(x0, t, cond)
    tr.cleanup()
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert (base - a).abs().max() > 1e-4


@pytest.mark.parametrize("objective", ["inpo", "ppd"])
def test_unsupported_objective_is_one_line(objective, flow_dirs, pickapic_dir, tmp_path):
    with pytest.raises(ConfigError, match=f"objective: {objective} does not run on sd3") as err:
        _trainer(flow_dirs["sd3"], pickapic_dir, tmp_path / "run", objective=objective)
    assert "\n" not in str(err.value)


def test_weighting_of_the_other_family_is_one_line(flow_dirs, tiny_sd15_dir, pickapic_dir, tmp_path):
    with pytest.raises(ConfigError, match="'snr' is for DDPM U-Nets; flux takes none, sigma_sqrt, cosmap"):
        _trainer(flow_dirs["flux"], pickapic_dir, tmp_path / "a", weighting="snr")
    with pytest.raises(ConfigError, match="'cosmap' is for flow models"):
        _trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "b", weighting="cosmap")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_generate_and_eval_take_the_trained_flow_model(family, flow_dirs, pickapic_dir, tmp_path):
    """`diffalign generate` and `diffalign eval --model` load the base pipeline with the exported LoRA; the LoRA
    changes the image of the same (prompt, seed)."""
    from PIL import Image

    from diffalign.cli import main

    run = tmp_path / "run"
    _trainer(flow_dirs[family], pickapic_dir, run, max_steps=3, checkpoint_every=None,
             **{"optimizer.learning_rate": 5e-2}).train()
    common = ["--model", flow_dirs[family], "--prompt", "a red circle", "--steps", "2", "--height", "32",
              "--width", "32", "--guidance", "2.0"]
    assert main(["generate", *common, "--out", str(tmp_path / "base")]) == 0
    assert main(["generate", *common, "--lora", str(run), "--out", str(tmp_path / "tuned")]) == 0
    base, tuned = (np.asarray(Image.open(tmp_path / d / "0000_00.png"), dtype=float) for d in ("base", "tuned"))
    assert base.shape == tuned.shape == (32, 32, 3) and np.abs(base - tuned).max() > 0
    assert main(["eval", "--model", flow_dirs[family], "--lora", str(run), "--prompts", str(_prompts(tmp_path)),
                 "--metric", "toy", "--out", str(tmp_path / "eval"), "--steps", "2", "--height", "32", "--width", "32"]) == 0


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle on a blue background\n")
    return path


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_sampler_equals_the_diffusers_pipeline(family, flow_dirs):
    """SePPO's on-policy sampler on a flow model: the same latents as StableDiffusion3Pipeline (CFG 2.0) / FluxPipeline
    (guidance input 3.5, no CFG) from the same initial noise, prompt and steps."""
    from diffusers import DiffusionPipeline

    from diffalign.models import load_components
    from diffalign.models.text import encode_prompts
    from diffalign.sampling import sample_latents

    c = load_components(flow_dirs[family])
    pipe = DiffusionPipeline.from_pretrained(flow_dirs[family])
    pipe.set_progress_bar_config(disable=True)
    prompts, steps = ["a red circle", "a blue square"], 3
    cond, uncond = build_condition(encode_prompts(c, prompts)), build_condition(encode_prompts(c, ["", ""]))
    side = 32 // 2 ** (len(c.vae.config.block_out_channels) - 1)
    shape = (2, c.vae.config.latent_channels, side, side)
    ours = sample_latents(make_denoiser(family, c.transformer, 3.5), c.noise_scheduler,
                          cond, uncond if family == "sd3" else None, shape, num_inference_steps=steps,
                          guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    kw = {"guidance_scale": 2.0 if family == "sd3" else 3.5, "max_sequence_length": c.t5_max_length}
    with torch.no_grad():
        theirs = pipe(prompts, num_inference_steps=steps, height=32, width=32, output_type="latent",
                      generator=torch.Generator().manual_seed(0), **kw).images
    if family == "flux":  # FluxPipeline returns packed latents
        from diffalign.models import unpack_latents

        theirs = unpack_latents(theirs, side, side)
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=1e-4)


def test_precomputed_text_embeddings_keep_the_encoders_out_of_the_steps(flow_dirs, pickapic_dir, tmp_path):
    """`dataset.precompute_text`: every caption is encoded into the cache before step 1 and the text encoders (SD3's
    CLIP-L, CLIP-G, T5) are moved to the CPU and never run during training; the run is the same run up to the
    rounding of encoding captions in other batches (the losses agreed to 2e-4 relative when this was written)."""
    runs = {}
    for precompute in (False, True):
        tr = _trainer(flow_dirs["sd3"], pickapic_dir, tmp_path / f"run{precompute}", max_steps=3,
                      checkpoint_every=None, **{"dataset.cache_dir": str(tmp_path / f"cache{precompute}"),
                                                "dataset.precompute_text": precompute,
                                                "dataset.proportion_empty_prompts": 0.5})
        calls = []
        for encoder in tr.components.text_encoders():
            encoder.register_forward_hook(lambda *a: calls.append(1))
        tr.train()
        tr.cleanup()
        devices = {p.device.type for e in tr.components.text_encoders() for p in e.parameters()}
        runs[precompute] = ([r["loss"] for r in tr.history], len(calls), devices)
    assert runs[False][1] > 0 and runs[True][1] == 0 and runs[True][2] == {"cpu"}
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-3)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_full_finetuning_keeps_a_frozen_reference_and_exports_the_transformer(family, flow_dirs, pickapic_dir,
                                                                             tmp_path):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    tr = _trainer(flow_dirs[family], pickapic_dir, tmp_path / "run", max_steps=2, checkpoint_every=None,
                  **{"model.lora": None, "optimizer.learning_rate": 1e-3})
    tr.train()
    tr.cleanup()
    assert tr.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the copy equals the policy at step 1
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    saved = cls.from_pretrained(str(tmp_path / "run" / "transformer"))
    base = cls.from_pretrained(flow_dirs[family], subfolder="transformer")
    trained = tr.accelerator.unwrap_model(tr.unet)
    changed = [n for n, p in saved.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed and all(torch.equal(p, dict(trained.named_parameters())[n]) for n, p in saved.named_parameters())


def test_gradient_checkpointing_gives_the_same_run(flow_dirs, pickapic_dir, tmp_path):
    losses = []
    for on in (False, True):
        tr = _trainer(flow_dirs["sd3"], pickapic_dir, tmp_path / f"run{on}", max_steps=3, checkpoint_every=None,
                      **{"model.gradient_checkpointing": on, "optimizer.learning_rate": 1e-2})
        assert tr.accelerator.unwrap_model(tr.unet).is_gradient_checkpointing == on
        tr.train()
        tr.cleanup()
        losses.append([r["loss"] for r in tr.history])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_validation_images_come_from_the_flow_pipeline(family, flow_dirs, pickapic_dir, tmp_path):
    from PIL import Image

    tr = _trainer(flow_dirs[family], pickapic_dir, tmp_path / "run", max_steps=2, checkpoint_every=None,
                  **{"validation.every": 2, "validation.prompts": ["a red circle", "a blue square"],
                     "validation.num_inference_steps": 2, "validation.guidance_scale": 2.0})
    tr.train()
    tr.cleanup()
    grid = Image.open(tmp_path / "run" / "validation" / "step-000002.png")
    assert grid.size == (2 * (32 + 2) + 2, 32 + 2 + 2)  # two 32 px images side by side, 2 px padding


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_bf16_trains_from_ln2(family, flow_dirs, pickapic_dir, tmp_path):
    """mixed_precision bf16: the frozen transformer and text encoders in bf16, LoRA weights in fp32, errors in fp32."""
    tr = _trainer(flow_dirs[family], pickapic_dir, tmp_path / "run", max_steps=2, checkpoint_every=None,
                  mixed_precision="bf16", **{"optimizer.learning_rate": 1e-2})
    frozen = {p.dtype for p in tr.accelerator.unwrap_model(tr.unet).parameters() if not p.requires_grad}
    trained = {p.dtype for p in tr.trainable_parameters()}
    tr.train()
    tr.cleanup()
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert tr.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(r["loss"]) for r in tr.history)


def test_generate_uses_the_trainers_t5_length_on_a_model_without_t5(tmp_path):
    """An SD3 folder saved without T5 (text_encoder_3: [null, null]) loads through diffalign.inference, and images are
    conditioned on the trainer's 77 T5 tokens (zeros), not the pipeline's default 256."""
    from diffalign.inference import generate, load_pipeline

    folder = save_tiny_flow_pipeline(tmp_path / "no-t5", "sd3", t5=False)
    pipe = load_pipeline(folder, device="cpu")
    assert pipe.text_encoder_3 is None
    seen = []
    original = pipe.encode_prompt
    pipe.encode_prompt = lambda *a, **k: (seen.append(k.get("max_sequence_length")), original(*a, **k))[1]
    generate(pipe, ["a red circle"], [0], num_inference_steps=1, height=32, width=32, output_type="latent")
    generate(pipe, ["a red circle"], [0], num_inference_steps=1, height=32, width=32, output_type="latent",
             max_sequence_length=256)
    assert seen == [77, 256]
