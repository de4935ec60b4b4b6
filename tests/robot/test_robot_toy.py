"""Detour2D: geometry, oracle soundness, renderings and point clouds."""

import numpy as np
import pytest

from diffalign.robot import toy


@pytest.fixture(scope="module")
def episodes():
    rng = np.random.default_rng(0)
    obs = toy.sample_observations(600, rng)
    waypoints, mode = toy.demonstrations(obs, rng)
    return obs, waypoints, mode


def test_demonstration_modes(episodes):
    obs, waypoints, mode = episodes
    o = toy.oracle(obs, waypoints)
    straight = mode == 2
    assert o["violation"][straight].mean() == 1.0  # |d| <= r/2 puts the puddle on the segment
    assert o["violation"][~straight].mean() == 0.0
    assert np.all(np.abs(o["goal_err"]) < 1e-6)
    assert 0.25 < straight.mean() < 0.42
    sides = toy.side_of_puddle(obs, waypoints)
    assert (sides[mode == 0] > 0).all() and (sides[mode == 1] < 0).all()


def test_oracle_ranks_every_clean_arc_above_the_straight_line():
    rng = np.random.default_rng(1)
    obs = toy.sample_observations(400, rng)
    up, _ = toy.demonstrations(obs, rng, mode_probs=(1, 0, 0))
    down, _ = toy.demonstrations(obs, rng, mode_probs=(0, 1, 0))
    line, _ = toy.demonstrations(obs, rng, mode_probs=(0, 0, 1), noise=0.0)
    r_line = toy.oracle(obs, line)["reward"]
    assert (toy.oracle(obs, up)["reward"] > r_line).all()
    assert (toy.oracle(obs, down)["reward"] > r_line).all()


def test_actions_round_trip(episodes):
    obs, waypoints, _ = episodes
    actions = toy.waypoints_to_actions(obs, waypoints)
    assert actions.shape == waypoints.shape and actions.dtype == np.float32
    assert np.allclose(toy.actions_to_waypoints(obs, actions), waypoints, atol=1e-5)
    assert np.allclose(toy.actions_to_waypoints(obs, np.zeros_like(actions))[:, -1], obs[:, 2:4], atol=1e-6)


def test_rendered_frames_show_the_violation_in_magenta(episodes):
    obs, waypoints, mode = episodes
    rng = np.random.default_rng(2)
    idx = np.concatenate([np.flatnonzero(mode == 2)[:5], np.flatnonzero(mode == 0)[:5]])
    frames = toy.render_batch(obs[idx], waypoints[idx], toy.sample_distractors(len(idx), rng))
    assert frames.shape == (10, toy.DEFAULT_HORIZON, 3, 32, 32) and frames.dtype == np.float32
    assert frames.min() >= 0 and frames.max() <= 1
    magenta = (frames[:, :, 0] > 0.99) & (frames[:, :, 2] > 0.99) & (frames[:, :, 1] < 0.01)
    assert magenta[:5].any(axis=(1, 2, 3)).all()  # every straight demo crosses visibly
    assert not magenta[5:, -1].any()  # clean arcs, checked on the last frame (full trail)


def test_distractors_avoid_the_violation_colour():
    d = toy.sample_distractors(2000, np.random.default_rng(3))
    assert (np.linalg.norm(d[:, 3:6] - toy.MAGENTA, axis=1) >= 0.5).all()


def test_point_cloud(episodes):
    obs = episodes[0][:4]
    pc = toy.point_cloud(obs, np.random.default_rng(0))
    assert pc.shape == (4, 64, 3)
    rim = pc[:, :48, :2]
    dist = np.linalg.norm(rim - obs[:, None, 4:6], axis=-1)
    assert np.allclose(dist, obs[:, None, 6], atol=1e-5)
    assert set(np.unique(pc[..., 2])) == {0.0, 1.0, 2.0}
