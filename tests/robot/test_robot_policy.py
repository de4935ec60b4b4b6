"""Diffusion action policy: denoisers, encoders, the likelihood-layer contract, sampling, persistence, heads."""

import copy
import math

import pytest
import torch

from diffalign.likelihood import preference_errors  # after diffalign.robot: see its import-order note
from diffalign.robot import (
    DeformPAMConfig,
    DeformPAMHead,
    DiffusionActionPolicy,
    DiffusionPolicyConfig,
    PointNetEncoder,
    PreferencePairs,
    RAPLConfig,
    RAPLHead,
    SmallCNN,
    TorchvisionEncoder,
    implicit_reward,
)


def tiny_policy(**overrides) -> DiffusionActionPolicy:
    torch.manual_seed(0)
    kw = {"hidden_dim": 32, "n_blocks": 1, "cond_dim": 16, "unet_down_dims": (8, 16), "num_inference_steps": 4}
    kw.update(overrides)
    return DiffusionActionPolicy(DiffusionPolicyConfig(**kw))


@pytest.mark.parametrize("denoiser", ["mlp", "unet1d"])
@pytest.mark.parametrize("encoder", ["identity", "mlp"])
def test_denoiser_shapes_and_bc_step_moves_every_parameter(denoiser, encoder):
    policy = tiny_policy(denoiser=denoiser, obs_encoder=encoder)
    obs, actions = torch.randn(6, 7), torch.randn(6, 8, 2)
    policy.fit_normalizer(actions)
    x_t, t = torch.randn(6, 8, 2), torch.randint(0, 100, (6,))
    assert policy(x_t, t, obs).shape == (6, 8, 2)
    before = copy.deepcopy(policy.state_dict())
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    policy.compute_loss(obs, actions, generator=torch.Generator().manual_seed(0)).backward()
    opt.step()
    for name, p in policy.named_parameters():
        assert not torch.equal(before[name], p), f"Parameter {name} has not changed."


def test_pointnet_encoder_is_permutation_invariant_and_drives_the_policy():
    enc = PointNetEncoder(point_dim=3, cond_dim=8, dims=(16, 32))
    pts = torch.randn(2, 20, 3)
    perm = torch.randperm(20)
    assert torch.allclose(enc(pts), enc(pts[:, perm]), atol=1e-6)
    policy = tiny_policy(obs_encoder="pointnet", pointnet_dims=(16, 32))
    out = policy.sample(pts, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 8, 2)


def test_policy_is_a_denoiser_for_the_shared_likelihood_layer():
    policy = tiny_policy()
    ref = copy.deepcopy(policy)
    x0 = torch.rand(4, 8, 2) * 2 - 1  # [winners; losers], B = 2
    obs = torch.randn(2, 7).repeat(2, 1)
    errs = preference_errors(policy, policy.noise_scheduler, x0, obs, reference=ref,
                             generator=torch.Generator().manual_seed(0))
    assert errs.model_w.shape == (2,)
    assert torch.allclose(errs.model_w, errs.ref_w) and torch.allclose(errs.model_l, errs.ref_l)
    assert errs.model_w.requires_grad and not errs.ref_w.requires_grad


def test_sampling_is_seeded_normalised_and_round_trips_through_save(tmp_path):
    policy = tiny_policy()
    policy.fit_normalizer(torch.rand(50, 8, 2) * 4 + 3)  # world range [3, 7]
    obs = torch.randn(5, 7)
    a1 = policy.sample(obs, generator=torch.Generator().manual_seed(1))
    a2 = policy.sample(obs, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a1, a2)
    assert (a1 >= policy.action_low - 1e-5).all() and (a1 <= policy.action_high + 1e-5).all()  # clip_sample
    policy.save_pretrained(tmp_path)
    loaded = DiffusionActionPolicy.from_pretrained(tmp_path)
    assert torch.equal(loaded.sample(obs, generator=torch.Generator().manual_seed(1)), a1)
    cands = policy.sample_candidates(obs, 3, generator=torch.Generator().manual_seed(1))
    assert cands.shape == (5, 3, 8, 2)


def test_config_validation_names_the_valid_values():
    with pytest.raises(ValueError, match="`denoiser` must be one of"):
        DiffusionPolicyConfig(denoiser="transformer")
    with pytest.raises(ValueError, match="not divisible"):
        DiffusionPolicyConfig(denoiser="unet1d", horizon=6, unet_down_dims=(8, 16, 32))
    with pytest.raises(ValueError, match="`reference_mode` must be one of"):
        DeformPAMConfig(reference_mode="lora")


def _pairs(n=8):
    g = torch.Generator().manual_seed(0)
    return PreferencePairs(torch.randn(n, 7, generator=g), torch.randn(n, 8, 2, generator=g),
                           torch.randn(n, 8, 2, generator=g), torch.tensor([1.0, 0.0, 0.5, 1.0] * (n // 4)))


@pytest.mark.parametrize("form", ["logsigmoid", "deformpam"])
@pytest.mark.parametrize("reference_mode", ["frozen", "deformpam_encoder"])
def test_deformpam_head_step(form, reference_mode):
    policy = tiny_policy()
    head = DeformPAMHead(policy, DeformPAMConfig(form=form, reference_mode=reference_mode, steps=2, batch_size=8,
                                                 tie_mode="sft", lr=1e-2))
    out = head.loss(_pairs(), generator=torch.Generator().manual_seed(0))
    assert out.metrics["pairs/valid"] == 8.0  # 6 strict pairs + 2 ties with the SFT term
    assert torch.isfinite(out.loss)
    if reference_mode == "frozen":  # policy == reference at the start: accuracy 1/2, strict losses at their special value
        assert out.metrics["rewards/accuracies"] == 0.5
        strict = out.losses[~_pairs().tie]
        expected = -0.5 if form == "deformpam" else math.log(2)
        assert torch.allclose(strict, torch.full_like(strict, expected))
    history = head.fit(_pairs(), seed=0)
    assert len(history) == 2
    ref_params = dict(head.reference.named_parameters())
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, ref_params[n])]
    assert changed, "no parameter moved"


def test_deformpam_encoder_parity_is_degenerate_for_identity_encoders():
    policy = tiny_policy(obs_encoder="identity")
    head = DeformPAMHead(policy, DeformPAMConfig(reference_mode="deformpam_encoder"))
    out = head.loss(_pairs(), generator=torch.Generator().manual_seed(0))
    assert out.metrics["rewards/margins"] == 0.0  # e_θ ≡ e_ref, as the research note warns


def test_implicit_reward_common_random_numbers():
    policy = tiny_policy()
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obs = torch.randn(3, 7)
    c = torch.randn(3, 1, 8, 2).repeat(1, 4, 1, 1)  # four identical candidates per state
    r = implicit_reward(policy, ref, obs, c, n_draws=5, generator=torch.Generator().manual_seed(0))
    assert r.shape == (3, 4)
    assert torch.allclose(r, r[:, :1].expand_as(r))  # same (t, ε) for every candidate -> same reward
    r_ind = implicit_reward(policy, ref, obs, c, n_draws=5, share_noise_across_candidates=False,
                            generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(r_ind, r_ind[:, :1].expand_as(r_ind))
    assert torch.equal(implicit_reward(ref, ref, obs, c, n_draws=3), torch.zeros(3, 4))


def test_implicit_reward_is_positive_where_the_policy_denoises_better():
    """r̂ = -β · mean_m [e_θ - e_ref]: a reference whose prediction is off by +10 everywhere has e_ref ≫ e_θ on every
    candidate, so every reward is positive, and RAS picks the candidate where the policy's advantage is largest."""
    policy = tiny_policy()
    worse = lambda x_t, t, obs: policy(x_t, t, obs) + 10.0
    obs, c = torch.randn(2, 7), torch.randn(2, 3, 8, 2)
    r = implicit_reward(policy, worse, obs, c, beta=1.0, n_draws=2, generator=torch.Generator().manual_seed(0))
    assert (r > 50).all()  # e_ref - e_θ ≈ 100 (the squared offset) up to the cross term


def test_head_select_n1_is_the_reference_sample():
    policy = tiny_policy()
    head = DeformPAMHead(policy, DeformPAMConfig(n_draws=2))
    obs = torch.randn(4, 7)
    sel = head.select(obs, n_candidates=1, generator=torch.Generator().manual_seed(3))
    direct = head.reference.sample(obs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sel.actions, direct)


def test_small_cnn_and_rapl_head_step():
    torch.manual_seed(0)
    head = RAPLHead(RAPLConfig(emb_dim=8, cnn_channels=(4, 8), eps=0.1, sinkhorn_iters=20, epochs=1, batch_size=2,
                               val_frac=0.0))
    frames = [torch.rand(4, 3, 3, 16, 16) for _ in range(3)]
    before = copy.deepcopy(head.encoder.state_dict())
    head.fit(*frames, seed=0)
    assert any(not torch.equal(before[n], p) for n, p in head.encoder.state_dict().items())
    r = head.reward(frames[0][:2])(frames[1])
    assert r.shape == (4,) and (r <= 0).all()
    assert SmallCNN(5)(torch.rand(2, 3, 32, 32)).shape == (2, 5)


def test_rapl_default_loss_is_the_author_codes_sum_of_one_minus_p():
    """RAPL code's contrastive term: torch.sum(1 - exp R(B|A) / (exp R(B|A) + exp R(C|A))) over the batch, with
    its gradients (the scripts without tie triplets add the same sum twice: a factor 2 Adam does not see)."""
    from diffalign.robot.modeling_rapl import triplet_rewards

    torch.manual_seed(0)
    cfg = RAPLConfig(emb_dim=8, cnn_channels=(4, 8), eps=0.1, sinkhorn_iters=20)
    assert (cfg.loss_form, cfg.reduction) == ("rapl_code", "sum")
    head = RAPLHead(cfg)
    frames = [torch.rand(3, 3, 3, 16, 16) for _ in range(3)]
    loss, _ = head.loss(*frames)
    (g_head,) = torch.autograd.grad(loss, [head.encoder.head.weight])
    rb, rc = triplet_rewards(head.encoder, *frames, cfg)
    want = torch.sum(1 - torch.exp(rb) / (torch.exp(rb) + torch.exp(rc)))
    (g_want,) = torch.autograd.grad(want, [head.encoder.head.weight])
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(g_head, g_want)
    mean_loss, _ = RAPLHead(RAPLConfig(**{**cfg.to_dict(), "reduction": "mean"}), head.encoder).loss(*frames)
    torch.testing.assert_close(mean_loss * 3, want)


def test_torchvision_backbone_by_name_frozen_trunk_and_local_weights(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = torchvision.models.get_model("resnet18", weights=None)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    enc = TorchvisionEncoder("resnet18", emb_dim=8, weights=path)
    assert torch.equal(enc.trunk.conv1.weight, reference.conv1.weight)
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    enc.train()
    assert not enc.trunk.training  # frozen BatchNorm statistics
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, 8)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pt")
    enc2 = TorchvisionEncoder("resnet18", emb_dim=8, weights=tmp_path / "resnet18.pt")
    assert torch.equal(enc2.trunk.conv1.weight, reference.conv1.weight)
