"""The online-RL math (diffalign.online) against the official formulas, written out inline from the cited
lines.

Sources: yifan123/flow_grpo ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` L35-70@ac4c86e (SDE step)
and L70-89@54809b5 (CPS), ``scripts/train_sd3.py`` L880-923@ac4c86e (GRPO loss, KL, metrics), ``flow_grpo/
stat_tracking.py`` L11-31@ac4c86e (advantages); kvablack/ddpo-pytorch ``ddpo_pytorch/diffusers_patch/
ddim_with_logprob.py`` L22-190@1958463 (DDIM with η); NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``
L910-975@24af555 (NFT loss).
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffalign.online import (
    ddim_step_with_logprob,
    flow_cps_step,
    flow_grpo_kl,
    flow_sde_step,
    group_advantages,
    grpo_loss,
    nft_loss,
    nft_optimality,
    sde_window,
    train_step_indices,
)

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as DDPO builds its DDIMScheduler from it
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "steps_offset": 1, "trained_betas": None}
SHAPE = (3, 4, 6, 6)


def _flow_scheduler(n=10):
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's scheduler config
    s.set_timesteps(n)
    return s


def _tensors(seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


# ----------------------------------------------------------------------------- official formulas, inline
def official_sde(sigmas, step_index, model_output, sample, noise_level, prev_sample=None, generator=None):
    """sd3_sde_with_logprob.py L40-70@ac4c86e, with the scheduler lookup replaced by the step indices."""
    sigma = sigmas[step_index].view(-1, 1, 1, 1)
    sigma_prev = sigmas[[i + 1 for i in step_index]].view(-1, 1, 1, 1)
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    prev_sample_mean = (sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
                        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt)
    if prev_sample is None:
        variance_noise = randn_tensor(model_output.shape, generator=generator, dtype=model_output.dtype)
        prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * variance_noise
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2)
                / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
                - torch.log(std_dev_t * torch.sqrt(-1 * dt))
                - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), prev_sample_mean, std_dev_t


def official_cps(sigmas, step_index, model_output, sample, noise_level, prev_sample=None, generator=None):
    """sd3_sde_with_logprob.py L42-47, L70-89@54809b5."""
    sigma = sigmas[step_index].view(-1, 1, 1, 1)
    sigma_prev = sigmas[[i + 1 for i in step_index]].view(-1, 1, 1, 1)
    std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
    pred_original_sample = sample - sigma * model_output
    noise_estimate = sample + model_output * (1 - sigma)
    prev_sample_mean = (pred_original_sample * (1 - sigma_prev)
                        + noise_estimate * torch.sqrt(sigma_prev**2 - std_dev_t**2))
    if prev_sample is None:
        variance_noise = randn_tensor(model_output.shape, generator=generator, dtype=model_output.dtype)
        prev_sample = prev_sample_mean + std_dev_t * variance_noise
    log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2)
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), prev_sample_mean, std_dev_t


def official_ddim(self, model_output, timestep, sample, eta, prev_sample=None, generator=None):
    """ddim_with_logprob.py L17-36 and L92-190@1958463 (prediction types epsilon / v_prediction)."""
    def left_broadcast(t, shape):
        return t.reshape(t.shape + (1,) * (len(shape) - t.ndim)).broadcast_to(shape)

    prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
    prev_timestep = torch.clamp(prev_timestep, 0, self.config.num_train_timesteps - 1)
    alpha_prod_t = self.alphas_cumprod.gather(0, timestep.cpu())
    alpha_prod_t_prev = torch.where(prev_timestep.cpu() >= 0,
                                    self.alphas_cumprod.gather(0, prev_timestep.cpu()),
                                    self.final_alpha_cumprod)
    alpha_prod_t = left_broadcast(alpha_prod_t, sample.shape)
    alpha_prod_t_prev = left_broadcast(alpha_prod_t_prev, sample.shape)
    beta_prod_t = 1 - alpha_prod_t
    if self.config.prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    else:  # v_prediction
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    # _get_variance(self, timestep, prev_timestep), L22-36
    a_t = torch.gather(self.alphas_cumprod, 0, timestep.cpu())
    a_prev = torch.where(prev_timestep.cpu() >= 0, self.alphas_cumprod.gather(0, prev_timestep.cpu()),
                         self.final_alpha_cumprod)
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    std_dev_t = left_broadcast(eta * variance ** (0.5), sample.shape)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample_mean = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    if prev_sample is None:
        variance_noise = randn_tensor(model_output.shape, generator=generator, dtype=model_output.dtype)
        prev_sample = prev_sample_mean + std_dev_t * variance_noise
    log_prob = (-((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * (std_dev_t**2))
                - torch.log(std_dev_t) - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi))))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), prev_sample_mean, std_dev_t


def official_grpo(log_prob, old_log_prob, adv, clip_range, adv_clip_max, beta=0.0, mean=None, ref_mean=None,
                  std_dev_t=None):
    """train_sd3.py L881-923@ac4c86e."""
    advantages = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    info = {"approx_kl": 0.5 * torch.mean((log_prob - old_log_prob) ** 2),
            "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()),
            "clipfrac_gt_one": torch.mean((ratio - 1.0 > clip_range).float()),
            "clipfrac_lt_one": torch.mean((1.0 - ratio > clip_range).float())}
    if beta > 0:
        kl_loss = ((mean - ref_mean) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)
        return policy_loss + beta * torch.mean(kl_loss), info
    return policy_loss, info


def official_advantages(prompts, rewards, global_std):
    """PerPromptStatTracker.update(type='grpo'), stat_tracking.py L11-31@ac4c86e (one call, then clear())."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards) * 0.0
    for prompt in np.unique(prompts):
        prompt_rewards = rewards[prompts == prompt]
        mean = np.mean(prompt_rewards, axis=0, keepdims=True)
        if global_std:
            std = np.std(rewards, axis=0, keepdims=True)
        else:
            std = np.std(prompt_rewards, axis=0, keepdims=True)
        advantages[prompts == prompt] = (prompt_rewards - mean) / (std + 1e-4)
    return advantages


# --------------------------------------------------------------------------------------------- flow SDE
@pytest.mark.parametrize("steps", [[0, 4, 8], [9, 2, 1]])  # step 0 has sigma = 1, step 9 has sigma' = 0
def test_flow_sde_step_equals_official_on_a_given_prev_sample(steps):
    sigmas = _flow_scheduler().sigmas
    v, x, prev = _tensors()
    nxt = [i + 1 for i in steps]
    ours = flow_sde_step(v, sigmas[steps], sigmas[nxt], x, noise_level=0.7, prev_sample=prev)
    theirs = official_sde(sigmas, steps, v, x, 0.7, prev_sample=prev)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(*torch.broadcast_tensors(a, b), rtol=1e-6, atol=1e-6)
    assert ours.log_prob.shape == (3,) and ours.std.shape == (3, 1, 1, 1)


def test_flow_sde_step_draws_what_the_official_step_draws():
    sigmas, steps = _flow_scheduler().sigmas, [0, 3, 6]
    v, x, _ = _tensors(1)
    ours = flow_sde_step(v, sigmas[steps], sigmas[[i + 1 for i in steps]], x, noise_level=0.7,
                         generator=torch.Generator().manual_seed(5))
    theirs = official_sde(sigmas, steps, v, x, 0.7, generator=torch.Generator().manual_seed(5))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(*torch.broadcast_tensors(a, b), rtol=1e-6, atol=1e-6)
    # a scalar sigma pair and a batch of one sigma give the same step
    one = flow_sde_step(v, float(sigmas[3]), float(sigmas[4]), x, prev_sample=ours.prev_sample)
    many = flow_sde_step(v, sigmas[[3] * 3], sigmas[[4] * 3], x, prev_sample=ours.prev_sample)
    torch.testing.assert_close(one.log_prob, many.log_prob)


def test_flow_sde_step_gradient_flows_through_the_mean_only():
    sigmas = _flow_scheduler().sigmas
    v, x, prev = _tensors(2)
    v.requires_grad_(True)
    lp = flow_sde_step(v, sigmas[2], sigmas[3], x, prev_sample=prev).log_prob
    lp.sum().backward()
    v2 = v.detach().clone().requires_grad_(True)
    official_sde(sigmas, [2] * 3, v2, x, 0.7, prev_sample=prev)[1].sum().backward()
    torch.testing.assert_close(v.grad, v2.grad, rtol=1e-5, atol=1e-7)


def test_noise_level_zero_is_the_euler_step():
    sigmas = _flow_scheduler().sigmas
    v, x, _ = _tensors(3)
    out = flow_sde_step(v, sigmas[2], sigmas[3], x, noise_level=0.0)
    torch.testing.assert_close(out.prev_sample, x + v * (sigmas[3] - sigmas[2]))
    assert torch.isnan(out.log_prob).all()


def test_flow_sde_step_refuses_bad_sigmas():
    v, x, _ = _tensors()
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        flow_sde_step(v, 0.3, 0.5, x)
    with pytest.raises(ValueError, match="either prev_sample"):
        flow_sde_step(v, 0.5, 0.3, x, prev_sample=x, generator=torch.Generator())


# -------------------------------------------------------------------------------------------------- CPS
@pytest.mark.parametrize("given", [True, False])
def test_cps_step_equals_official(given):
    sigmas, steps = _flow_scheduler().sigmas, [0, 5, 9]
    v, x, prev = _tensors(4)
    def kw():  # a fresh generator for each side
        return {"prev_sample": prev} if given else {"generator": torch.Generator().manual_seed(7)}

    ours = flow_cps_step(v, sigmas[steps], sigmas[[i + 1 for i in steps]], x, noise_level=0.8, **kw())
    theirs = official_cps(sigmas, steps, v, x, 0.8, **kw())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(*torch.broadcast_tensors(a, b), rtol=1e-6, atol=1e-6)
    via = flow_sde_step(v, sigmas[steps], sigmas[[i + 1 for i in steps]], x, noise_level=0.8, sde_type="cps",
                        prev_sample=ours.prev_sample)
    torch.testing.assert_close(via.log_prob, ours.log_prob)


# ------------------------------------------------------------------------------------------ DDIM with eta
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("given", [True, False])
def test_ddim_step_equals_ddpo(prediction_type, given):
    sched = DDIMScheduler(**SD15_SCHEDULER, prediction_type=prediction_type)
    sched.set_timesteps(50)
    t = sched.timesteps[[0, 25, 49]]  # 981, 481, 1; the last t' < 0: final_alpha_cumprod = alphas_cumprod[0]
    out, x, prev = _tensors(5)
    def kw():  # a fresh generator for each side
        return {"prev_sample": prev} if given else {"generator": torch.Generator().manual_seed(9)}

    ours = ddim_step_with_logprob(out, sched, t, x, eta=1.0, **kw())
    theirs = official_ddim(sched, out, t, x, 1.0, **kw())
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(*torch.broadcast_tensors(a, b), rtol=1e-5, atol=1e-5)
    assert ours.log_prob.shape == (3,)


def test_ddim_step_mean_and_noise_equal_diffusers_step():
    sched = DDIMScheduler(**SD15_SCHEDULER)
    sched.set_timesteps(20)
    out, x, _ = _tensors(6, (1, 4, 6, 6))
    for t in sched.timesteps[[0, 7, 19]]:
        gen = torch.Generator().manual_seed(1)
        ours = ddim_step_with_logprob(out, sched, int(t), x, eta=0.6, generator=gen)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        theirs = sched.step(out, int(t), x, eta=0.6, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours.prev_sample, theirs, rtol=1e-5, atol=1e-5)


def test_ddim_last_step_uses_alphas_cumprod_0_as_ddpo_even_with_set_alpha_to_one():
    sched = DDIMScheduler(**{**SD15_SCHEDULER, "set_alpha_to_one": True})
    sched.set_timesteps(20)
    out, x, prev = _tensors(7)
    t = sched.timesteps[[19, 19, 19]]  # t = 1, t' = -49
    ours = ddim_step_with_logprob(out, sched, t, x, eta=1.0, prev_sample=prev)
    theirs = official_ddim(sched, out, t, x, 1.0, prev_sample=prev)
    assert torch.isfinite(ours.log_prob).all()
    torch.testing.assert_close(ours.log_prob, theirs[1], rtol=1e-5, atol=1e-5)


def test_ddim_needs_eta_and_timesteps():
    sched = DDIMScheduler(**SD15_SCHEDULER)
    out, x, _ = _tensors()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(out, sched, 981, x, eta=1.0)
    sched.set_timesteps(50)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(out, sched, 981, x, eta=0.0)


# --------------------------------------------------------------------------------------------- advantages
PROMPTS = ["a", "b", "a", "c", "b", "a", "c", "c"]
REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 4.0, 4.0])


@pytest.mark.parametrize("global_std", [True, False])
def test_group_advantages_equal_the_stat_tracker(global_std):
    ours = group_advantages(REWARDS, PROMPTS, global_std=global_std)
    theirs = official_advantages(PROMPTS, REWARDS.numpy(), global_std)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-6)
    ids = torch.tensor([ord(p) for p in PROMPTS])  # the same groups as integer ids
    torch.testing.assert_close(group_advantages(REWARDS, ids, global_std=global_std), ours)


def test_group_advantages_by_hand():
    # prompt a: rewards 1, 3, 6 (mean 10/3); per-prompt std = sqrt(((7/3)^2 + (1/3)^2 + (8/3)^2) / 3)
    std_a = math.sqrt(((7 / 3) ** 2 + (1 / 3) ** 2 + (8 / 3) ** 2) / 3)
    adv = group_advantages(REWARDS, PROMPTS, global_std=False)
    assert adv[0].item() == pytest.approx((1 - 10 / 3) / (std_a + 1e-4), rel=1e-6)
    assert adv[[3, 6, 7]].tolist() == [0.0, 0.0, 0.0]  # prompt c: all equal
    glob = group_advantages(REWARDS, PROMPTS, per_prompt=False)  # train_sd3.py L782: global mean and std
    r = REWARDS.double()
    torch.testing.assert_close(glob, ((r - r.mean()) / (r.std(unbiased=False) + 1e-4)).float())


# --------------------------------------------------------------------------------------------- GRPO loss
def _grpo_case():
    # ratios exp(log_prob - old): 1.05 (inside 0.2), 1.5 (above), 0.6 (below), for positive and negative A
    old = torch.tensor([-1.0, -2.0, 0.5, -1.0, -2.0, 0.5])
    ratios = torch.tensor([1.05, 1.5, 0.6, 1.05, 1.5, 0.6])
    adv = torch.tensor([1.5, 2.0, 0.7, -1.5, -2.0, -9.0])  # -9 is clipped to -5 by adv_clip_max
    return old + ratios.log(), old, adv, ratios


def test_grpo_loss_values_and_gradients_equal_official():
    lp, old, adv, ratios = _grpo_case()
    lp1, lp2 = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    ours = grpo_loss(lp1, old, adv, clip_range=0.2, adv_clip_max=5.0)
    theirs, info = official_grpo(lp2, old, adv, 0.2, 5.0)
    torch.testing.assert_close(ours.loss, theirs)
    ours.loss.backward()
    theirs.backward()
    torch.testing.assert_close(lp1.grad, lp2.grad)
    # by hand: d/dlogp of max(-A rho, -A clip(rho)) / B is -A rho / B where the unclipped term is the max,
    # else 0
    a = adv.clamp(-5, 5)
    live = torch.tensor([True, False, True, True, True, False])  # A>0: clipped above; A<0: clipped below
    torch.testing.assert_close(lp1.grad, torch.where(live, -a * ratios / 6, torch.zeros(6)))
    for k, v in info.items():
        assert ours.metrics[k] == pytest.approx(v.item(), rel=1e-6, abs=1e-9)
    assert ours.metrics["clipfrac"] == pytest.approx(4 / 6)


def test_grpo_loss_with_kl_equals_official():
    lp, old, adv, _ = _grpo_case()
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(6, 4, 3, 3, generator=g).requires_grad_(True)
    ref_mean = torch.randn(6, 4, 3, 3, generator=g)
    std = torch.rand(6, 1, 1, 1, generator=g) + 0.1
    ours = grpo_loss(lp, old, adv, clip_range=0.2, kl_beta=0.04, mean=mean, ref_mean=ref_mean, std=std)
    mean2 = mean.detach().clone().requires_grad_(True)
    theirs, _ = official_grpo(lp, old, adv, 0.2, 5.0, beta=0.04, mean=mean2, ref_mean=ref_mean, std_dev_t=std)
    torch.testing.assert_close(ours.loss, theirs)
    ours.loss.backward()
    theirs.backward()
    torch.testing.assert_close(mean.grad, mean2.grad)
    torch.testing.assert_close(ours.losses.mean(), ours.loss)
    torch.testing.assert_close(flow_grpo_kl(mean, ref_mean, std.view(-1)), flow_grpo_kl(mean, ref_mean, std))
    with pytest.raises(ValueError, match="needs mean"):
        grpo_loss(lp, old, adv, kl_beta=0.04)


# ----------------------------------------------------------------------------- on-policy ratio in fp32
class _Linear(torch.nn.Module):
    """A tiny deterministic model: a 1x1 convolution plus a timestep bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t):
        return self.conv(x) + 0.1 * torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)


def _rollout_and_rescore(step):
    """Roll out 4 samples x 4 steps with a generator (no grad), then re-score every stored step in
    micro-batches of 2 with gradients, as a trainer does; returns (old, new) log-probs (4, steps) and the GRPO
    output."""
    model, gen = _Linear(), torch.Generator().manual_seed(11)
    x = torch.randn(4, 4, 6, 6, generator=gen)
    latents, olds = [], []
    with torch.no_grad():
        for j in range(4):
            out = step(model, x, j, None, gen)
            latents.append((x, out.prev_sample))
            olds.append(out.log_prob)
            x = out.prev_sample
    news = []
    for j, (x_j, x_next) in enumerate(latents):
        news.append(torch.cat([step(model, x_j[k:k + 2], j, x_next[k:k + 2], None).log_prob for k in (0, 2)]))
    old, new = torch.stack(olds, 1), torch.stack(news, 1)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    res = grpo_loss(new[:, 0], old[:, 0], adv, clip_range=1e-4)
    return old, new, res


def _flow_step(kind):
    sigmas = _flow_scheduler(6).sigmas

    def step(model, x, j, prev, gen):
        return flow_sde_step(model(x, sigmas[j]), sigmas[j], sigmas[j + 1], x, noise_level=0.7,
                             prev_sample=prev, generator=gen, sde_type=kind)
    return step


def _ddim_step(model, x, j, prev, gen):
    sched = DDIMScheduler(**SD15_SCHEDULER)
    sched.set_timesteps(10)
    t = sched.timesteps[j]
    return ddim_step_with_logprob(model(x, t / 1000), sched, t, x, eta=1.0, prev_sample=prev, generator=gen)


@pytest.mark.parametrize("step", [_flow_step("sde"), _flow_step("cps"), _ddim_step],
                         ids=["sde", "cps", "ddim"])
def test_on_policy_ratio_is_one_at_the_first_update(step):
    old, new, res = _rollout_and_rescore(step)
    assert old.dtype == torch.float32
    assert (new - old).abs().max().item() < 1e-5
    assert res.metrics["clipfrac"] == 0.0
    assert abs(res.metrics["ratio_mean"] - 1.0) < 1e-5
    assert res.loss.requires_grad
    res.loss.backward()  # the gradient at ratio 1 is the plain policy gradient -mean(A grad log p)


def test_on_policy_ratio_is_exactly_one_for_the_same_batch():
    sigmas, model = _flow_scheduler(6).sigmas, _Linear()
    x = torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        old = flow_sde_step(model(x, sigmas[1]), sigmas[1], sigmas[2], x,
                            generator=torch.Generator().manual_seed(4))
    new = flow_sde_step(model(x, sigmas[1]), sigmas[1], sigmas[2], x, prev_sample=old.prev_sample)
    res = grpo_loss(new.log_prob, old.log_prob, torch.tensor([1.0, -1.0, 2.0, 0.0]))
    assert res.metrics["ratio_mean"] == 1.0 and res.metrics["ratio_max"] == 1.0
    assert res.metrics["clipfrac"] == 0.0


# -------------------------------------------------------------------------------------------- windows
def test_train_steps_and_sde_window():
    assert train_step_indices(10, 0.99) == list(range(9))  # flow_grpo's shipped timestep_fraction
    assert train_step_indices(10) == list(range(10))
    assert sde_window(10) == (0, 9)
    g = torch.Generator().manual_seed(0)
    seen = {sde_window(10, 2, (0, 5), generator=g) for _ in range(200)}
    assert seen == {(s, s + 2) for s in range(4)}  # start uniform in [0, 5 - 2]
    with pytest.raises(ValueError):
        sde_window(10, 6, (0, 5))


# ----------------------------------------------------------------------------------------- DiffusionNFT
def official_nft(forward_prediction, old_prediction, ref_forward_prediction, xt, x0, t, adv, beta,
                 adv_clip_max, kl_beta):
    """train_nft_sd3.py L910-970@24af555 (adv_mode unset)."""
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    advantages_clip = torch.clamp(adv, -adv_clip_max, adv_clip_max)
    r = torch.clamp((advantages_clip / adv_clip_max) / 2.0 + 0.5, 0, 1)
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (torch.abs(x0_prediction.double() - x0.double()).mean(dim=tuple(range(1, x0.ndim)),
                                                                               keepdim=True).clip(min=0.00001))
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (torch.abs(negative_x0_prediction.double() - x0.double())
                                  .mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=0.00001))
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(
        dim=tuple(range(1, x0.ndim)))
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    loss = (ori_policy_loss * adv_clip_max).mean()
    kl_div_loss = ((forward_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    return loss + kl_beta * torch.mean(kl_div_loss)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_loss_values_and_gradients_equal_official(beta):
    g = torch.Generator().manual_seed(8)
    x0, noise, v_old, v_ref = (torch.randn(5, 4, 6, 6, generator=g) for _ in range(4))
    t = torch.rand(5, generator=g) * 0.9 + 0.05
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    v = (v_old + 0.1 * torch.randn(5, 4, 6, 6, generator=g)).requires_grad_(True)
    adv = torch.tensor([-7.0, -1.0, 0.0, 2.0, 6.0])
    ours = nft_loss(v, v_old, xt, x0, t, adv, beta=beta, adv_clip_max=5.0, kl_beta=1e-4, ref_velocity=v_ref)
    v2 = v.detach().clone().requires_grad_(True)
    theirs = official_nft(v2, v_old, v_ref, xt, x0, t, adv, beta, 5.0, 1e-4)
    torch.testing.assert_close(ours.loss, theirs)
    ours.loss.backward()
    theirs.backward()
    torch.testing.assert_close(v.grad, v2.grad)
    torch.testing.assert_close(nft_optimality(adv), torch.tensor([0.0, 0.4, 0.5, 0.7, 1.0]))
