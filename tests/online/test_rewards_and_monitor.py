"""In-process rewards (diffalign.online.rewards) and the reward-hacking monitor (diffalign.online.monitor).

- Rewards: the weighted total equals Σ w·r of each scorer called directly (the toy oracle on rendered
  toy-world images, plus a tiny random aesthetic scorer saved in the official format); chunking does not
  change scores; parsing errors are one line.
- Artefact statistics move the right way on constructed images, with hand-checked values where simple.
- HackingMonitor flags a synthetic hacking run after ``patience`` checks (not before), not when both rise, not
  on noise within thresholds.
"""

import json

import numpy as np
import pytest
import torch

from diffalign.online import (
    HackingMonitor,
    Rewards,
    RewardSpec,
    artefact_record,
    artefact_stats,
    background_emptiness,
    grid_energy,
    high_frequency_energy,
    saturation,
)

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ rewards
@pytest.fixture(scope="module")
def toy_batch():
    from PIL import Image

    from diffalign.toy.shapes import render_batch, sample_captions

    captions = sample_captions(5, seed=0)
    images, _ = render_batch(captions, seed=0)
    return [Image.fromarray(im) for im in images], captions


@pytest.fixture(scope="module")
def aesthetic_dir(tmp_path_factory):
    from fixtures.tiny_scorers import save_tiny_aesthetic

    return save_tiny_aesthetic(tmp_path_factory.mktemp("tiny_aesthetic"))


def test_weighted_total_is_the_sum_of_weighted_scorers(toy_batch, aesthetic_dir):
    from diffalign.evaluators import load

    images, captions = toy_batch
    rewards = Rewards("toy:0.5, aesthetic:-2", weights={"aesthetic": str(aesthetic_dir)}, chunk_size=2)
    assert rewards.names == ["toy", "aesthetic"] and rewards.weights == {"toy": 0.5, "aesthetic": -2.0}
    total, per = rewards(images, captions)
    toy = load("toy").score(images, captions)
    aes = load("aesthetic", weights=str(aesthetic_dir)).score(images, captions)
    assert total.shape == (5,) and total.dtype == torch.float32 and not total.requires_grad
    assert list(per) == ["toy", "aesthetic"]
    torch.testing.assert_close(per["toy"], toy)
    torch.testing.assert_close(per["aesthetic"], aes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, 0.5 * toy - 2.0 * aes, rtol=1e-5, atol=1e-5)
    assert aes.std() > 0  # the tiny scorer is not constant, so the check has teeth
    # one chunk gives the same, and a uint8 array (N, H, W, 3) is accepted
    arr = np.stack([np.asarray(im) for im in images])
    total_1, _ = Rewards("toy:0.5,aesthetic:-2", weights={"aesthetic": str(aesthetic_dir)}, chunk_size=None)(
        arr, captions)
    torch.testing.assert_close(total_1, total, rtol=1e-5, atol=1e-5)
    rec = rewards.record(total, per)
    assert rec["reward"] == pytest.approx(float(total.mean())) and set(rec) == {
        "reward", "reward/toy", "reward/aesthetic"}


def test_toy_oracle_reward_matches_the_oracle(toy_batch):
    from diffalign.toy.oracle import oracle_reward

    images, captions = toy_batch
    total, per = Rewards({"toy": 1.0})(images, captions)
    np.testing.assert_allclose(total.numpy(), oracle_reward(images, captions), rtol=1e-6)
    # a zero weight is scored and reported but does not enter the total
    total0, per0 = Rewards({"toy": 0.0})(images, captions)
    assert torch.all(total0 == 0) and torch.equal(per0["toy"], per["toy"])
    # load options pass through the dict form
    total_t, _ = Rewards({"toy": {"weight": 2.0, "taste_weight": 0.0}})(images, captions)
    np.testing.assert_allclose(total_t.numpy(), 2 * oracle_reward(images, captions, taste_weight=0.0), rtol=1e-6)


def test_spec_parsing():
    spec = RewardSpec.parse("pickscore:1.0,toy:0.5")
    assert spec.weights == {"pickscore": 1.0, "toy": 0.5} and str(spec) == "pickscore:1,toy:0.5"
    assert RewardSpec.parse("hpsv2.1").weights == {"hpsv2.1": 1.0}
    spec = RewardSpec.parse({"clip": {"weight": 0.2, "weights": "/x/clip"}, "toy": 1}, weights={"toy": None})
    assert spec.terms[0].weights == "/x/clip" and spec.terms[0].weight == 0.2
    assert RewardSpec.parse("clip", weights={"clip": "/y"}).terms[0].weights == "/y"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "empty"),
        ({}, "empty"),
        ("pickscor:1", "unknown reward scorer 'pickscor'"),
        ("toy:abc", "weight must be a number"),
        ({"toy": "x"}, "weight must be a number"),
        ({"toy": None}, "weight must be a number"),
        ("toy:nan", "finite"),
        ("toy:1,toy:2", "twice"),
        ("toy:1,,clip", "empty item"),
    ],
)
def test_spec_errors_are_one_line(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        RewardSpec.parse(spec)
    assert "\n" not in str(info.value)


def test_weights_for_a_scorer_not_in_the_spec():
    with pytest.raises(ValueError, match="not in the reward spec") as info:
        RewardSpec.parse("toy", weights={"clip": "/x"})
    assert "\n" not in str(info.value)


def test_importing_online_does_not_load_evaluators():
    import subprocess
    import sys

    code = "import sys, diffalign.online; print(sorted(m for m in sys.modules if m.startswith(" \
           "('diffalign.evaluators', 'diffalign.training', 'transformers', 'open_clip'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------- artefact statistics
def _solid(rgb, size=64):
    return np.full((1, size, size, 3), rgb, dtype=np.uint8)


def test_saturation_hand_values():
    from PIL import Image

    assert saturation(_solid((255, 0, 0)))[0] == pytest.approx(1.0)
    assert saturation(_solid((128, 128, 128)))[0] == pytest.approx(0.0)
    assert saturation(_solid((0, 0, 0)))[0] == pytest.approx(0.0)
    assert saturation(_solid((200, 100, 50)))[0] == pytest.approx(150 / 200)
    half = np.concatenate([_solid((255, 0, 0), 8)[:, :4], _solid((90, 90, 90), 8)[:, 4:]], axis=1)
    assert saturation(half)[0] == pytest.approx(0.5)
    # PIL list and float input agree with uint8
    pil = [Image.new("RGB", (8, 8), (200, 100, 50))]
    assert saturation(pil)[0] == pytest.approx(0.75)
    assert saturation(_solid((200, 100, 50)).astype(np.float32) / 255)[0] == pytest.approx(0.75)


def _ramp(size=64):
    x = np.linspace(0, 255, size)
    return np.broadcast_to(x[None, :, None], (size, size, 3)).round().astype(np.uint8)[None]


def test_high_frequency_energy():
    noise = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3)).astype(np.uint8)
    hf_noise = high_frequency_energy(noise, cutoff=0.25)
    # white noise: the share of the [0, 1/2)² frequency square outside the quarter disc of radius 1/4
    np.testing.assert_allclose(hf_noise, 1 - np.pi * 0.25**2, atol=0.03)
    assert high_frequency_energy(_ramp())[0] < 1e-3
    assert high_frequency_energy(_solid((10, 20, 30)))[0] == 0.0
    # a checkerboard (the highest frequency) is all high-frequency
    yy, xx = np.mgrid[:32, :32]
    checker = (((xx + yy) % 2) * 255).astype(np.uint8)[None, ..., None].repeat(3, -1)
    assert high_frequency_energy(checker)[0] == pytest.approx(1.0, abs=1e-3)


def _smooth(size=64, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    g = gaussian_filter(rng.normal(size=(size, size)), 4)
    return 128 + 40 * g / g.std()


@pytest.mark.parametrize("period", [8, 16])
def test_grid_energy_detects_a_lattice(period):
    yy, xx = np.mgrid[:64, :64]
    smooth = _smooth()
    lattice = 3.0 * ((xx % period == 0) | (yy % period == 0))
    to_u8 = lambda a: np.clip(a, 0, 255).round().astype(np.uint8)[None, ..., None].repeat(3, -1)
    without = grid_energy(to_u8(smooth), period)[0]
    with_ = grid_energy(to_u8(smooth + lattice), period)[0]
    assert without < 3 and with_ > 5 * without
    noise = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    g = grid_energy(noise, period)  # flat spectrum: ≈ 1 (a mean of noisy power ratios, biased a little up)
    assert np.all((g > 0.8) & (g < 1.6))
    with pytest.raises(ValueError, match="at least"):
        grid_energy(noise[:, :31, :31], 8)


def test_background_emptiness():
    flat = _solid((40, 70, 220))
    flat[:, 28:36, 28:36] = (220, 40, 40)
    # an 8x8 object: of the 60x60 5x5-window positions, the 12x12 that overlap it are not flat, except the 4x4
    # inside it
    assert background_emptiness(flat)[0] == pytest.approx(1 - (12 * 12 - 4 * 4) / 60**2)
    assert background_emptiness(_solid((3, 3, 3)))[0] == 1.0
    noise = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3)).astype(np.uint8)
    textured = np.clip(_smooth(), 0, 255).round().astype(np.uint8)[None, ..., None].repeat(3, -1)
    assert background_emptiness(noise)[0] == 0.0
    assert background_emptiness(textured)[0] < 0.1


def test_artefact_stats_on_toy_images():
    from diffalign.toy.shapes import render_batch, sample_captions

    images, _ = render_batch(sample_captions(3, seed=1), seed=1)  # (3, 32, 32, 3)
    stats = artefact_stats(images)
    assert list(stats) == ["saturation", "high_freq", "grid", "emptiness"]
    assert all(v.shape == (3,) for v in stats.values())
    assert set(artefact_record(images, period=16)) == {"artefact/saturation", "artefact/high_freq",
                                                       "artefact/emptiness"}  # 32 px < 4 * 16: no grid


# ------------------------------------------------------------------------------------------------- monitor
def _run(monitor, reward, held, name="heldout"):
    return [monitor.update({"reward": r, name: h, "other": 0.0}) for r, h in zip(reward, held)]


def test_monitor_flags_hacking_after_patience_checks():
    window, patience, steps = 5, 3, 30
    t = np.arange(steps, dtype=float)
    reward, held = 0.1 * t, 10.0 - 0.1 * t  # both move 0.5 per window
    m = HackingMonitor("reward", ["heldout"], window=window, patience=patience, min_rise=0.2, min_fall=0.2,
                       action="checkpoint")
    verdicts = _run(m, reward, held)
    first_check = 2 * window - 1  # index of the record with 2·window values
    flagged = [i for i, v in enumerate(verdicts) if v.flagged]
    assert flagged[0] == first_check + patience - 1
    assert all(v.flagged for v in verdicts[flagged[0]:])
    assert not any(v.flagged for v in verdicts[:flagged[0]])
    v = verdicts[flagged[0]]
    assert v.first and v.action == "checkpoint" and "heldout fell" in v.reason and "\n" not in v.reason
    assert v.deltas["reward"] == pytest.approx(0.5) and v.deltas["heldout"] == pytest.approx(-0.5)
    assert not verdicts[flagged[0] + 1].first and len(m.history) == 1
    assert m.flagged and m.means()["reward"] == pytest.approx(reward[-window:].mean())


def test_monitor_artefact_direction_and_start_reference():
    t = np.arange(30, dtype=float)
    # saturation rising is bad by default (artefact name, also under a prefix)
    m = HackingMonitor("reward", ["artefact/saturation"], window=5, patience=2, min_rise=0.1, min_fall=0.05,
                       action="stop")
    verdicts = _run(m, 0.1 * t, 0.3 + 0.02 * t, name="artefact/saturation")
    assert verdicts[-1].flagged and verdicts[-1].action == "stop" and "rose" in verdicts[-1].reason
    # a scorer named ":up" is bad when it rises; reference="start" measures drift since the first window
    m = HackingMonitor("reward", ["heldout:up"], window=5, patience=1, min_rise=0.1, min_fall=1.0,
                       reference="start")
    verdicts = _run(m, 0.1 * t, 0.1 * t)
    assert not verdicts[9].flagged and verdicts[-1].flagged  # drift 0.5 at the first check, 2.0 at the end


def test_monitor_does_not_flag_when_both_rise_or_on_noise():
    t = np.arange(60, dtype=float)
    m = HackingMonitor("reward", {"heldout": "down"}, window=5, patience=2, min_rise=0.2, min_fall=0.2)
    assert not any(v.flagged for v in _run(m, 0.1 * t, 5 + 0.05 * t))
    rng = np.random.default_rng(0)
    m = HackingMonitor("reward", ["heldout"], window=10, patience=3, min_rise=0.5, min_fall=0.5)
    verdicts = _run(m, 0.02 * t + rng.normal(0, 0.1, 60), 5 + rng.normal(0, 0.1, 60))
    assert not any(v.flagged for v in verdicts) and verdicts[-1].deltas  # checks ran
    # the held-out falls, but the reward is flat: not hacking
    m = HackingMonitor("reward", ["heldout"], window=5, patience=1, min_rise=0.2, min_fall=0.2)
    assert not any(v.flagged for v in _run(m, np.zeros(30), 10 - 0.1 * t[:30]))


def test_monitor_stderr_units_ignore_noise_and_catch_a_shift():
    """units="stderr": Δ / sqrt((var_now + var_ref) / window), worked by hand; noisy stationary held-out metrics
    (which flag in absolute units with min_fall 0) stay quiet, a real fall of a few noise widths flags."""
    m = HackingMonitor("reward", ["heldout"], window=2, patience=1, min_rise=0.0, min_fall=0.0, units="stderr",
                       reference="start")
    v = _run(m, [0.0, 2.0, 3.0, 5.0], [1.0, 1.0, 0.0, 0.0])[-1]
    # reward: ref [0, 2] (mean 1, var 1), now [3, 5] (mean 4, var 1): Δ = 3 / sqrt((1 + 1) / 2) = 3
    assert v.deltas["reward"] == pytest.approx(3.0)
    assert v.deltas["heldout"] == pytest.approx(-1.0 / 1e-12, rel=1e-6)  # zero variance: eps only
    rng = np.random.default_rng(1)
    t = np.arange(80, dtype=float)
    reward = 0.01 * t + rng.normal(0, 0.1, 80)
    noisy = 0.6 + rng.normal(0, 0.08, 80)
    loose = HackingMonitor("reward", ["heldout"], window=10, patience=3, reference="start")
    strict = HackingMonitor("reward", ["heldout"], window=10, patience=3, min_rise=2, min_fall=2, units="stderr",
                            reference="start")
    assert any(v.flagged for v in _run(loose, reward, noisy))
    assert not any(v.flagged for v in _run(strict, reward, noisy))
    strict = HackingMonitor("reward", ["heldout"], window=10, patience=3, min_rise=2, min_fall=2, units="stderr",
                            reference="start")
    falling = noisy - 0.004 * t  # falls 0.32 over the run, 4 noise widths
    assert any(v.flagged for v in _run(strict, reward, falling))


def test_monitor_state_round_trip():
    t = np.arange(25, dtype=float)
    a = HackingMonitor("reward", ["heldout"], window=5, patience=2, min_rise=0.2, min_fall=0.2)
    _run(a, 0.1 * t[:15], 10 - 0.1 * t[:15])
    b = HackingMonitor("reward", ["heldout"], window=5, patience=2, min_rise=0.2, min_fall=0.2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    rest_a, rest_b = _run(a, 0.1 * t[15:], 10 - 0.1 * t[15:]), _run(b, 0.1 * t[15:], 10 - 0.1 * t[15:])
    assert [(v.flagged, v.reason, v.deltas) for v in rest_a] == [(v.flagged, v.reason, v.deltas) for v in rest_b]
    assert a.state_dict() == b.state_dict() and a.history


def test_monitor_patience_resets_and_missing_values():
    m = HackingMonitor("reward", ["heldout"], window=2, patience=2, min_rise=0.5, min_fall=0.5)
    # hacking, a flat stretch, hacking again: the streak resets to 0 and restarts
    reward = [0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4]
    held = [9, 9, 8, 8, 7, 7, 7, 7, 7, 7, 6, 6]
    streaks = [v.streaks.get("heldout", 0) for v in _run(m, reward, held)]
    assert streaks == [0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 1, 2]
    # a record without the held-out metric (scored every k steps) or NaN is skipped
    m = HackingMonitor("reward", ["heldout"], window=2, patience=1)
    m.update({"reward": 0.0})
    m.update({"reward": float("nan"), "heldout": 1.0})
    assert m._counts == {"reward": 1, "heldout": 1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"held_out": []}, "empty"),
        ({"held_out": ["x"], "action": "halt"}, "action"),
        ({"held_out": {"x": "sideways"}}, "direction"),
        ({"held_out": ["reward"]}, "training metric"),
        ({"held_out": ["x"], "window": 0}, "window"),
    ],
)
def test_monitor_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HackingMonitor("reward", **kwargs)


def test_to_pil_images_layouts():
    from diffalign.online import to_pil_images

    x = torch.zeros(2, 3, 4, 5)
    x[:, 0] = 1.0  # red, (N, 3, H, W) float in [0, 1]
    ims = to_pil_images(x)
    assert len(ims) == 2 and ims[0].size == (5, 4) and ims[0].getpixel((0, 0)) == (255, 0, 0)
    assert to_pil_images(np.zeros((1, 4, 5, 3), np.uint8))[0].getpixel((1, 1)) == (0, 0, 0)
