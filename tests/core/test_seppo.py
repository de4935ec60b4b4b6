import math

import pytest
import torch
from safetensors.torch import load_file

from diffalign.objectives import aaf_sign, seppo_loss
from fixtures.data import base_config
from diffalign.training.config import parse_config
from diffalign.training.trainer import trainer_class

D = torch.float64


def test_aaf_routes_reference_sample_by_anchor():
    """Anchor (winner) errors: where the reference denoises it better (e_ref < e_θ) its sample is 'clearly
    better' and enters as a winner (s = -1); where it is worse (e_ref > e_θ) its sample is a loser (s = +1)."""
    model_w = torch.tensor([0.20, 0.20], dtype=D)
    ref_w = torch.tensor([0.10, 0.30], dtype=D)  # reference better on sample 0, worse on sample 1
    assert aaf_sign(model_w, ref_w).tolist() == [-1.0, 1.0]
    assert aaf_sign(model_w, ref_w, "indicator").tolist() == [0.0, 1.0]
    model_r = torch.tensor([0.15, 0.15], dtype=D, requires_grad=True)
    ref_r = torch.tensor([0.15, 0.15], dtype=D)
    seppo_loss(model_w, model_r, ref_w, ref_r, beta=100.0).backward()
    # d loss / d e_θ(x_r) > 0 means gradient descent lowers the error on x_r: the winner's branch (as for x_w in
    # Diffusion-DPO); < 0 means it raises it: the loser's branch.
    assert model_r.grad[0] > 0
    assert model_r.grad[1] < 0


@pytest.mark.parametrize("flipper", ["sign", "indicator"])
def test_a_tie_drops_the_reference_sample_term(flipper):
    """e_ref(x_w) == e_θ(x_w) (the snapshot equals the policy): s = 0, so d loss / d e_θ(x_r) = 0 and the loss is
    DPO on the winner alone: -log σ(-β/2 (e_θ(x_w) - e_ref(x_w))) = ln 2 here."""
    model_w = torch.tensor([0.20, 0.20], dtype=D, requires_grad=True)
    ref_w = torch.tensor([0.20, 0.20], dtype=D)
    model_r = torch.tensor([0.15, 0.30], dtype=D, requires_grad=True)
    ref_r = torch.tensor([0.10, 0.10], dtype=D)
    assert aaf_sign(model_w, ref_w, flipper).tolist() == [0.0, 0.0]
    loss = seppo_loss(model_w, model_r, ref_w, ref_r, beta=5000.0, flipper=flipper)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert model_r.grad.tolist() == [0.0, 0.0]
    # the winner's term still trains: d/d e_θ(x_w) of -log σ(-β/2 Δ_w) at Δ_w = 0 is β/4 / B = 625 per sample
    assert model_w.grad.tolist() == pytest.approx([625.0, 625.0])


def test_seppo_by_hand():
    """s = +1 (policy better on the anchor): inside = -2500·[(0.10-0.12) - (0.13-0.11)] = 100 -> ≈ 0;
    s = -1: inside = -2500·[(0.12-0.10) + (0.13-0.11)] = -100 -> ≈ 100."""
    one = lambda x: torch.tensor([x], dtype=D)
    assert seppo_loss(one(0.10), one(0.13), one(0.12), one(0.11)).item() == pytest.approx(
        math.log1p(math.exp(-100.0)), abs=1e-12)
    assert seppo_loss(one(0.12), one(0.13), one(0.10), one(0.11)).item() == pytest.approx(100.0, rel=1e-9)


def seppo_cfg(model, data, out, **kw):
    return parse_config(base_config(model, data, out, objective={
        "name": "seppo", "snapshot_every": 1, "max_snapshots": 3, "sampling_steps": 2, "guidance_scale": 2.0},
        **kw))


def test_seppo_trains_resumes_and_keeps_pool(tiny_sd15_dir, pickapic_dir, tmp_path):
    kw = {"max_steps": 4, "checkpoint_every": 2}
    cfg = seppo_cfg(tiny_sd15_dir, pickapic_dir, tmp_path / "full", **kw)
    cls = trainer_class(cfg)
    assert cls.__name__ == "SemiPolicyTrainer"
    full = cls(cfg).setup()
    calls = []
    full.accelerator.unwrap_model(full.unet).register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    full.train()
    # per step: 2 sampling calls (no grad, CFG batch), one policy call, one reference call
    assert calls == [False, False, True, False] * 4
    # step 1 draws the initial snapshot, which equals the policy: every pair is a tie and its sample's term drops
    assert full.history[0]["seppo/ref_dropped"] == 1.0
    assert [s for s, _ in full.pool] == [0, 3, 4]  # initial kept, then the latest K-1
    full.cleanup()

    cfg2 = seppo_cfg(tiny_sd15_dir, pickapic_dir, tmp_path / "crash", **kw)
    crashing = cls(cfg2).setup()
    orig = crashing.compute_loss

    def boom(batch):
        if crashing.step == 3:
            raise KeyboardInterrupt
        return orig(batch)

    crashing.compute_loss = boom
    with pytest.raises(KeyboardInterrupt):
        crashing.train()
    resumed = cls(cfg2).setup(resume=True)
    assert resumed.step == 2 and [s for s, _ in resumed.pool] == [0, 1, 2]
    resumed.train()
    a = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "crash" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seppo_trains_on_the_shared_condition_with_prompt_dropout(tiny_sd15_dir, pickapic_dir, tmp_path):
    """proportion_empty_prompts=1: the reference sample is drawn for the real prompt, but the policy and the
    reference are scored under the empty prompt, as in every recipe (it was ignored before)."""
    cfg = seppo_cfg(tiny_sd15_dir, pickapic_dir, tmp_path / "run", max_steps=1, checkpoint_every=None,
                    **{"dataset.proportion_empty_prompts": 1.0})
    tr = trainer_class(cfg)(cfg).setup()
    seen = []
    tr.accelerator.unwrap_model(tr.unet).register_forward_pre_hook(
        lambda m, a, kw: seen.append((torch.is_grad_enabled(), a[2].clone() if len(a) > 2 else
                                      kw["encoder_hidden_states"].clone())), with_kwargs=True)
    tr.train()
    with torch.no_grad():
        empty = tr.encode_text([""])["encoder_hidden_states"][0]
    scored = [h for grad, h in seen[-2:]]  # the policy call, then the reference call
    assert [g for g, _ in seen[-2:]] == [True, False]
    assert all(torch.equal(row, empty) for h in scored for row in h)
    sampled = seen[0][1]  # a sampling call: CFG batch of the real prompts and the empty one
    assert not all(torch.equal(row, empty) for row in sampled)
    tr.cleanup()
