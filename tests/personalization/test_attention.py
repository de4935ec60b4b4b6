"""Decoupled cross-attention: shapes, exact no-op without a user, the formula, fast vs reference path."""

import math

import pytest
import torch

from diffalign.personalization import (
    UserBranchSpec,
    attach_user_branch,
    cross_attention_layers,
    detach_user_branch,
    user_attention,
    user_processors,
)
from diffalign.personalization.cli import prediction_mixture


def tiny_unet():
    """The U-Net of ``fixtures.tiny_models`` (SD1.x layout, 4 cross-attentions), without the rest."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
    ).eval()


def unet_inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 4, 16, 16), generator=g)  # (B, C, h, w) latents
    t = torch.tensor([10, 700][:batch])
    text = torch.randn((batch, 16, 32), generator=g)  # (B, L, D) text states
    return x, t, text


def randomize_branch(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    for proc in user_processors(unet).values():
        for p in proc.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.5


SPEC = UserBranchSpec(feature_shape=(2, 16), num_tokens=4, token_dim=32)


def test_injected_token_and_projection_shapes():
    unet = tiny_unet()
    proj = attach_user_branch(unet, SPEC)
    tokens = proj(torch.randn(3, 2, 16))
    assert tokens.shape == (3, 4, 32)  # (B, N_u, D_u)
    layers = cross_attention_layers(unet)
    procs = user_processors(unet)
    assert set(procs) == set(layers) and len(procs) == 4 and all(n.endswith("attn2") for n in procs)
    for name, proc in procs.items():
        inner = layers[name].inner_dim
        assert proc.to_k_u.weight.shape == (inner, 32)  # W'_k: D_u -> H·d
        assert proc.to_v_u.weight.shape == (inner, 32)
        assert torch.count_nonzero(proc.to_v_u.weight) == 0  # zero-init W'_v
    # self-attention layers keep no branch
    assert all(not isinstance(m.processor, type(next(iter(procs.values()))))
               for n, m in unet.named_modules() if n.endswith("attn1"))
    names = [n for n, p in unet.named_parameters() if p.requires_grad and ("processor" in n or "user_" in n)]
    assert len(names) == 2 * 4 + 3  # W'_k, W'_v per layer + projection weight (no bias), norm weight, norm bias
    with pytest.raises(ValueError, match="user features must have shape"):
        proj(torch.randn(3, 1, 16))


@pytest.mark.parametrize("init", ["zero_v", "zero_gate"])
def test_no_user_reproduces_base_exactly(init):
    unet = tiny_unet()
    x, t, text = unet_inputs()
    with torch.no_grad():
        base = unet(x, t, text).sample
    proj = attach_user_branch(unet, UserBranchSpec((2, 16), 4, 32, init=init))
    u = proj(torch.randn(2, 2, 16)).detach()
    with torch.no_grad():
        assert torch.equal(unet(x, t, text).sample, base)
        # step 0: the branch is a no-op even with a user (policy == reference)
        assert torch.equal(unet(x, t, text, cross_attention_kwargs={"user_tokens": u}).sample, base)
    randomize_branch(unet)
    if init == "zero_gate":
        for proc in user_processors(unet).values():
            proc.gate.data.fill_(0.5)
    with torch.no_grad():
        assert torch.equal(unet(x, t, text).sample, base)  # no user: the base model, bit for bit
        assert torch.equal(unet(x, t, text, cross_attention_kwargs={"user_tokens": None}).sample, base)
        zeros = torch.zeros_like(u)  # dropped user (zeroed tokens): V' = 0 exactly
        assert torch.equal(unet(x, t, text, cross_attention_kwargs={"user_tokens": zeros}).sample, base)
        personal = unet(x, t, text, cross_attention_kwargs={"user_tokens": u}).sample
    assert (personal - base).abs().max() > 1e-3
    detach_user_branch(unet)
    with torch.no_grad():
        assert torch.equal(unet(x, t, text).sample, base)
    assert not hasattr(unet, "user_projection")


def test_processor_equals_decoupled_attention_formula():
    """Z' = softmax(QKᵀ/√d)V + s·softmax(QK'ᵀ/√d)V', then the output projection, computed by hand on one layer."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_unet()
    name, attn = next(iter(cross_attention_layers(unet).items()))
    attn.set_processor(AttnProcessor())  # the math path as the text branch
    attach_user_branch(unet, UserBranchSpec((2, 16), 4, 32, scale=0.7))
    randomize_branch(unet)
    proc = user_processors(unet)[name]
    g = torch.Generator().manual_seed(3)
    x = torch.randn((2, 9, attn.query_dim), generator=g)  # (B, L, C) image tokens
    c = torch.randn((2, 5, 32), generator=g)  # (B, L_text, D) text states
    u = torch.randn((2, 4, 32), generator=g)  # (B, N_u, D_u) user tokens
    with torch.no_grad():
        got = attn(x, encoder_hidden_states=c, user_tokens=u)
        h, d = attn.heads, attn.inner_dim // attn.heads

        def heads(z):  # (B, L, H·d) -> (B, H, L, d)
            return z.view(2, -1, h, d).transpose(1, 2)

        def attend(q, k, v):
            return ((q @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(-1) @ v  # (B, H, L, d)

        q = heads(attn.to_q(x))
        z_text = attend(q, heads(attn.to_k(c)), heads(attn.to_v(c)))
        z_user = attend(q, heads(proc.to_k_u(u)), heads(proc.to_v_u(u)))
        z = (z_text + 0.7 * z_user).transpose(1, 2).reshape(2, -1, h * d)
        want = attn.to_out[0](z)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fast_path_matches_reference_path():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn((3, n, 8), generator=g) for n in (7, 4, 4))
    torch.testing.assert_close(user_attention(q, k, v, 2, fast=True), user_attention(q, k, v, 2, fast=False),
                               atol=1e-6, rtol=1e-5)
    unet_fast, unet_ref = tiny_unet(), tiny_unet()
    attach_user_branch(unet_fast, SPEC, fast=True)
    attach_user_branch(unet_ref, SPEC, fast=False)
    randomize_branch(unet_fast)
    randomize_branch(unet_ref)
    x, t, text = unet_inputs()
    u = torch.randn((2, 4, 32), generator=g)
    with torch.no_grad():
        a = unet_fast(x, t, text, cross_attention_kwargs={"user_tokens": u}).sample
        b = unet_ref(x, t, text, cross_attention_kwargs={"user_tokens": u}).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_user_kwargs_raise_no_diffusers_warning(capfd):
    unet = tiny_unet()
    attach_user_branch(unet, SPEC)
    x, t, text = unet_inputs()
    with torch.no_grad():
        unet(x, t, text, cross_attention_kwargs={"user_tokens": torch.zeros(1, 4, 32), "user_scale": 2.0})
    assert "not expected" not in capfd.readouterr().err


def test_token_batch_is_checked_and_broadcast():
    unet = tiny_unet()
    proj = attach_user_branch(unet, SPEC)
    randomize_branch(unet)
    x, t, text = unet_inputs()
    u = proj(torch.randn(1, 2, 16)).detach()
    with torch.no_grad():
        one = unet(x, t, text, cross_attention_kwargs={"user_tokens": u}).sample
        two = unet(x, t, text, cross_attention_kwargs={"user_tokens": u.expand(2, -1, -1)}).sample
        torch.testing.assert_close(one, two)
        with pytest.raises(ValueError, match="user_tokens must have shape"):
            unet(x, t, text, cross_attention_kwargs={"user_tokens": torch.zeros(3, 4, 32)})


def test_prediction_mixture_is_the_weighted_sum_of_predictions():
    unet = tiny_unet()
    attach_user_branch(unet, SPEC)
    randomize_branch(unet)
    x, t, text = unet_inputs()
    g = torch.Generator().manual_seed(5)
    ua, ub = torch.randn((1, 4, 32), generator=g), torch.randn((1, 4, 32), generator=g)
    with torch.no_grad():
        ea = unet(x, t, text, cross_attention_kwargs={"user_tokens": ua}).sample
        eb = unet(x, t, text, cross_attention_kwargs={"user_tokens": ub}).sample
        base = unet(x, t, text).sample
        with prediction_mixture(unet, [(0.3, ua), (0.7, ub)]):
            mixed = unet(x, t, text).sample
            mixed_tuple = unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
        with prediction_mixture(unet, [(1.0, None)]):
            none = unet(x, t, text, cross_attention_kwargs={"user_tokens": ua}).sample  # the mixture decides
    torch.testing.assert_close(mixed, 0.3 * ea + 0.7 * eb)
    torch.testing.assert_close(mixed_tuple, mixed)
    assert torch.equal(none, base)
    assert "forward" not in unet.__dict__  # restored
