"""The toy flow world: the shipped SD3-style pipeline (assets/toy-flow) loads as diffusers and diffalign see
it, matches its pretraining script, pretrains deterministically, and labels pairs through make-pairs."""

import json

import numpy as np
import pytest
import torch

from diffalign import toy
from diffalign.inference import load_pipeline
from diffalign.toy import flow, flow_pretrain

MODEL = toy.toy_flow_path()
PAIRS = toy.toy_flow_pairs_path()
shipped = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason=f"{MODEL} not built")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(MODEL), device="cpu")


@shipped
def test_loads_as_a_t5_less_sd3_pipeline(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae.config.shift_factor == 0.0
    assert pipe.vae_scale_factor * pipe.transformer.config.sample_size == toy.IMAGE_SIZE
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size < 20_000_000


@shipped
def test_loads_through_diffalign_as_sd3():
    from diffalign.models import load_components

    c = load_components(str(MODEL))
    assert c.family == "sd3" and c.is_flow and c.text_encoder_3 is None and c.t5_max_length == flow.T5_TOKENS
    assert c.native_resolution == toy.IMAGE_SIZE


@shipped
def test_vae_is_toy_sd_s():
    from safetensors.torch import load_file

    a = load_file(MODEL / "vae" / "diffusion_pytorch_model.safetensors")
    b = load_file(toy.toy_model_path() / "vae" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@shipped
def test_shipped_config_is_the_script_config():
    report = json.loads((MODEL / "training_report.json").read_text())
    assert report["config"] == flow_pretrain.FlowPretrainConfig().to_dict()
    transformer = json.loads((MODEL / "transformer" / "config.json").read_text())
    for key, value in flow.transformer_kwargs(flow.ToyFlowConfig()).items():
        assert transformer[key] == value, key


@shipped
def test_pretraining_features_are_the_trainers(pipe):
    """The pretraining's text features (token ids, 77 zero T5 rows) equal the trainer's and the pipeline's."""
    from diffalign.models import load_components
    from diffalign.models.text import encode_prompts

    c = load_components(str(MODEL))
    prompts = ["a red circle on a blue background", ""]
    ids = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    with torch.no_grad():
        ours = flow.encode_token_ids(c.text_encoder, c.text_encoder_2, ids)
        theirs = encode_prompts(c, prompts)
        pipes = pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False,
                                   max_sequence_length=flow.T5_TOKENS)
    torch.testing.assert_close(ours[0], theirs["prompt_embeds"])
    torch.testing.assert_close(ours[1], theirs["pooled_prompt_embeds"])
    torch.testing.assert_close(ours[0], pipes[0])
    torch.testing.assert_close(ours[1], pipes[2])


def test_repeated_zero_token_equals_the_zero_rows():
    """One zero token of multiplicity 77 (pretraining) = 77 zero rows (pipeline, trainer)."""
    torch.manual_seed(0)
    from diffusers import SD3Transformer2DModel

    cfg = flow.ToyFlowConfig(num_layers=2)
    tr = SD3Transformer2DModel(**flow.transformer_kwargs(cfg)).eval()
    for p in tr.parameters():
        p.data += 0.05 * torch.randn_like(p)
    ctx = torch.cat([torch.randn(2, 16, cfg.joint_attention_dim), torch.zeros(2, flow.T5_TOKENS, 48)], dim=1)
    kw = {"hidden_states": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([300.0, 800.0]),
          "pooled_projections": torch.randn(2, 48), "return_dict": False}
    with torch.no_grad():
        full = tr(encoder_hidden_states=ctx, **kw)[0]
        flow.set_repeated_zero_tokens(tr, flow.T5_TOKENS)
        short = tr(encoder_hidden_states=ctx[:, :17], **kw)[0]
        flow.set_repeated_zero_tokens(tr, None)
        again = tr(encoder_hidden_states=ctx, **kw)[0]
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, full)


def test_tiny_pretraining_is_deterministic():
    cfg = flow_pretrain.FlowPretrainConfig(
        steps=2, n_images=32, batch_size=8, warmup_steps=1,
        model=flow.ToyFlowConfig(num_layers=1, text_layers=1))
    runs = [flow_pretrain.pretrain_flow(cfg, None, progress=False, run_eval=False) for _ in range(2)]
    a, b = (r["pipeline"].transformer.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0]["final_loss"] == runs[1]["final_loss"] and np.isfinite(runs[0]["final_loss"])
    assert runs[0]["config"]["steps"] == 2


@shipped
def test_make_pairs_labels_flow_pairs(tmp_path):
    import pyarrow.parquet as pq

    from diffalign.toy.pairs import main

    out = tmp_path / "pairs"
    assert main(["--model", str(MODEL), "--out", str(out), "--n-pairs", "4", "--steps", "2", "--threads", "1",
                 "--no-progress"]) == 0
    table = pq.read_table(out / "train-00000-of-00001.parquet").to_pydict()
    assert len(table["caption"]) == 4 and set(table["model_0"]) == {"toy-flow"}
    for l0, l1, r0, r1 in zip(table["label_0"], table["label_1"], table["reward_0"], table["reward_1"]):
        assert l0 + l1 == 1.0 and (l0 == 0.5 or (l0 == 1.0) == (r0 > r1))
    assert json.loads((out / "pairs_report.json").read_text())["num_inference_steps"] == 2


@shipped
def test_shipped_pairs_come_from_toy_flow():
    import pyarrow.parquet as pq

    report = json.loads((PAIRS / "pairs_report.json").read_text())
    table = pq.read_table(PAIRS / "train-00000-of-00001.parquet", columns=["model_0", "label_0"]).to_pydict()
    assert set(table["model_0"]) == {"toy-flow"}
    assert len(table["label_0"]) == report["stats"]["n_pairs"] == 780
