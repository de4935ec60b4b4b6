"""End-to-end trainer behaviour on tiny SD1.x / SDXL models built in code (CPU, seconds each)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from fixtures.data import base_config
from diffalign.training import checkpoint as ckpt
from diffalign.training.config import parse_config
from diffalign.training.trainer import PreferenceTrainer, RunExistsError


def make_trainer(model_dir, data_dir, out_dir, **kw):
    return PreferenceTrainer(parse_config(base_config(model_dir, data_dir, out_dir, **kw))).setup()


def test_step0_is_ln2_and_fixed_batch_loss_decreases(tiny_sd15_dir, pickapic_dir, tmp_path):
    tr = make_trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "run", **{"dataset.random_flip": False})
    batch = next(iter(torch.utils.data.DataLoader(tr.dataset, batch_size=4, collate_fn=__import__(
        "diffalign.data", fromlist=["collate_pairs"]).collate_pairs)))

    def loss_on_fixed_draw():
        tr.generator.manual_seed(123)  # same VAE sample, t and noise every time
        return tr.compute_loss(batch)

    with torch.no_grad():
        first = loss_on_fixed_draw()
    assert first.loss.item() == pytest.approx(math.log(2), abs=1e-6)  # zero-init LoRA B: policy == reference
    assert first.metrics["errors/policy_w"] == pytest.approx(first.metrics["errors/ref_w"], abs=1e-7)
    for _ in range(5):
        out = loss_on_fixed_draw()
        tr.optimizer.zero_grad()
        out.loss.backward()
        tr.optimizer.step()
    with torch.no_grad():
        after = loss_on_fixed_draw().loss.item()
    assert after < first.loss.item() - 0.01
    tr.cleanup()


def test_one_grad_call_and_one_reference_call_per_step(tiny_sd15_dir, pickapic_dir, tmp_path):
    tr = make_trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "run", max_steps=3, checkpoint_every=None)
    calls = []
    unet = tr.accelerator.unwrap_model(tr.unet)
    unet.register_forward_pre_hook(lambda mod, args: calls.append((torch.is_grad_enabled(), args[0].shape[0])))
    tr.train()
    # per step: policy on [winners; losers] (2B = 4) with grad, then the reference (adapters off) without
    assert calls == [(True, 4), (False, 4)] * 3
    tr.cleanup()


def test_full_finetune_keeps_frozen_reference(tiny_sd15_dir, pickapic_dir, tmp_path):
    tr = make_trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "run", **{"model.lora": None, "max_steps": 2})
    ref_before = {k: v.clone() for k, v in tr.reference.unet.state_dict().items()}
    tr.train()
    assert all(torch.equal(v, tr.reference.unet.state_dict()[k]) for k, v in ref_before.items())
    policy = tr.accelerator.unwrap_model(tr.unet).state_dict()
    assert any(not torch.equal(policy[k], v) for k, v in ref_before.items())
    assert (tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    tr.cleanup()


class Crash(RuntimeError):
    pass


def test_resume_after_interrupt_matches_uninterrupted_run(tiny_sd15_dir, pickapic_dir, tmp_path):
    kw = {"max_steps": 6, "checkpoint_every": 2, "optimizer.lr_scheduler": "linear", "optimizer.warmup_steps": 2,
          "ema_decay": 0.9, "keep_last_checkpoints": 1}
    full = make_trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "full", **kw)
    full.train()
    full.cleanup()

    crashing = make_trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "crash", **kw)
    original = crashing.compute_loss

    def compute_loss(batch):
        if crashing.step == 3:
            raise Crash("simulated interruption after the step-2 checkpoint")
        return original(batch)

    crashing.compute_loss = compute_loss
    with pytest.raises(Crash):
        crashing.train()
    with pytest.raises(RunExistsError):  # a plain restart refuses to clobber the run
        make_trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "crash", **kw)
    # an older checkpoint left behind, as when a run is killed between writing a checkpoint and pruning
    ckdir = tmp_path / "crash" / "checkpoints"
    ckpt.save_checkpoint(ckdir, 0, {"trainable.w": torch.zeros(1)}, {"step": 0}, None)
    assert [p.name for p in ckpt.list_checkpoints(ckdir)] == ["checkpoint-0", "checkpoint-2"]
    resumed = PreferenceTrainer(parse_config(base_config(tiny_sd15_dir, pickapic_dir, tmp_path / "crash", **kw)))
    resumed.setup(resume=True)
    assert resumed.step == 2
    assert [p.name for p in ckpt.list_checkpoints(ckdir)] == ["checkpoint-2"]  # retention holds on resume too
    resumed.train()
    resumed.cleanup()

    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "crash" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curve = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert curve(tmp_path / "full") == curve(tmp_path / "crash")
    assert len(curve(tmp_path / "full")) == 6


def test_latent_cache_is_exact_and_hit_in_second_epoch(tiny_sd15_dir, pickapic_dir, tmp_path):
    kw = {"max_steps": 8, "checkpoint_every": None}  # 8 pairs / batch 2 = 4 steps per epoch
    plain = make_trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "plain", **kw)
    plain.train()
    cached = make_trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "cached",
                          **{**kw, "dataset.cache_dir": str(tmp_path / "cache")})
    cached.train()
    assert cached.cache.hits > 0 and cached.cache.misses > 0
    a = load_file(str(tmp_path / "plain" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "cached" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


WIDE_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]


@pytest.mark.parametrize("family,targets", [("sd15", None), ("sdxl", None), ("sd15", WIDE_TARGETS)])
def test_exported_lora_loads_into_diffusers_pipeline(family, targets, tiny_sd15_dir, tiny_sdxl_dir, pickapic_dir,
                                                     tmp_path):
    """Every adapted layer comes back in ``load_lora_weights`` (attention-only and wider target sets alike; a file
    mixing legacy and peft key spellings once lost the attention layers with only a warning)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model_dir = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    lora = {"rank": 4, "alpha": 8, **({"target_modules": targets} if targets else {})}
    tr = make_trainer(model_dir, pickapic_dir, tmp_path / "run",
                      **{"max_steps": 3, "model.lora": lora, "optimizer.learning_rate": 1e-2})
    tr.train()
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(model_dir)
    pipe.load_lora_weights(str(tmp_path / "run"))
    trained = tr.accelerator.unwrap_model(tr.unet).eval()

    def adapted(unet):
        return sorted(n for n, m in unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))

    assert adapted(pipe.unet) == adapted(trained) and len(adapted(trained)) > 0
    g = torch.Generator().manual_seed(0)
    x, tt = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])
    kw = {"encoder_hidden_states": torch.randn(2, 16, 32, generator=g)}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 16, generator=g),
                                   "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    with torch.no_grad():
        ours = trained(x, tt, **kw).sample
        theirs = pipe.unet(x, tt, **kw).sample
        pipe.unet.disable_lora()
        base = pipe.unet(x, tt, **kw).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (base - ours).abs().max() > 1e-4  # the adapter does change the output


def test_v_prediction_model_trains_from_ln2(tmp_path, pickapic_dir):
    """SD2.1-style v-prediction: the target is v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0 and step 0 is still ln 2."""
    from fixtures.tiny_models import save_tiny_pipeline

    model_dir = save_tiny_pipeline(tmp_path / "v", "sd21", prediction_type="v_prediction")
    tr = make_trainer(model_dir, pickapic_dir, tmp_path / "run", max_steps=2, checkpoint_every=None)
    assert tr.components.noise_scheduler.config.prediction_type == "v_prediction"
    tr.train()
    assert tr.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert tr.history[1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    tr.cleanup()


@pytest.mark.parametrize("options", [
    {"model.gradient_checkpointing": True},
    {"mixed_precision": "bf16"},
    {"model.attention": "math"},
    {"model.lora": None, "mixed_precision": "bf16"},
    {"gradient_accumulation_steps": 2, "weighting": "min_snr"},
])
def test_training_options_start_at_ln2_and_move(options, tiny_sd15_dir, pickapic_dir, tmp_path):
    tr = make_trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "run", max_steps=2, checkpoint_every=None, **options)
    tr.train()
    assert tr.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert tr.history[1]["loss"] != pytest.approx(math.log(2), abs=1e-5)
    tr.cleanup()


def test_xformers_requested_but_missing_is_a_clear_error(tiny_sd15_dir, pickapic_dir, tmp_path):
    pytest.importorskip("diffusers")
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install diffalign\[xformers\]"):
        make_trainer(tiny_sd15_dir, pickapic_dir, tmp_path / "run", **{"model.attention": "xformers"})
