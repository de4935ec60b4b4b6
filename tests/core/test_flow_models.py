"""SD3 / FLUX model layer on tiny random models: family detection, loading, text features equal to the
pipelines' ``encode_prompt``, denoisers equal to the diffusers training scripts' transformer calls, latent
scaling, and LoRA export that ``StableDiffusion3Pipeline`` / ``FluxPipeline.load_lora_weights`` read whole."""

import contextlib
import logging
import warnings

import pytest
import torch
from fixtures.tiny_flow import T5_LEN, VAE_SCALE, VAE_SHIFT, save_tiny_flow_pipeline

from diffalign.inference import pipeline_from_components
from diffalign.models import (
    FLOW_TARGET_MODULES,
    FlowCondition,
    FluxDenoiser,
    ModelNotFoundError,
    SD3Denoiser,
    add_lora,
    check_lora_matches,
    default_target_modules,
    detect_family,
    load_components,
    load_lora_into,
    load_lora_into_pipeline,
    make_denoiser,
    make_reference,
    pack_latents,
    save_lora,
    scale_latents,
    unpack_latents,
    unscale_latents,
)
from diffalign.models.text import build_condition, encode_prompts

PROMPTS = ["a photo of a cat", "a red painting of a dog", ""]
KINDS = ["sd3", "sd3-no-t5", "flux"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {
        "sd3": save_tiny_flow_pipeline(root / "sd3", "sd3"),
        "sd3-no-t5": save_tiny_flow_pipeline(root / "sd3-no-t5", "sd3", t5=False),
        "sd35": save_tiny_flow_pipeline(root / "sd35", "sd3", sd35=True),
        "flux": save_tiny_flow_pipeline(root / "flux", "flux"),
    }


def _load(folders, kind):
    return load_components(folders[kind], max_sequence_length=T5_LEN)


def _latents(n=3, seed=0):
    return torch.randn(n, 16, 16, 16, generator=torch.Generator().manual_seed(seed))  # (B, C, h, w)


@contextlib.contextmanager
def captured_messages():
    """Every Python warning and every diffusers / transformers / peft log record at WARNING or above."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name}: {record.getMessage()}")

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records.extend(f"warning: {w.message}" for w in caught)
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


# ------------------------------------------------------------------ family detection and loading
def test_family_detected_from_model_index(folders):
    assert detect_family(folders["sd3"]) == "sd3"
    assert detect_family(folders["sd3-no-t5"]) == "sd3"
    assert detect_family(folders["sd35"]) == "sd3"
    assert detect_family(folders["flux"]) == "flux"
    assert detect_family("stabilityai/stable-diffusion-3.5-large") == "sd3"
    assert detect_family("black-forest-labs/FLUX.1-dev") == "flux"
    assert detect_family("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"  # U-Net ids unchanged
    assert detect_family("stable-diffusion-v1-5/stable-diffusion-v1-5") == "sd15"


@pytest.mark.parametrize("kind", KINDS)
def test_load_components_round_trip(folders, kind):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    c = _load(folders, kind)
    family = kind.split("-")[0]
    pipe_cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3-no-t5" else {}
    pipe = pipe_cls.from_pretrained(folders[kind], **no_t5)  # how diffusers loads SD3 without T5
    assert c.family == family and c.is_flow and c.unet is None and c.denoiser_module is c.transformer
    assert isinstance(c.noise_scheduler, FlowMatchEulerDiscreteScheduler)
    assert c.native_resolution == (32 if family == "sd3" else 256)  # FLUX: the pipeline's default 128 latents
    names = ["transformer", "vae", "text_encoder", "text_encoder_2"]
    names += ["text_encoder_3"] if family == "sd3" else []
    for name in names:
        mine, ref = getattr(c, name), getattr(pipe, name)
        if ref is None:
            assert mine is None and kind == "sd3-no-t5" and name == "text_encoder_3"
            continue
        assert type(mine) is type(ref)
        theirs = ref.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.state_dict().items())
    assert (c.tokenizer_3 is None) == (kind != "sd3")
    assert len(c.text_encoders()) == {"sd3": 3, "sd3-no-t5": 2, "flux": 2}[kind]


def test_missing_folder_or_part_is_one_line(folders, tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found") as err:
        load_components(str(tmp_path / "nowhere"), family="sd3")
    assert "\n" not in str(err.value)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folders["flux"], broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(ModelNotFoundError, match="FluxTransformer2DModel") as err:
        load_components(str(broken))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="prediction_type"):
        load_components(folders["sd3"], prediction_type="epsilon")


# ------------------------------------------------------------------ text
@pytest.mark.parametrize("kind", KINDS)
def test_text_features_equal_the_pipelines_encode_prompt(folders, kind):
    c = _load(folders, kind)
    pipe = pipeline_from_components(c)
    with torch.no_grad():
        feats = encode_prompts(c, PROMPTS)
        if c.family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=T5_LEN)
        else:
            embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=T5_LEN)
    assert set(feats) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert torch.equal(feats["prompt_embeds"], embeds) and torch.equal(feats["pooled_prompt_embeds"], pooled)
    n = len(PROMPTS)
    if c.family == "sd3":  # (N, 16 CLIP + 16 T5, 32), pooled (N, 8 + 16)
        assert embeds.shape == (n, 16 + T5_LEN, 32) and pooled.shape == (n, 24)
        assert torch.all(embeds[:, :16, 24:] == 0)  # CLIP-L ‖ CLIP-G (24 wide) zero-padded to the T5 width
        assert torch.all(embeds[:, 16:] == 0) == (kind == "sd3-no-t5")
    else:
        assert embeds.shape == (n, T5_LEN, 32) and pooled.shape == (n, 16)


def test_t5_length_defaults_to_the_training_scripts(folders):
    c = load_components(folders["sd3"])
    assert c.t5_max_length == 77
    assert load_components(folders["flux"]).t5_max_length == 512
    with torch.no_grad():
        assert encode_prompts(c, ["a cat"])["prompt_embeds"].shape == (1, 16 + 77, 32)


def test_flow_condition_repeats_and_concatenates_like_the_unet_one(folders):
    c = _load(folders, "sd3")
    with torch.no_grad():
        cond = build_condition(encode_prompts(c, PROMPTS[:2]))
    assert isinstance(cond, FlowCondition) and len(cond) == 2
    both = cond.repeat(2)
    assert isinstance(both, FlowCondition) and len(both) == 4
    assert torch.equal(both.prompt_embeds[2:], cond.prompt_embeds)
    assert torch.equal(both.pooled_projections[2:], cond.pooled_projections)
    from diffalign.models import UNetCondition

    cat = UNetCondition.cat(cond, both)  # how the trainer concatenates [c(z_w); c(z_l)]
    assert isinstance(cat, FlowCondition) and cat.pooled_projections.shape == (6, 24)
    wide = cond.to(torch.float64)
    assert isinstance(wide, FlowCondition) and wide.prompt_embeds.dtype == torch.float64


# ------------------------------------------------------------------ denoisers
def _cond(c, n=3):
    with torch.no_grad():
        return build_condition(encode_prompts(c, PROMPTS[:n]))


def test_sd3_denoiser_is_the_training_scripts_call(folders):
    c = _load(folders, "sd3")
    x, cond = _latents(), _cond(c)
    t = c.noise_scheduler.timesteps[torch.tensor([0, 400, 999])]  # float, 1000 σ
    with torch.no_grad():
        want = c.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.prompt_embeds,
                             pooled_projections=cond.pooled_projections, return_dict=False)[0]
        got = make_denoiser("sd3", c.transformer)(x, t, cond)
        as_ints = SD3Denoiser(c.transformer)(x, t.long(), cond)  # integer timesteps are taken as floats
        scalar = SD3Denoiser(c.transformer)(x, t[1], cond)
    assert got.shape == x.shape and torch.equal(got, want)
    assert torch.allclose(as_ints, c.transformer(hidden_states=x, timestep=t.long().float(),
                                                 encoder_hidden_states=cond.prompt_embeds,
                                                 pooled_projections=cond.pooled_projections).sample)
    assert torch.equal(scalar[1], SD3Denoiser(c.transformer)(x, t[1].expand(3), cond)[1])


def test_flux_packing_equals_the_pipeline():
    from diffusers import FluxPipeline

    x = _latents()
    packed = FluxPipeline._pack_latents(x, 3, 16, 16, 16)
    assert torch.equal(pack_latents(x), packed) and packed.shape == (3, 64, 64)
    assert torch.equal(unpack_latents(packed, 16, 16), FluxPipeline._unpack_latents(packed, 32, 32, 2))
    assert torch.equal(unpack_latents(packed, 16, 16), x)
    from diffalign.models.latents import latent_image_ids

    want = FluxPipeline._prepare_latent_image_ids(3, 8, 8, "cpu", torch.float32)
    assert torch.equal(latent_image_ids(8, 8), want)


def test_flux_denoiser_is_pack_transformer_unpack(folders):
    from diffusers import FluxPipeline

    c = _load(folders, "flux")
    assert c.transformer.config.guidance_embeds
    x, cond = _latents(), _cond(c)
    t = c.noise_scheduler.timesteps[torch.tensor([0, 400, 999])]
    with torch.no_grad():  # train_dreambooth_lora_flux.py's call
        out = c.transformer(
            hidden_states=FluxPipeline._pack_latents(x, 3, 16, 16, 16), timestep=t / 1000,
            guidance=torch.tensor([2.5]).expand(3), pooled_projections=cond.pooled_projections,
            encoder_hidden_states=cond.prompt_embeds, txt_ids=torch.zeros(T5_LEN, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(3, 8, 8, "cpu", torch.float32), return_dict=False,
        )[0]
        want = FluxPipeline._unpack_latents(out, 32, 32, 2)
        got = FluxDenoiser(c.transformer, guidance_scale=2.5)(x, t, cond)
        other = FluxDenoiser(c.transformer, guidance_scale=5.0)(x, t, cond)
    assert got.shape == x.shape and torch.equal(got, want)
    assert not torch.allclose(got, other)  # the guidance input reaches the model


def test_latent_scaling_uses_shift_and_scale(folders):
    c = _load(folders, "flux")
    x = _latents()
    z = scale_latents(c.vae, x)
    assert torch.equal(z, (x - VAE_SHIFT) * VAE_SCALE)
    assert torch.allclose(unscale_latents(c.vae, z), x, atol=1e-6)
    from diffusers import AutoencoderKL

    sd_vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=4, latent_channels=4,
                           scaling_factor=0.18215)
    y = x[:, :4]
    assert sd_vae.config.shift_factor is None
    assert torch.equal(scale_latents(sd_vae, y), y * 0.18215)  # U-Net families: z = x · scaling_factor


# ------------------------------------------------------------------ LoRA
def _perturb(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ["sd3", "sd35", "flux"])
def test_lora_export_loads_whole_and_silently_into_the_pipeline(folders, kind, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    c = _load(folders, kind)
    family = c.family
    x, cond = _latents(), _cond(c)
    t = torch.tensor([900.0, 500.0, 30.0])
    den = make_denoiser(family, c.transformer)
    with torch.no_grad():
        base = den(x, t, cond)
    assert default_target_modules(family) == FLOW_TARGET_MODULES
    add_lora(c.transformer, rank=4, alpha=2, target_modules=default_target_modules(family))
    adapted = {n.rsplit(".", 1)[0] for n, _ in c.transformer.named_parameters() if ".lora_A." in n}
    for part in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        assert any(n.startswith(f"transformer_blocks.0.attn.{part}.lora_A") for n in adapted), part
    assert all(".attn." in n for n in adapted)  # SD3.5-Medium's attn2 stays as the diffusers script leaves it
    assert (kind == "sd35") == any(".attn2." in n for n, _ in c.transformer.named_modules())
    with torch.no_grad():
        assert torch.equal(den(x, t, cond), base)  # B = 0 at init
    _perturb(c.transformer)
    with torch.no_grad():
        trained = den(x, t, cond)
        reference = make_reference(family, c.transformer)(x, t, cond)
    assert not torch.allclose(trained, base, atol=1e-4)
    assert torch.equal(reference, base)  # adapters disabled = the base model

    path = save_lora(c.transformer, tmp_path / "lora")
    assert path.name == "pytorch_lora_weights.safetensors"
    saved = load_file(str(path))
    assert saved and all(k.startswith("transformer.") for k in saved)

    pipe_cls = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipe = pipe_cls.from_pretrained(folders[kind])
    with captured_messages() as messages:
        pipe.load_lora_weights(str(tmp_path / "lora"))
    # diffusers 0.42 loads into every text encoder unconditionally and says "No LoRA keys associated to
    # <CLIP class> found with the prefix='text_encoder...'" for each one whenever a LoRA holds transformer
    # layers only (the files its own SD3/FLUX LoRA scripts write too); nothing else may be said.
    encoders = ["text_encoder", "text_encoder_2"] if family == "sd3" else ["text_encoder"]
    notices = [m for m in messages if "No LoRA keys associated to CLIPTextModel" in m]
    assert [m for m in messages if m not in notices] == []
    assert sorted(m.split("prefix=")[1].split("'")[1] for m in notices) == encoders
    (adapter,) = pipe.transformer.peft_config  # diffusers names it default_0
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    loaded = {f"transformer.{k}": v for k, v in loaded.items()}
    assert set(loaded) == set(saved)  # every saved key consumed, none missing
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    with torch.no_grad():
        fresh = make_denoiser(family, pipe.transformer)(x, t, cond)
    assert torch.allclose(fresh, trained, atol=1e-5), (fresh - trained).abs().max()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_reload_check_and_frozen_reference(folders, family, tmp_path):
    c = _load(folders, family)
    x, cond, t = _latents(), _cond(c), torch.tensor([700.0, 300.0, 10.0])
    den = make_denoiser(family, c.transformer)
    with torch.no_grad():
        base = den(x, t, cond)
    add_lora(c.transformer, rank=2, target_modules=FLOW_TARGET_MODULES)
    _perturb(c.transformer, seed=3)
    frozen = make_reference(family, c.transformer, frozen_copy=True)
    save_lora(c.transformer, tmp_path)
    check_lora_matches(c.transformer, tmp_path)
    other = _load(folders, family)
    load_lora_into(other.transformer, tmp_path)  # continue from an export: same adapter, same outputs
    with torch.no_grad():
        reloaded = make_denoiser(family, other.transformer)(x, t, cond)
        assert torch.allclose(reloaded, den(x, t, cond), atol=1e-6)
        assert torch.allclose(frozen(x, t, cond), den(x, t, cond), atol=1e-6)
        assert not torch.allclose(frozen(x, t, cond), base, atol=1e-4)
    pipe = pipeline_from_components(_load(folders, family))
    with captured_messages() as messages:
        load_lora_into_pipeline(pipe, tmp_path)  # diffalign's loader: checked, and silent
    assert messages == []
    with torch.no_grad():
        assert torch.allclose(make_denoiser(family, pipe.transformer)(x, t, cond), den(x, t, cond), atol=1e-6)
    wrong = _load(folders, "flux" if family == "sd3" else "sd3").transformer
    from diffalign.models import LoRAMismatchError

    with pytest.raises(LoRAMismatchError, match="transformer"):
        check_lora_matches(wrong, tmp_path)
