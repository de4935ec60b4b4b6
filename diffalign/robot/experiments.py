"""Detour2D experiments: imitation, oracle-labelled preferences, the DeformPAM and RAPL heads, and the report.

Every step is a function so the tests, the CLI and ``scripts/robot_toy.py`` share one implementation:

1. :func:`train_imitation`: behaviour cloning on multimodal demonstrations (up arc / down arc / straight through
   the puddle, 1/3 each), so imitation violates about a third of the time.
2. :func:`collect_ranked_pairs`: K candidates per state from the imitation policy, ranked by a simulated annotator
   that sees the hidden oracle, turned into pairs with DeformPAM's rule (:func:`ranking_to_comparisons`).
3. :func:`align_policy`: Diffusion-DPO on those pairs (:class:`DeformPAMHead`); :func:`ras_rows` evaluates
   reward-guided selection for several N on one fixed candidate pool (so N = 1 *is* the imitation policy).
4. :func:`rapl_triplets`, :func:`fit_rapl`, :func:`rapl_spearman`: RAPL on rendered rollouts with a distractor;
   :func:`rapl_ranked_pairs` turns RAPL rewards of policy rollouts into pairs for the same DPO head.

Sign-flipped labels (``flip=True``) are the negative control throughout.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from ..training.config import from_dict
from . import toy
from .configuration_deformpam import DeformPAMConfig
from .configuration_diffusion_policy import DiffusionPolicyConfig
from .configuration_rapl import RAPLConfig
from .data import PreferencePairs, ranking_to_comparisons, simulated_annotator
from .modeling_deformpam import DeformPAMHead, expected_max_of_n
from .modeling_diffusion_policy import DiffusionActionPolicy
from .modeling_rapl import RAPLHead

METRICS = ("reward", "violation", "success")


def _toy_policy_config() -> DiffusionPolicyConfig:
    return DiffusionPolicyConfig(hidden_dim=128, n_blocks=2, num_inference_steps=20)


def _toy_deformpam_config() -> DeformPAMConfig:
    return DeformPAMConfig(form="deformpam", beta=100.0, lr=1e-4, steps=300, batch_size=128, n_draws=32)


def _toy_rapl_config() -> RAPLConfig:
    # The toy study's settings (docs/robot.md was measured with them): Bradley-Terry, batch mean; the library
    # default is the RAPL code's 1 - p summed over the batch.
    return RAPLConfig(eps=0.1, sinkhorn_iters=50, epochs=20, lr=3e-3, loss_form="bt", reduction="mean")


@dataclass
class Detour2DConfig:
    seed: int = field(default=0, metadata={"help": "Seeds numpy and torch for every stage."})
    # Imitation.
    n_demos: int = field(default=2000, metadata={"help": "Demonstrations for behaviour cloning."})
    bc_steps: int = field(default=1500, metadata={"help": "Behaviour-cloning optimiser steps."})
    bc_lr: float = field(default=3e-3, metadata={"help": "AdamW lr (cosine decay) for behaviour cloning."})
    bc_batch_size: int = field(default=128)
    policy: DiffusionPolicyConfig = field(default_factory=_toy_policy_config)
    # DeformPAM preferences.
    n_pref_states: int = field(default=500, metadata={"help": "States with K ranked candidates each."})
    k_candidates: int = field(default=8, metadata={"help": "Candidates per state (DeformPAM: 8)."})
    n_comparisons: int = field(default=16, metadata={"help": "Comparisons per state (DeformPAM COMPARE_K: 16)."})
    annotator_gap: float = field(default=0.25, metadata={"help": "Simulated annotator stops ranking below this gap."})
    deformpam: DeformPAMConfig = field(default_factory=_toy_deformpam_config)
    # Evaluation.
    n_eval: int = field(default=256, metadata={"help": "Held-out states."})
    ras_ns: tuple[int, ...] = field(default=(1, 2, 4, 8, 16), metadata={"help": "N for best-of-N rows."})
    # RAPL.
    rapl: RAPLConfig = field(default_factory=_toy_rapl_config)
    n_triplets: int = field(default=150, metadata={"help": "Preference triplets (RAPL: 150)."})
    triplet_gap: float = field(default=0.5, metadata={"help": "Keep a triplet if best - worst oracle >= gap."})
    n_rho_eval: int = field(default=200, metadata={"help": "Held-out rollouts for Spearman ρ (RAPL Table 1)."})
    n_demos_per_scene: int = field(default=2, metadata={"help": "Expert demonstrations (clean arcs) per scene."})
    rapl_pref_states: int = field(default=300, metadata={"help": "States whose rollouts RAPL ranks for DPO."})
    rapl_rollouts: int = field(default=4, metadata={"help": "Rollouts per state ranked by the RAPL reward."})

    def __post_init__(self):
        # Nested sections given as dicts (from YAML) override the toy defaults field by field.
        for name, cls, defaults in (("policy", DiffusionPolicyConfig, _toy_policy_config),
                                    ("deformpam", DeformPAMConfig, _toy_deformpam_config),
                                    ("rapl", RAPLConfig, _toy_rapl_config)):
            value = getattr(self, name)
            if isinstance(value, dict):  # typed like `diffalign train` overrides: "1e-4" is a float here too
                setattr(self, name, from_dict(cls, {**asdict(defaults()), **value}, f"experiment.{name}"))
        self.ras_ns = tuple(self.ras_ns)
        if max(self.ras_ns) < 1:
            raise ValueError(f"ras_ns must hold positive N, got {self.ras_ns}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ras_ns"] = list(self.ras_ns)
        return d


# ---------------------------------------------------------------------------------------------------------------
# Imitation and evaluation
# ---------------------------------------------------------------------------------------------------------------


def demo_dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``obs`` (n, 7) and path-frame ``actions`` (n, H, 2) of the three-mode demonstrator."""
    rng = np.random.default_rng(seed)
    obs = toy.sample_observations(n, rng)
    waypoints, _ = toy.demonstrations(obs, rng)
    return obs, toy.waypoints_to_actions(obs, waypoints)


def train_imitation(cfg: Detour2DConfig, *, log_every: int = 0) -> DiffusionActionPolicy:
    """Behaviour cloning of the demonstrator (AdamW, cosine lr)."""
    torch.manual_seed(cfg.seed)
    obs, actions = demo_dataset(cfg.n_demos, cfg.seed)
    policy = DiffusionActionPolicy(cfg.policy)
    o, a = torch.from_numpy(obs), torch.from_numpy(actions)
    policy.fit_normalizer(a)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.bc_lr, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.bc_steps)
    g = torch.Generator().manual_seed(cfg.seed)
    policy.train()
    for step in range(cfg.bc_steps):
        idx = torch.randint(0, len(o), (cfg.bc_batch_size,), generator=g)
        loss = policy.compute_loss(o[idx], a[idx], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"bc step={step} loss={loss.item():.4f}", flush=True)
    return policy.eval()


def eval_observations(cfg: Detour2DConfig, n: int | None = None) -> np.ndarray:
    """Held-out states (a seed stream disjoint from training)."""
    return toy.sample_observations(n or cfg.n_eval, np.random.default_rng(10_000 + cfg.seed))


def oracle_of_actions(obs: np.ndarray, actions) -> dict[str, np.ndarray]:
    """Oracle terms for path-frame actions (B, H, 2) or (B, N, H, 2) (then each term is (B, N))."""
    actions = np.asarray(actions.detach().cpu() if isinstance(actions, torch.Tensor) else actions)
    if actions.ndim == 4:
        b, n = actions.shape[:2]
        flat = oracle_of_actions(np.repeat(obs, n, axis=0), actions.reshape(b * n, *actions.shape[2:]))
        return {k: v.reshape(b, n) for k, v in flat.items()}
    return toy.oracle(obs, toy.actions_to_waypoints(obs, actions))


def summarize(terms: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(terms[k])) for k in METRICS}


@torch.no_grad()
def evaluate_policy(policy: DiffusionActionPolicy, obs: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """Mean oracle metrics of one sample per state."""
    actions = policy.sample(torch.from_numpy(obs), generator=torch.Generator().manual_seed(seed))
    return summarize(oracle_of_actions(obs, actions))


# ---------------------------------------------------------------------------------------------------------------
# DeformPAM head
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_ranked_pairs(policy: DiffusionActionPolicy, cfg: Detour2DConfig) -> PreferencePairs:
    """On-policy stage-2 data: K candidates per state, oracle-ranked by the simulated annotator, DeformPAM pairs."""
    rng = np.random.default_rng(20_000 + cfg.seed)
    obs = toy.sample_observations(cfg.n_pref_states, rng)
    o = torch.from_numpy(obs)
    cands = policy.sample_candidates(o, cfg.k_candidates, generator=torch.Generator().manual_seed(20_000 + cfg.seed))
    rewards = oracle_of_actions(obs, cands)["reward"]  # (S, K)
    pairs, codes = zip(*(ranking_to_comparisons(*simulated_annotator(r, gap=cfg.annotator_gap), k=cfg.n_comparisons)
                         for r in rewards))
    return PreferencePairs.from_rankings(o, cands, np.stack(pairs), np.stack(codes))


def align_policy(bc_policy: DiffusionActionPolicy, pairs: PreferencePairs, cfg: Detour2DConfig, *,
                 flip: bool = False, log_every: int = 0) -> DeformPAMHead:
    """Diffusion-DPO on ``pairs`` (sign-flipped when ``flip``) starting from a copy of the imitation policy."""
    torch.manual_seed(cfg.seed)
    policy = copy.deepcopy(bc_policy)
    head = DeformPAMHead(policy, cfg.deformpam)
    head.fit(pairs.flipped() if flip else pairs, seed=cfg.seed, log_every=log_every)
    return head


@torch.no_grad()
def candidate_pool(reference: DiffusionActionPolicy, obs: np.ndarray, n: int, *, seed: int) -> torch.Tensor:
    """(B, n, H, Da) reference samples; the first column is the imitation policy's own sample."""
    return reference.sample_candidates(torch.from_numpy(obs), n, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def ras_rows(head: DeformPAMHead, obs: np.ndarray, pool: torch.Tensor, ns, *, seed: int = 0,
             pool_oracle: dict | None = None) -> dict[int, dict[str, float]]:
    """Reward-guided selection among the first N candidates of ``pool`` for each N (implicit reward of ``head``)."""
    terms = pool_oracle or oracle_of_actions(obs, pool)
    rewards = head.implicit_reward(torch.from_numpy(obs), pool, generator=torch.Generator().manual_seed(seed))
    out = {}
    rows = np.arange(len(obs))
    for n in ns:
        best = rewards[:, :n].argmax(dim=1).numpy()
        out[n] = {k: float(terms[k][rows, best].mean()) for k in METRICS}
    return out


def oracle_best_of_n(pool_oracle: dict, ns) -> dict[int, dict[str, float]]:
    """Upper bound: E[max of N oracle rewards] by the order-statistics estimator over the whole pool."""
    return {n: {"reward": float(expected_max_of_n(pool_oracle["reward"], n).mean())} for n in ns}


# ---------------------------------------------------------------------------------------------------------------
# RAPL head
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    obs: np.ndarray  # (B, 7)
    actions: torch.Tensor  # (B, H, 2)
    frames: torch.Tensor  # (B, T, 3, 32, 32)
    reward: np.ndarray  # (B,) oracle


@torch.no_grad()
def render_rollouts(policy: DiffusionActionPolicy, obs: np.ndarray, *, seed: int) -> Rollouts:
    """One policy rollout per state, rendered with a fresh random distractor each."""
    rng = np.random.default_rng(seed)
    actions = policy.sample(torch.from_numpy(obs), generator=torch.Generator().manual_seed(seed))
    waypoints = toy.actions_to_waypoints(obs, actions.numpy())
    frames = toy.render_batch(obs, waypoints, toy.sample_distractors(len(obs), rng))
    return Rollouts(obs, actions, torch.from_numpy(frames), toy.oracle(obs, waypoints)["reward"])


def expert_frames(obs: np.ndarray, k: int, *, seed: int) -> torch.Tensor:
    """(B, k, T, 3, 32, 32): k clean demonstrated arcs per state, each with its own distractor."""
    rng = np.random.default_rng(seed)
    rep = np.repeat(obs, k, axis=0)
    waypoints, _ = toy.demonstrations(rep, rng, mode_probs=(0.5, 0.5, 0.0))
    frames = toy.render_batch(rep, waypoints, toy.sample_distractors(len(rep), rng))
    return torch.from_numpy(frames).view(len(obs), k, *frames.shape[1:])


def rapl_triplets(policy: DiffusionActionPolicy, cfg: Detour2DConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``anchor ≻ better ≻ worse`` frames (N, T, 3, 32, 32) each: three rollouts of one state, oracle-sorted, kept
    when best - worst >= ``triplet_gap`` (a banded simulated human, as RAPL's ``generate_ranking.py``)."""
    rng = np.random.default_rng(30_000 + cfg.seed)
    obs = toy.sample_observations(4 * cfg.n_triplets, rng)
    ro = render_rollouts(policy, np.repeat(obs, 3, axis=0), seed=30_000 + cfg.seed)
    frames = ro.frames.view(len(obs), 3, *ro.frames.shape[1:])
    reward = ro.reward.reshape(len(obs), 3)
    order = np.argsort(-reward, axis=1, kind="stable")
    sorted_r = np.take_along_axis(reward, order, axis=1)
    keep = np.flatnonzero(sorted_r[:, 0] - sorted_r[:, 2] >= cfg.triplet_gap)[: cfg.n_triplets]
    if len(keep) < cfg.n_triplets:
        raise RuntimeError(f"only {len(keep)} of {cfg.n_triplets} triplets pass the gap {cfg.triplet_gap}")
    ordered = torch.stack([frames[i, torch.from_numpy(order[i])] for i in keep])  # (N, 3, T, ...)
    return ordered[:, 0], ordered[:, 1], ordered[:, 2]


def fit_rapl(triplets, cfg: Detour2DConfig, *, flip: bool = False, log_every: int = 0) -> tuple[RAPLHead, RAPLHead]:
    """(unaligned, aligned) heads from the same initialisation; ``flip`` reverses every ranking (C ≻ B ≻ A)."""
    torch.manual_seed(40_000 + cfg.seed)
    unaligned = RAPLHead(cfg.rapl)
    aligned = RAPLHead(cfg.rapl, encoder=copy.deepcopy(unaligned.encoder))
    anchor, better, worse = triplets
    if flip:
        anchor, worse = worse, anchor
    aligned.fit(anchor, better, worse, seed=cfg.seed, log_every=log_every)
    unaligned.encoder.eval()
    return unaligned, aligned


def rapl_eval_set(policy: DiffusionActionPolicy, cfg: Detour2DConfig) -> tuple[Rollouts, torch.Tensor]:
    obs = toy.sample_observations(cfg.n_rho_eval, np.random.default_rng(50_000 + cfg.seed))
    return render_rollouts(policy, obs, seed=50_000 + cfg.seed), expert_frames(obs, cfg.n_demos_per_scene,
                                                                                seed=51_000 + cfg.seed)


def rapl_spearman(head: RAPLHead, rollouts: Rollouts, demos: torch.Tensor) -> float:
    """Spearman ρ between the OT reward (against each scene's demonstrations) and the oracle."""
    r = head.reward()(rollouts.frames, demos).numpy()
    return float(spearmanr(r, rollouts.reward)[0])


@torch.no_grad()
def rapl_ranked_pairs(policy: DiffusionActionPolicy, head: RAPLHead, cfg: Detour2DConfig) -> PreferencePairs:
    """Rank ``rapl_rollouts`` policy rollouts per state with the RAPL reward; pair the best with the worst."""
    k = cfg.rapl_rollouts
    obs = toy.sample_observations(cfg.rapl_pref_states, np.random.default_rng(60_000 + cfg.seed))
    ro = render_rollouts(policy, np.repeat(obs, k, axis=0), seed=60_000 + cfg.seed)
    demos = expert_frames(obs, cfg.n_demos_per_scene, seed=61_000 + cfg.seed)
    demos = demos.repeat_interleave(k, dim=0)  # each rollout sees its own scene's demonstrations
    r = head.reward()(ro.frames, demos).view(len(obs), k)
    actions = ro.actions.view(len(obs), k, *ro.actions.shape[1:])
    rows = torch.arange(len(obs))
    best, worst = actions[rows, r.argmax(1)], actions[rows, r.argmin(1)]
    return PreferencePairs(torch.from_numpy(obs), best, worst, torch.ones(len(obs)))


# ---------------------------------------------------------------------------------------------------------------
# The whole experiment and its report
# ---------------------------------------------------------------------------------------------------------------


def run(cfg: Detour2DConfig, *, log=print) -> dict:
    """Every row of the report for one seed. Returns a JSON-able dict."""
    t0 = time.time()
    res: dict = {"seed": cfg.seed, "config": cfg.to_dict()}
    bc = train_imitation(cfg)
    obs = eval_observations(cfg)
    pool = candidate_pool(bc, obs, max(cfg.ras_ns), seed=70_000 + cfg.seed)
    pool_oracle = oracle_of_actions(obs, pool)
    res["imitation"] = {k: float(pool_oracle[k][:, 0].mean()) for k in METRICS}  # = RAS with N = 1
    log(f"[{time.time() - t0:.0f}s] imitation {res['imitation']}")

    pairs = collect_ranked_pairs(bc, cfg)
    res["n_pairs"] = len(pairs)
    for flip in (False, True):
        tag = "flipped" if flip else "dpo"
        head = align_policy(bc, pairs, cfg, flip=flip)
        res[tag] = evaluate_policy(head.policy, obs, seed=70_000 + cfg.seed)
        res[f"ras_{tag}"] = ras_rows(head, obs, pool, cfg.ras_ns, seed=cfg.seed, pool_oracle=pool_oracle)
        log(f"[{time.time() - t0:.0f}s] {tag} {res[tag]} ras {res[f'ras_{tag}']}")
    res["oracle_best_of_n"] = oracle_best_of_n(pool_oracle, cfg.ras_ns)
    res["pool_first_n"] = {n: {k: float(pool_oracle[k][:, :n].mean()) for k in METRICS} for n in cfg.ras_ns}

    triplets = rapl_triplets(bc, cfg)
    eval_rollouts, eval_demos = rapl_eval_set(bc, cfg)
    for flip in (False, True):
        tag = "rapl_flipped" if flip else "rapl"
        unaligned, aligned = fit_rapl(triplets, cfg, flip=flip)
        res.setdefault("rho_unaligned", rapl_spearman(unaligned, eval_rollouts, eval_demos))
        res[f"rho_{tag}"] = rapl_spearman(aligned, eval_rollouts, eval_demos)
        res[f"triplet_acc_{tag}"] = aligned.accuracy(*triplets)
        rpairs = rapl_ranked_pairs(bc, aligned, cfg)
        res[f"{tag}_dpo"] = evaluate_policy(align_policy(bc, rpairs, cfg).policy, obs, seed=70_000 + cfg.seed)
        if not flip:
            res["rapl_dpo_flipped_pairs"] = evaluate_policy(align_policy(bc, rpairs, cfg, flip=True).policy, obs,
                                                            seed=70_000 + cfg.seed)
            upairs = rapl_ranked_pairs(bc, unaligned, cfg)
            res["unaligned_dpo"] = evaluate_policy(align_policy(bc, upairs, cfg).policy, obs, seed=70_000 + cfg.seed)
        log(f"[{time.time() - t0:.0f}s] {tag} rho={res[f'rho_{tag}']:.3f} (unaligned {res['rho_unaligned']:.3f}) "
            f"dpo {res[f'{tag}_dpo']}")
    res["seconds"] = time.time() - t0
    return res


def _fmt(values: list[float], digits: int = 3) -> str:
    v = np.asarray(values, dtype=float)
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def report_rows(results: list[dict]) -> list[tuple[str, str, str, str]]:
    """(row, violation, reward, success) strings, mean ± sd over seeds."""
    def get(path):
        out = []
        for r in results:
            v = r
            for p in path:
                v = v[p] if p in v else v[str(p)]
            out.append(v)
        return out

    rows = []
    def add(name, path):
        vals = {m: _fmt(get([*path, m])) for m in METRICS}
        rows.append((name, vals["violation"], vals["reward"], vals["success"]))

    ns = results[0]["config"]["ras_ns"]
    add("imitation (BC)", ["imitation"])
    add("BC + DPO (sample the aligned policy)", ["dpo"])
    for n in ns:
        add(f"BC + RAS, N = {n} (implicit reward, reference samples)", ["ras_dpo", n])
    for n in ns:
        rows.append((f"oracle best-of-N, N = {n} (upper bound)", "", _fmt(get(["oracle_best_of_n", n, "reward"])), ""))
    add("sign-flipped labels: BC + DPO", ["flipped"])
    add(f"sign-flipped labels: BC + RAS, N = {ns[-1]}", ["ras_flipped", ns[-1]])
    add("BC + DPO on unaligned-encoder OT labels", ["unaligned_dpo"])
    add("BC + DPO on RAPL OT labels", ["rapl_dpo"])
    add("BC + DPO on RAPL OT labels, pairs sign-flipped", ["rapl_dpo_flipped_pairs"])
    add("BC + DPO on OT labels of an encoder aligned on flipped triplets", ["rapl_flipped_dpo"])
    return rows


def write_report(results: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """``results.json``, ``table.md`` and ``plot.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    seeds = [r["seed"] for r in results]
    lines = [f"Detour2D, seeds {seeds}, {results[0]['config']['n_eval']} held-out states; mean ± sd over seeds.", "",
             "| row | violation rate ↓ | oracle reward ↑ | success ↑ |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in report_rows(results)]
    lines += ["", "| RAPL reward vs oracle | Spearman ρ |", "|---|---|"]
    for name, key in (("unaligned encoder (random init)", "rho_unaligned"), ("RAPL-aligned encoder", "rho_rapl"),
                      ("encoder aligned on sign-flipped triplets", "rho_rapl_flipped")):
        lines.append(f"| {name} | {_fmt([r[key] for r in results])} |")
    lines += ["", (f"Preference pairs (DeformPAM ranking rule): {_fmt([r['n_pairs'] for r in results], 0)}; "
                   f"wall time per seed: {_fmt([r['seconds'] for r in results], 0)} s.")]
    table = out / "table.md"
    table.write_text("\n".join(lines) + "\n")

    ns = results[0]["config"]["ras_ns"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    def series(key, metric):
        return np.array([[r[key][str(n)][metric] if str(n) in r[key] else r[key][n][metric] for n in ns]
                         for r in results])
    for metric, ax in zip(("violation", "reward"), axes[:2]):
        for key, label, style in (("ras_dpo", "RAS (implicit reward)", "o-"),
                                  ("ras_flipped", "RAS, sign-flipped labels", "x--")):
            s = series(key, metric)
            ax.errorbar(ns, s.mean(0), yerr=s.std(0), fmt=style, label=label, capsize=3)
        if metric == "reward":
            s = series("oracle_best_of_n", "reward")
            ax.errorbar(ns, s.mean(0), yerr=s.std(0), fmt="s:", label="oracle best-of-N", capsize=3)
        for key, label, color in (("imitation", "imitation", "k"), ("dpo", "BC + DPO", "C2"),
                                  ("flipped", "BC + DPO, flipped", "C3")):
            ax.axhline(np.mean([r[key][metric] for r in results]), color=color, ls="-." if key != "imitation" else "-",
                       lw=1, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("N candidates")
        ax.set_title({"violation": "puddle violation rate (lower is better)",
                      "reward": "oracle reward (higher is better)"}[metric])
        ax.legend(fontsize=7)
    ax = axes[2]
    names = ["unaligned", "RAPL", "RAPL flipped"]
    vals = np.array([[r["rho_unaligned"], r["rho_rapl"], r["rho_rapl_flipped"]] for r in results])
    ax.bar(names, vals.mean(0), yerr=vals.std(0) if len(results) > 1 else None, color=["grey", "C0", "C3"], capsize=4)
    for i in range(len(results)):
        ax.plot(names, vals[i], "k.", alpha=0.6)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title("Spearman ρ(OT reward, oracle), Detour2D-Pixels")
    fig.tight_layout()
    plot = out / "plot.png"
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    return table, plot


def run_report(seeds, out_dir: str | Path, overrides: dict | None = None, *, log=print) -> tuple[Path, Path]:
    """Run :func:`run` for each seed (``overrides`` are :class:`Detour2DConfig` fields) and write the report."""
    results = []
    for seed in seeds:
        cfg = Detour2DConfig(**{**(overrides or {}), "seed": seed})
        log(f"== seed {seed}")
        results.append(json.loads(json.dumps(run(cfg, log=log), default=float)))  # int keys -> str, as on disk
    return write_report(results, out_dir)
