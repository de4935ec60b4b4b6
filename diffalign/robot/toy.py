"""Detour2D: a procedural 2-D reaching task with a puddle, in numpy (no simulator, no pygame).

An episode is a start ``s``, a goal ``g`` and a circular puddle (centre ``c``, radius ``r``) that sits on the
segment from ``s`` to ``g``. The action is a chunk of ``H`` waypoints ``w_1 .. w_H`` (``w_0 = s`` is implied);
the trajectory is the polyline ``s -> w_1 -> ... -> w_H``.

Geometry (all in world units, the arena is [-1.2, 1.2]²):

==========  ====================================================================================
quantity    distribution
==========  ====================================================================================
``s``       x ~ U[-1, -0.6], y ~ U[-0.5, 0.5]
``g``       x ~ U[0.6, 1],   y ~ U[-0.5, 0.5]
``r``       U[0.25, 0.3]
``c``       ``s + u (g - s) + d n`` with u ~ U[0.3, 0.7] (middle 40 %), d ~ U[-r/2, r/2] and ``n`` the
            unit normal of ``g - s`` (rotated +90°). ``|d| <= r/2`` guarantees the straight line crosses.
==========  ====================================================================================

**Actions.** The policy does not output world waypoints but offsets from the straight-line reference in the
start→goal frame: ``a_k = [(w_k - p_k)·t̂, (w_k - p_k)·n̂]`` with ``p_k = s + (k/H)(g - s)``, ``t̂`` the unit vector
from s to g and ``n̂`` its normal (:func:`actions_to_waypoints`, :func:`waypoints_to_actions`). The straight line
is ``a = 0`` and an arc is a lateral bump, which a small CPU denoiser learns in seconds.

Demonstrations are an equal mixture of three modes: an arc on the ``+n`` side ("up"), an arc on the ``-n`` side
("down") and the straight line through the puddle. Imitation therefore reproduces about a third of violations.

**Oracle** (hidden from the learner). With ``crosses`` = the dense polyline enters the disk, ``depth`` = how far
it gets in (``(r - min distance) / r`` in [0, 1]), ``goal_err = ||w_H - g||`` and ``excess = length / ||g - s|| - 1``:

.. math::  R = -λ_{in}\\,\\mathbb{1}[\\text{crosses}]\\,(1 + \\text{depth}) - λ_g\\, \\text{goal\\_err} - λ_{len}\\, \\text{excess}

with λ_in = 1.5, λ_g = 2, λ_len = 0.5. A demonstrated arc's excess length is below 0.8 (penalty < 0.4 < 1.5), so every clean
arc outranks the straight line (tested). ``success`` = not crossing and ``goal_err < 0.1``.

**Pixels** (the RAPL variant): :func:`render_frames` draws one 32x32 RGB frame per waypoint: the puddle (blue),
the goal (green), the trail travelled so far (red; where it lies over the puddle it is magenta, red + blue), the
agent (white dot) and a **distractor**: a disk of random colour (not near magenta), size and place that is fixed
along a trajectory and carries no information about the reward. Frames are float32 in [0, 1], (T, 3, 32, 32).

**Point clouds**: :func:`point_cloud` gives (P, 3) points: 48 on the puddle rim, 8 around the start and 8 around
the goal, with a type channel (0 puddle, 1 start, 2 goal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OBS_DIM = 7  # s (2), g (2), c (2), r (1)
ACTION_DIM = 2
DEFAULT_HORIZON = 8
MODES = ("up", "down", "straight")
ARENA = 1.2  # world coordinates span [-ARENA, ARENA]
IMAGE_SIZE = 32

LAMBDA_IN = 1.5
LAMBDA_GOAL = 2.0
LAMBDA_LEN = 0.5
SUCCESS_GOAL_ERR = 0.1
ARC_MARGIN = 0.06  # clearance a demonstrated arc keeps from the puddle rim
_DENSE = 12  # points per polyline segment for crossing checks


@dataclass
class Detour2DBatch:
    """A batch of B episodes. ``obs`` (B, 7) float32: ``[s_x, s_y, g_x, g_y, c_x, c_y, r]``."""

    obs: np.ndarray

    @property
    def start(self) -> np.ndarray:
        return self.obs[:, 0:2]

    @property
    def goal(self) -> np.ndarray:
        return self.obs[:, 2:4]

    @property
    def centre(self) -> np.ndarray:
        return self.obs[:, 4:6]

    @property
    def radius(self) -> np.ndarray:
        return self.obs[:, 6]

    def __len__(self) -> int:
        return self.obs.shape[0]


def sample_observations(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 7) float32 episodes drawn from the distributions in the module docstring."""
    s = np.stack([rng.uniform(-1.0, -0.6, n), rng.uniform(-0.5, 0.5, n)], axis=1)
    g = np.stack([rng.uniform(0.6, 1.0, n), rng.uniform(-0.5, 0.5, n)], axis=1)
    r = rng.uniform(0.25, 0.3, n)
    u = rng.uniform(0.3, 0.7, n)
    d = rng.uniform(-0.5, 0.5, n) * r
    n_hat = _normal(g - s)
    c = s + u[:, None] * (g - s) + d[:, None] * n_hat
    return np.concatenate([s, g, c, r[:, None]], axis=1).astype(np.float32)


def _normal(v: np.ndarray) -> np.ndarray:
    """Unit normal of each row of ``v`` (B, 2), rotated +90°."""
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return np.stack([-v[:, 1], v[:, 0]], axis=1)


def _frame(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The start→goal frame of each episode: start (B, 2), unit direction t̂ (B, 2) and its normal n̂ (B, 2)."""
    v = obs[:, 2:4] - obs[:, 0:2]
    t_hat = v / np.linalg.norm(v, axis=1, keepdims=True)
    return obs[:, 0:2], t_hat, _normal(v)


def _reference_points(obs: np.ndarray, horizon: int) -> np.ndarray:
    """``p_k = s + (k/H)(g - s)``, k = 1..H: (B, H, 2)."""
    u = np.arange(1, horizon + 1, dtype=np.float64) / horizon
    return obs[:, None, 0:2] + u[None, :, None] * (obs[:, None, 2:4] - obs[:, None, 0:2])


def waypoints_to_actions(obs: np.ndarray, waypoints: np.ndarray) -> np.ndarray:
    """World waypoints (B, H, 2) -> path-frame actions (B, H, 2) ``[along, lateral]``, float32."""
    obs = np.asarray(obs, dtype=np.float64)
    _, t_hat, n_hat = _frame(obs)
    rel = np.asarray(waypoints, dtype=np.float64) - _reference_points(obs, waypoints.shape[1])
    along = np.einsum("bhd,bd->bh", rel, t_hat)
    lateral = np.einsum("bhd,bd->bh", rel, n_hat)
    return np.stack([along, lateral], axis=-1).astype(np.float32)


def actions_to_waypoints(obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Path-frame actions (B, H, 2) -> world waypoints (B, H, 2), float64. Inverse of :func:`waypoints_to_actions`."""
    obs = np.asarray(obs, dtype=np.float64)
    actions = np.asarray(actions, dtype=np.float64)
    _, t_hat, n_hat = _frame(obs)
    ref = _reference_points(obs, actions.shape[1])
    return ref + actions[..., 0:1] * t_hat[:, None] + actions[..., 1:2] * n_hat[:, None]


def _polyline(obs: np.ndarray, waypoints: np.ndarray) -> np.ndarray:
    """(B, H+1, 2): the start followed by the waypoints."""
    return np.concatenate([obs[:, None, 0:2], waypoints], axis=1)


def _dense(poly: np.ndarray) -> np.ndarray:
    """Resample each segment of (B, K, 2) at ``_DENSE`` points: (B, (K-1)·_DENSE + 1, 2)."""
    a, b = poly[:, :-1], poly[:, 1:]  # (B, K-1, 2)
    f = np.linspace(0.0, 1.0, _DENSE, endpoint=False)[None, None, :, None]  # (1, 1, D, 1)
    pts = a[:, :, None] + f * (b - a)[:, :, None]  # (B, K-1, D, 2)
    pts = pts.reshape(poly.shape[0], -1, 2)
    return np.concatenate([pts, poly[:, -1:]], axis=1)


def min_puddle_distance(obs: np.ndarray, waypoints: np.ndarray) -> np.ndarray:
    """(B,) smallest distance from the dense polyline to the puddle centre."""
    pts = _dense(_polyline(obs, waypoints))
    return np.linalg.norm(pts - obs[:, None, 4:6], axis=-1).min(axis=1)


def _arc_waypoints(obs: np.ndarray, side: np.ndarray, amplitude: np.ndarray, horizon: int) -> np.ndarray:
    """Waypoints ``s + u (g - s) + side · A sin(π u)^0.6 n`` at u = k/H, k = 1..H. (B,), (B,) -> (B, H, 2).

    The exponent 0.6 flattens the bump so that an arc clears the puddle without leaving the arena.
    """
    s, g = obs[:, 0:2], obs[:, 2:4]
    u = np.arange(1, horizon + 1, dtype=np.float64) / horizon  # (H,)
    profile = np.clip(np.sin(np.pi * u), 0.0, None) ** 0.6
    lateral = (side * amplitude)[:, None] * profile[None]  # (B, H)
    return s[:, None] + u[None, :, None] * (g - s)[:, None] + lateral[..., None] * _normal(g - s)[:, None]


def _clearing_amplitude(obs: np.ndarray, side: np.ndarray, horizon: int) -> np.ndarray:
    """Smallest amplitude on a 0.01 grid whose arc keeps ``ARC_MARGIN`` from the rim. (B,)."""
    grid = np.arange(0.0, 2.0, 0.01)
    out = np.full(obs.shape[0], grid[-1])
    found = np.zeros(obs.shape[0], dtype=bool)
    for a in grid:  # 200 vectorised steps; cheap next to training
        todo = ~found
        if not todo.any():
            break
        wp = _arc_waypoints(obs[todo], side[todo], np.full(todo.sum(), a), horizon)
        ok = min_puddle_distance(obs[todo], wp) >= obs[todo, 6] + ARC_MARGIN
        idx = np.flatnonzero(todo)[ok]
        out[idx] = a
        found[idx] = True
    return out


def demonstrations(
    obs: np.ndarray,
    rng: np.random.Generator,
    *,
    horizon: int = DEFAULT_HORIZON,
    mode_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
    noise: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """Demonstrated waypoints (B, H, 2) float32 and their mode index (B,) into :data:`MODES`.

    Arcs use the smallest clearing amplitude times U[1, 1.25]; every demo gets N(0, noise²) jitter on the
    waypoints except the last, which is the goal exactly.
    """
    b = obs.shape[0]
    mode = rng.choice(3, size=b, p=np.asarray(mode_probs) / np.sum(mode_probs))
    side = np.where(mode == 0, 1.0, -1.0)
    amp = _clearing_amplitude(obs.astype(np.float64), side, horizon) * rng.uniform(1.0, 1.25, b)
    amp = np.where(mode == 2, 0.0, amp)
    wp = _arc_waypoints(obs.astype(np.float64), side, amp, horizon)
    jitter = rng.normal(0.0, noise, wp.shape)
    jitter[:, -1] = 0.0
    return (wp + jitter).astype(np.float32), mode


def oracle(obs: np.ndarray, waypoints: np.ndarray) -> dict[str, np.ndarray]:
    """Hidden reward and its parts, each (B,): ``reward``, ``violation`` (0/1), ``depth``, ``goal_err``,
    ``excess``, ``success`` (0/1). ``waypoints`` (B, H, 2)."""
    obs = np.asarray(obs, dtype=np.float64)
    waypoints = np.asarray(waypoints, dtype=np.float64)
    r = obs[:, 6]
    dist = min_puddle_distance(obs, waypoints)
    crosses = dist < r
    depth = np.where(crosses, (r - dist) / r, 0.0)
    goal_err = np.linalg.norm(waypoints[:, -1] - obs[:, 2:4], axis=1)
    poly = _polyline(obs, waypoints)
    length = np.linalg.norm(np.diff(poly, axis=1), axis=-1).sum(axis=1)
    excess = length / np.linalg.norm(obs[:, 2:4] - obs[:, 0:2], axis=1) - 1.0
    reward = -LAMBDA_IN * crosses * (1.0 + depth) - LAMBDA_GOAL * goal_err - LAMBDA_LEN * excess
    return {
        "reward": reward,
        "violation": crosses.astype(np.float64),
        "depth": depth,
        "goal_err": goal_err,
        "excess": excess,
        "success": (~crosses & (goal_err < SUCCESS_GOAL_ERR)).astype(np.float64),
    }


def side_of_puddle(obs: np.ndarray, waypoints: np.ndarray) -> np.ndarray:
    """(B,) +1 if the waypoint nearest the puddle is on the ``+n`` side of the centre, else -1 (mode read-out)."""
    obs = np.asarray(obs, dtype=np.float64)
    n_hat = _normal(obs[:, 2:4] - obs[:, 0:2])
    rel = np.asarray(waypoints, dtype=np.float64) - obs[:, None, 4:6]
    k = np.linalg.norm(rel, axis=-1).argmin(axis=1)
    return np.sign(np.einsum("bd,bd->b", rel[np.arange(len(k)), k], n_hat))


# ---------------------------------------------------------------------------------------------------------------
# Point clouds
# ---------------------------------------------------------------------------------------------------------------


def point_cloud(obs: np.ndarray, rng: np.random.Generator, *, n_rim: int = 48, n_marker: int = 8) -> np.ndarray:
    """(B, n_rim + 2 n_marker, 3) float32 points ``[x, y, type]``: puddle rim (type 0), start (1), goal (2).

    Rim points sit at random angles exactly on the circle; marker points are N(0, 0.02²) around s and g.
    """
    b = obs.shape[0]
    theta = rng.uniform(0.0, 2 * np.pi, (b, n_rim))
    rim = obs[:, None, 4:6] + obs[:, None, 6:7] * np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    start = obs[:, None, 0:2] + rng.normal(0.0, 0.02, (b, n_marker, 2))
    goal = obs[:, None, 2:4] + rng.normal(0.0, 0.02, (b, n_marker, 2))
    xy = np.concatenate([rim, start, goal], axis=1)
    kind = np.concatenate([np.zeros(n_rim), np.ones(n_marker), np.full(n_marker, 2.0)])
    return np.concatenate([xy, np.broadcast_to(kind[None, :, None], (b, xy.shape[1], 1))], axis=-1).astype(
        np.float32
    )


# ---------------------------------------------------------------------------------------------------------------
# Pixels (Detour2D-Pixels)
# ---------------------------------------------------------------------------------------------------------------


def _pixel_centres() -> np.ndarray:
    """(S, S, 2) world coordinates of pixel centres; row 0 is the top (y = +ARENA)."""
    lin = (np.arange(IMAGE_SIZE) + 0.5) / IMAGE_SIZE * 2 * ARENA - ARENA
    xs, ys = np.meshgrid(lin, lin[::-1])
    return np.stack([xs, ys], axis=-1)


_PIX = _pixel_centres()
RED, GREEN, BLUE, WHITE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0)
MAGENTA = np.array([1.0, 0.0, 1.0])  # trail over the puddle: red + blue
TRAIL_HALF_WIDTH = 0.75  # px
_PIX_SIZE = 2 * ARENA / IMAGE_SIZE


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points ``p`` (S, S, 2) to the segment a-b (2,)."""
    ab = b - a
    denom = max(float(ab @ ab), 1e-12)
    f = np.clip(((p - a) @ ab) / denom, 0.0, 1.0)
    return np.linalg.norm(p - (a + f[..., None] * ab), axis=-1)


def sample_distractors(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 6) distractor parameters ``[x, y, radius, R, G, B]``: anywhere in the arena, radius U[0.3, 0.6], a
    uniform random colour redrawn while it lies within 0.5 (RGB distance) of the violation colour magenta."""
    xy = rng.uniform(-1.0, 1.0, (n, 2))
    rad = rng.uniform(0.3, 0.6, (n, 1))
    rgb = rng.uniform(0.0, 1.0, (n, 3))
    bad = np.linalg.norm(rgb - MAGENTA, axis=1) < 0.5
    while bad.any():
        rgb[bad] = rng.uniform(0.0, 1.0, (int(bad.sum()), 3))
        bad = np.linalg.norm(rgb - MAGENTA, axis=1) < 0.5
    return np.concatenate([xy, rad, rgb], axis=1).astype(np.float32)


def render_frames(obs: np.ndarray, waypoints: np.ndarray, distractor: np.ndarray) -> np.ndarray:
    """One episode: ``obs`` (7,), ``waypoints`` (H, 2), ``distractor`` (6,) -> frames (H, 3, 32, 32) in [0, 1].

    Frame k shows the trail travelled so far, ``s -> w_1 -> ... -> w_k`` (red, magenta over the puddle), and the
    agent at ``w_k`` (white).
    """
    obs = np.asarray(obs, dtype=np.float64)
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3))
    d = np.asarray(distractor, dtype=np.float64)
    img[np.linalg.norm(_PIX - d[:2], axis=-1) <= d[2]] = d[3:6]
    puddle = np.linalg.norm(_PIX - obs[4:6], axis=-1) <= obs[6]
    img[puddle] = BLUE
    img[np.linalg.norm(_PIX - obs[2:4], axis=-1) <= 0.1] = GREEN
    pts = np.concatenate([obs[None, 0:2], np.asarray(waypoints, dtype=np.float64)], axis=0)
    frames = np.empty((len(pts) - 1, IMAGE_SIZE, IMAGE_SIZE, 3))
    trail = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for k in range(1, len(pts)):
        trail |= _segment_distance(_PIX, pts[k - 1], pts[k]) <= TRAIL_HALF_WIDTH * _PIX_SIZE
        f = img.copy()
        f[trail & ~puddle] = RED
        f[trail & puddle] = MAGENTA
        f[np.linalg.norm(_PIX - pts[k], axis=-1) <= 1.0 * _PIX_SIZE] = WHITE
        frames[k - 1] = f
    return frames.transpose(0, 3, 1, 2).astype(np.float32)


def render_batch(obs: np.ndarray, waypoints: np.ndarray, distractors: np.ndarray) -> np.ndarray:
    """(B, H, 3, 32, 32) frames for B episodes."""
    return np.stack([render_frames(o, w, d) for o, w, d in zip(obs, waypoints, distractors)])
