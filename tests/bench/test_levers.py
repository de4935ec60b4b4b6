"""The U-Net step levers of ``bench/jobs.py`` compute what the default step computes."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_fused_reference_gives_the_policy_and_adapters_off_outputs_and_the_same_lora_gradient(tmp_path):
    """One 4B call with the LoRA scaled to 0 on the reference half = a policy call (2B, with grad) + an
    adapters-disabled call (2B): same outputs, same LoRA gradients."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.jobs import _FusedPolicyReference, _ours, batch
    from bench.worlds import build_world
    from diffalign.data import collate_pairs
    from diffalign.models import AdapterDisabledReference, UNetDenoiser

    world = build_world("toy", tmp_path, num_pairs=8)
    tr = _ours(world, tmp_path, "levers", None, "cpu", True).trainer
    lora = [p for p in tr.unet.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in lora:  # LoRA B starts at zero: move it, so adapters on and off differ
            p.add_(0.05 * torch.randn_like(p))
    b = collate_pairs([tr.dataset[i] for i in batch(0, world.batch_pairs)])
    with torch.no_grad():
        x0, cond = tr.inputs(b)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=torch.Generator().manual_seed(0))
    x_t = x0 + torch.randn_like(x0)

    def run(policy, reference):
        for p in lora:
            p.grad = None
        out = policy(x_t, t, cond)
        with torch.no_grad():
            ref = reference(x_t, t, cond)
        (out.square().mean() + (out * ref).mean()).backward()
        return out.detach(), ref, [p.grad.clone() for p in lora]

    out_a, ref_a, grads_a = run(UNetDenoiser(tr.unet), AdapterDisabledReference(tr.unet))
    fused = _FusedPolicyReference(tr.unet)
    assert len(fused.lora_b) > 0
    out_b, ref_b, grads_b = run(fused.policy, fused.reference)
    assert (out_a - ref_a).abs().max() > 1e-3  # the adapters matter, so a wrong mask would show
    torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ref_b, ref_a, atol=1e-5, rtol=1e-4)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)


def test_flips_bench_measures_the_mirror_error_of_the_toy_vae(tmp_path):
    """``bench/flips.py``: the mirrored posterior is not the posterior of the mirrored image on the trained toy
    VAE (so the cache encodes the other flip), and a pair's encode time is measured."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import flips

    res = flips.main(["--worlds", "toy", "--pairs", "2", "--reps", "1", "--epochs", "0",
                      "--workdir", str(tmp_path), "--out", str(tmp_path / "flips.json")])
    (world,) = res["worlds"]
    err = world["mirror_error"]
    assert err["images"] == 4 and err["mean_rel_l2"] > 0.05 and err["std_rel_l2"] > 0
    assert world["vae_encode_pair_s"] > 0 and "epochs" not in world
