"""Mutation check: plant plausible loss-layer mistakes one at a time and require a fast test to catch each.

Every entry of :data:`MUTATIONS` replaces one exact snippet of a library file (it must occur exactly once, so
a refactor that moves the code makes this script fail loudly instead of testing nothing) and names the fast
tests that guard it. For each mutation the script copies the package into a scratch workspace, applies the
edit there (the source tree is never touched), runs ``pytest -x`` on the named tests with ``PYTHONPATH``
pointing at the workspace (subprocesses the tests start import the mutant too), and records the first failing
test. Before any mutation the union of the named tests must pass on the unmodified copy.

    python scripts/mutation_check.py                    # all mutations, 2 workers, table on stdout
    python scripts/mutation_check.py --write-docs       # also rewrite docs/mutations.md
    python scripts/mutation_check.py --only dpo-sign seppo-tie-as-win

Exit status 1 when a mutation survives (no named test fails) or no longer applies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "mutations.md"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files, relative to the root
    what: str


def m(name, file, old, new, tests, what):
    return Mutation(name, file, old, new, tuple(tests), what)


LIK = "diffalign/likelihood.py"
T_LIK = "tests/core/test_likelihood.py"
T_OBJ = "tests/core/test_objectives.py"
T_MAPO = "tests/core/test_mapo.py"
T_SEPPO = "tests/core/test_seppo.py"
T_DCPO = "tests/core/test_dcpo.py"
T_INPO = "tests/core/test_inpo.py"
T_NOISE = "tests/core/test_noise_sharing.py"
T_FLOW = "tests/core/test_flow_likelihood.py"
GRPO = "diffalign/online/grpo.py"
T_GRPO = "tests/online/test_logprob_and_grpo.py::"
T_GRPO_LOSS = T_GRPO + "test_grpo_loss_values_and_gradients_equal_official"
T_PPD = ("tests/personalization/test_objective.py", "tests/personalization/test_attention.py",
         "tests/personalization/test_trainer.py::test_branch_only_run",
         "tests/personalization/test_trainer.py::test_lora_and_branch_train_and_dropout")
T_ROBOT = "tests/robot/test_robot_objectives.py"
T_POLICY = "tests/robot/test_robot_policy.py"

MUTATIONS: list[Mutation] = [
    # ---------------------------------------------------------------- likelihood layer
    m("snr-times-lambda", LIK, "        to_x0 = 1 / s\n", "        to_x0 = s\n", [T_LIK],
      "`weighting: snr` multiplies the ε-error by λ_t instead of dividing (the shipped defect)"),
    m("min-snr-v-over-lambda", LIK, 'to_x0 = 1 / (s + 1) if prediction_type == "v_prediction"',
      'to_x0 = 1 / s if prediction_type == "v_prediction"', [T_LIK],
      "v-prediction min-SNR (and x0 conversion) divides by λ instead of λ + 1"),
    m("min-snr-unclipped", LIK, "torch.clamp(s, max=snr_gamma) * to_x0", "s * to_x0", [T_LIK],
      "min-SNR without the clip at γ"),
    m("forward-variance-for-std", LIK, "x_t = abar.sqrt() * x0f + (1 - abar).sqrt() * nf",
      "x_t = abar * x0f + (1 - abar).sqrt() * nf", [T_LIK],
      "forward process scales x0 by ᾱ_t (a variance) instead of sqrt(ᾱ_t)"),
    m("v-target-sign", LIK, "target = abar.sqrt() * nf - (1 - abar).sqrt() * x0f",
      "target = abar.sqrt() * nf + (1 - abar).sqrt() * x0f", [T_LIK], "v target with + instead of −"),
    m("error-sum-not-mean", LIK, "return sq.reshape(sq.shape[0], -1).mean(dim=1)",
      "return sq.reshape(sq.shape[0], -1).sum(dim=1)", [T_LIK],
      "per-sample error summed over latent dims instead of averaged (β would depend on resolution)"),
    m("reference-with-grad", LIK, "        with torch.no_grad():\n            ref_err",
      "        if True:\n            ref_err", [T_LIK], "reference forward runs with autograd on"),
    m("policy-error-detached", LIK, "model_err = w * per_sample_error(model(x_t, t, cond), target)",
      "model_err = w * per_sample_error(model(x_t, t, cond), target).detach()", [T_LIK],
      "policy errors detached: no gradient reaches the model"),
    m("loser-own-noise", LIK, "noise = half.repeat(2, *([1] * (x0_pairs.ndim - 1)))",
      "noise = torch.randn(x0_pairs.shape, generator=generator, device=device)", [T_LIK],
      "`share=True` still draws independent noise for the losers"),
    m("reference-wrong-timestep", LIK, "ref_err = w * per_sample_error(reference(x_t, t, cond), target)",
      "ref_err = w * per_sample_error(reference(x_t, (t + 1).clamp(max=999), cond), target)", [T_LIK],
      "reference evaluated at a different timestep than the policy"),
    m("flow-sigma-swapped", LIK, "x_t = (1.0 - sigma) * x0f + sigma * nf", "x_t = sigma * x0f + (1.0 - sigma) * nf",
      [T_FLOW], "rectified flow mixes x0 with σ and ε with 1 − σ (time reversed)"),
    m("flow-target-sign", LIK, "return x_t.to(x0.dtype), nf - x0f", "return x_t.to(x0.dtype), x0f - nf", [T_FLOW],
      "rectified-flow velocity target x0 − ε instead of ε − x0"),
    # ---------------------------------------------------------------- Diffusion-DPO
    m("dpo-sign", "diffalign/objectives/dpo.py",
      "return -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))",
      "return 0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))", [T_OBJ],
      "DPO logit with the wrong sign"),
    m("dpo-factor-2", "diffalign/objectives/dpo.py",
      "return -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))",
      "return -1.0 * beta * ((model_w - ref_w) - (model_l - ref_l))", [T_OBJ],
      "DPO without the official ½ (β off by a factor 2)"),
    m("dpo-swapped-reference", "diffalign/objectives/dpo.py",
      "return -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))",
      "return -0.5 * beta * ((model_w - ref_l) - (model_l - ref_w))", [T_OBJ],
      "winner's and loser's reference errors swapped"),
    m("dpo-sum-over-batch", "diffalign/objectives/dpo.py",
      "return -F.logsigmoid(dpo_logits(model_w, model_l, ref_w, ref_l, beta)).mean()",
      "return -F.logsigmoid(dpo_logits(model_w, model_l, ref_w, ref_l, beta)).sum()", [T_OBJ],
      "DPO loss summed over the batch instead of averaged"),
    m("dpo-accuracy-ties", "diffalign/objectives/dpo.py",
      "acc = (logits > 0).float() + 0.5 * (logits == 0).float()",
      "acc = (logits >= 0).float()", [T_OBJ], "implicit accuracy counts a tie (policy = reference) as a win"),
    # ---------------------------------------------------------------- MaPO
    m("mapo-phi-exp", "diffalign/objectives/mapo.py", "u_safe / torch.expm1(u_safe)",
      "u_safe / torch.exp(u_safe)", [T_MAPO], "φ(u) = u/e^u instead of u/(e^u − 1)"),
    m("mapo-margin-sign", "diffalign/objectives/mapo.py", "return model_w.mean() - beta * ratio.mean()",
      "return model_w.mean() + beta * ratio.mean()", [T_MAPO], "margin term added instead of subtracted"),
    m("mapo-sft-on-loser", "diffalign/objectives/mapo.py",
      "losses = errors.model_w - config.beta * F.logsigmoid(margin)",
      "losses = errors.model_l - config.beta * F.logsigmoid(margin)", [T_MAPO],
      "registered MaPO fine-tunes on the loser (winner and loser swapped in the SFT term)"),
    m("mapo-no-t-factor", "diffalign/objectives/mapo.py",
      "margin = mapo_log_odds(errors.model_w, errors.model_l, config.snr_value) * config.num_train_timesteps",
      "margin = mapo_log_odds(errors.model_w, errors.model_l, config.snr_value)", [T_MAPO],
      "registered MaPO drops the factor T on the log-odds"),
    m("mapo-no-snr-value", "diffalign/objectives/mapo.py",
      "return phi(snr_value * model_w) - phi(snr_value * model_l)", "return phi(model_w) - phi(model_l)",
      [T_MAPO], "s (snr_value) missing inside φ"),
    # ---------------------------------------------------------------- SePPO
    m("seppo-tie-as-win", "diffalign/objectives/seppo.py",
      'return torch.sign(gap) if flipper == "sign" else (gap > 0).to(gap.dtype)',
      'return torch.where(gap > 0, 1.0, -1.0).to(gap.dtype) if flipper == "sign" '
      'else (gap > 0).to(gap.dtype)',
      [T_SEPPO], "AAF treats a tie as a win for the reference sample (the shipped defect)"),
    m("seppo-aaf-reversed", "diffalign/objectives/seppo.py", "gap = (ref_w - model_w).detach()",
      "gap = (model_w - ref_w).detach()", [T_SEPPO], "AAF anchor comparison reversed"),
    m("seppo-s-sign", "diffalign/objectives/seppo.py",
      "return -0.5 * beta * ((model_w - ref_w) - s * (model_r - ref_r))",
      "return -0.5 * beta * ((model_w - ref_w) + s * (model_r - ref_r))", [T_SEPPO],
      "the reference sample's term enters with the wrong sign"),
    # ---------------------------------------------------------------- DCPO captions
    m("dcpo-salted-seed", "diffalign/data/captions.py",
      'return random.Random(f"diffalign-caption:{seed}:{epoch}:{index}")',
      'return random.Random(hash(f"diffalign-caption:{seed}:{epoch}:{index}"))', [T_DCPO],
      "caption seed from `hash()` of a str (salted per process: the shipped defect)"),
    m("dcpo-epoch-ignored", "diffalign/data/captions.py",
      'return random.Random(f"diffalign-caption:{seed}:{epoch}:{index}")',
      'return random.Random(f"diffalign-caption:{seed}:{index}")', [T_DCPO],
      "every epoch draws the same loser captions"),
    m("dcpo-captions-swapped", "diffalign/data/pairs.py", "return c, self.word_swap(c, rng)",
      "return self.word_swap(c, rng), c", [T_DCPO], "word_swap conditions the winner, not the loser"),
    # ---------------------------------------------------------------- InPO inversion
    m("inpo-noise-at-level", "diffalign/training/inpo.py",
      "return t, implied_noise(scheduler, x0_pairs, x_inv, t).to(x0_pairs.dtype)",
      "return t, implied_noise(scheduler, x0_pairs, x_inv, level).to(x0_pairs.dtype)", [T_INPO],
      "official mode back-solves the noise at the inverted level L(t) instead of t"),
    m("inpo-eta-variance", "diffalign/inversion.py", "x_next = x_next + eta * var.sqrt() * xi.to(x.device)",
      "x_next = x_next + eta * var * xi.to(x.device)", [T_INPO],
      "η-noise scaled by the variance, not the std"),
    m("inpo-x0hat-variance", "diffalign/inversion.py",
      "x0_hat = (x - (1 - abar_k).sqrt() * eps) / abar_k.sqrt()",
      "x0_hat = (x - (1 - abar_k).sqrt() * eps) / abar_k",
      [T_INPO], "DDIM inversion step divides by ᾱ_k instead of sqrt(ᾱ_k)"),
    m("inpo-denoiser-timestep", "diffalign/inversion.py",
      "eps = denoiser(x.to(x0.dtype), torch.full_like(t, max(k, 0)), cond).float()",
      "eps = denoiser(x.to(x0.dtype), torch.full_like(t, max(k - 1, 0)), cond).float()", [T_INPO],
      "inversion calls the U-Net one step off the level it is at"),
    m("inpo-loser-own-t", "diffalign/training/inpo.py",
      "t = sample_timesteps(half, scheduler.config.num_train_timesteps, generator=generator).repeat(2)",
      "t = sample_timesteps(2 * half, scheduler.config.num_train_timesteps, generator=generator)", [T_INPO],
      "InPO winner and loser inverted to different t"),
    # ---------------------------------------------------------------- recipes: noise sharing
    m("trainer-independent-noise", "diffalign/training/trainer.py",
      "return pair_timesteps_and_noise(x0_pairs, scheduler, share=self.config.share_noise,",
      "return pair_timesteps_and_noise(x0_pairs, scheduler, share=False,", [T_NOISE],
      "the trainer (every recipe but InPO's) draws independent noise for winner and loser while `share_noise` is on"),
    # ---------------------------------------------------------------- PPD branch
    m("ppd-reference-sees-user", "diffalign/personalization/trainer.py",
      "return self.inner(x_t, t, without_user(cond))", "return self.inner(x_t, t, cond)", T_PPD,
      "PPD's reference is called with the user tokens"),
    m("ppd-loser-without-user", "diffalign/personalization/trainer.py",
      '"user_tokens": torch.cat([tokens, tokens])}', '"user_tokens": torch.cat([tokens, 0 * tokens])}', T_PPD,
      "the loser is scored without its labeller's tokens"),
    m("ppd-dropout-not-zeroed", "diffalign/personalization/trainer.py",
      "return tokens * keep.to(device, tokens.dtype)[:, None, None]", "return tokens", T_PPD,
      "dropped users keep their tokens"),
    m("ppd-projection-detached", "diffalign/personalization/trainer.py",
      "tokens = self.unet_inner.user_projection(feats.to(device))  # (B, N_u, D_u)",
      "tokens = self.unet_inner.user_projection(feats.to(device)).detach()", T_PPD,
      "user projection detached: it never trains"),
    m("ppd-branch-scale", "diffalign/personalization/attention.py",
      "return out + s * self.user_branch(attn, hidden_states, user_tokens).to(out.dtype)",
      "return out + s * s * self.user_branch(attn, hidden_states, user_tokens).to(out.dtype)", T_PPD,
      "user branch weight s applied twice (s² instead of s)"),
    m("ppd-loss-reference-swap", "diffalign/personalization/objective.py",
      "return -F.logsigmoid(dpo_logits(model_w, model_l, ref_w, ref_l, beta))",
      "return -F.logsigmoid(dpo_logits(model_w, model_l, ref_l, ref_w, beta))", T_PPD,
      "PPD loss with the reference errors swapped"),
    m("ppd-branch-only-dropout", "diffalign/personalization/trainer.py", "            return 0.0\n",
      "            return 0.1\n", T_PPD,
      "branch-only PPD drops users (pairs with policy = reference: ln 2, no gradient; the shipped defect)"),
    # ---------------------------------------------------------------- robot heads
    m("deformpam-no-2beta", "diffalign/robot/objectives.py",
      "return dpo_logits(model_w, model_l, ref_w, ref_l, beta=2.0 * beta)",
      "return dpo_logits(model_w, model_l, ref_w, ref_l, beta=beta)", [T_ROBOT],
      "DeformPAM logit with the official ½ (β off by a factor 2)"),
    m("deformpam-loss-sign", "diffalign/robot/objectives.py",
      "return -torch.sigmoid(deformpam_logits(model_w, model_l, ref_w, ref_l, beta)).mean()",
      "return torch.sigmoid(deformpam_logits(model_w, model_l, ref_w, ref_l, beta)).mean()", [T_ROBOT],
      "DeformPAM loss maximised instead of minimised"),
    m("deformpam-ties-kept", "diffalign/robot/objectives.py", 'valid = (~tie) | (tie_mode == "sft")',
      'valid = (~tie) | (tie_mode == "drop")', [T_ROBOT], "`tie_mode: drop` keeps ties in the mean"),
    m("deformpam-sft-no-half", "diffalign/robot/objectives.py",
      "sft = sft_weight * 0.5 * (model_w + model_l)",
      "sft = sft_weight * (model_w + model_l)", [T_ROBOT], "tie SFT term summed instead of averaged"),
    m("ras-reward-sign", "diffalign/robot/modeling_deformpam.py",
      "return (-beta * total / n_draws).view(b, n)",
      "return (beta * total / n_draws).view(b, n)", [T_POLICY],
      "RAS implicit reward with the wrong sign (ranks the worst candidate first)"),
    m("rapl-swapped-triplet", "diffalign/robot/objectives.py", "margin = r_better - r_worse",
      "margin = r_worse - r_better", [T_ROBOT], "RAPL triplet with better and worse swapped"),
    m("rapl-tie-not-squared", "diffalign/robot/objectives.py", "(0.5 - torch.sigmoid(margin)).square()",
      "(0.5 - torch.sigmoid(margin))", [T_ROBOT], "RAPL tie term not squared"),
    m("rapl-mean-not-sum", "diffalign/robot/modeling_rapl.py",
      'loss = losses.sum() if self.config.reduction == "sum" else losses.mean()', "loss = losses.mean()",
      [T_POLICY + "::test_rapl_default_loss_is_the_author_codes_sum_of_one_minus_p"],
      "RAPL head averages where the author code sums"),
    m("rapl-default-bt", "diffalign/robot/configuration_rapl.py", 'default="rapl_code",', 'default="bt",',
      [T_POLICY + "::test_rapl_default_loss_is_the_author_codes_sum_of_one_minus_p"],
      "RAPL's default loss back to Bradley-Terry, which the author code does not use (the shipped defect)"),
    m("ot-reward-sign", "diffalign/robot/ot.py", "return -(plan * c).sum(dim=-1)",
      "return (plan * c).sum(dim=-1)", ["tests/robot/test_robot_sinkhorn.py"],
      "OT reward = +transport cost instead of −"),
    # ---------------------------------------------------------------- online RL (GRPO, DiffusionNFT)
    m("grpo-ratio-inverted", GRPO, "log_ratio = log_prob - old_log_prob.detach()",
      "log_ratio = old_log_prob.detach() - log_prob",
      [T_GRPO_LOSS], "GRPO importance ratio p_old / p_θ"),
    m("grpo-min-not-max", GRPO, "per_sample = torch.maximum(unclipped, clipped)",
      "per_sample = torch.minimum(unclipped, clipped)", [T_GRPO_LOSS],
      "PPO's pessimistic bound taken the wrong way (min of the negated surrogates)"),
    m("grpo-kl-no-half", GRPO, "return per / (2 * s**2)", "return per / s**2",
      [T_GRPO + "test_grpo_loss_with_kl_equals_official"],
      "Flow-GRPO's KL without the 1/2 of the Gaussian"),
    m("advantage-not-centred", GRPO, "centred = r - mean[idx]", "centred = r",
      [T_GRPO + "test_group_advantages_equal_the_stat_tracker"],
      "GRPO advantages not centred on the prompt's mean"),
    m("sde-std-squared", "diffalign/online/logprob.py",
      "std_dev_t = noise_level * torch.sqrt(s / (1 - s_denominator))",
      "std_dev_t = noise_level * (s / (1 - s_denominator))",
      [T_GRPO + "test_flow_sde_step_equals_official_on_a_given_prev_sample"],
      "Flow-GRPO noise scale a·σ/(1−σ) instead of a·sqrt(σ/(1−σ))"),
    m("nft-negative-sign", GRPO, "v_neg = (1 + beta) * v_old - beta * v",
      "v_neg = (1 + beta) * v_old + beta * v",
      [T_GRPO + "test_nft_loss_values_and_gradients_equal_official"],
      "DiffusionNFT's implicit negative policy v⁻ sign"),
]


def _workspace(root: Path) -> Path:
    """A scratch copy of the package and tests, with the read-only folders linked."""
    ws = Path(tempfile.mkdtemp(prefix="diffalign-mutant-"))
    for name in ("diffalign", "tests"):
        shutil.copytree(root / name, ws / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "assets"))
    (ws / "diffalign" / "assets").symlink_to(root / "diffalign" / "assets")  # read-only data, 28 MB
    for name in ("pyproject.toml",):
        shutil.copy2(root / name, ws / name)
    for name in ("assets", "configs", "scripts", "docs", "bench", "README.md"):
        if (root / name).exists():
            (ws / name).symlink_to(root / name)
    return ws


def _pytest(ws: Path, tests: list[str], timeout: float) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(ws), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", "-p", "no:randomly",
           *tests]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - start
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return -1, out + f"\ntimeout after {timeout:.0f} s", time.perf_counter() - start


def _first_failure(output: str) -> str:
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return found.group(1) if found else "?"


def apply(source: str, mutation: Mutation) -> str:
    count = source.count(mutation.old)
    if count != 1:
        raise ValueError(f"mutation {mutation.name!r}: the snippet occurs {count} times in {mutation.file} "
                         "(the code moved: update the mutation)")
    return source.replace(mutation.old, mutation.new)


def run_one(ws: Path, mutation: Mutation, timeout: float) -> dict:
    path = ws / mutation.file
    original = path.read_text()
    try:
        path.write_text(apply(original, mutation))
    except ValueError as err:
        return {"name": mutation.name, "status": "stale", "test": str(err), "seconds": 0.0}
    try:
        rc, out, secs = _pytest(ws, list(mutation.tests), timeout)
    finally:
        path.write_text(original)
    if rc == 1:
        status, test = "caught", _first_failure(out)
    elif rc == 0:
        status, test = "survived", ""
    else:  # collection error, interrupted, timeout: the mutant broke more than the loss
        status, test = "error", (_first_failure(out) if rc != -1 else "timeout")
    return {"name": mutation.name, "status": status, "test": test, "seconds": round(secs, 1)}


def table(results: list[dict]) -> str:
    by_name = {mu.name: mu for mu in MUTATIONS}
    lines = ["| mutation | file | what it plants | caught by |", "| --- | --- | --- | --- |"]
    for r in results:
        mu = by_name[r["name"]]
        caught = f"`{r['test']}`" if r["status"] == "caught" else f"**{r['status'].upper()}** {r['test']}"
        lines.append(f"| `{mu.name}` | `{mu.file}` | {mu.what} | {caught} |")
    return "\n".join(lines)


def write_docs(results: list[dict], wall: float, jobs: int) -> None:
    caught = sum(r["status"] == "caught" for r in results)
    DOCS.write_text(f"""# Mutation check

Generated by `python scripts/mutation_check.py --write-docs` ({jobs} workers, 1 thread each, {wall:.0f} s on this
project's 2-core CPU machine). Each row plants one plausible mistake in a scratch copy of the package and runs
`pytest -x` on the fast tests listed for it in `scripts/mutation_check.py`; "caught by" is the first test that failed.
The suite runs the same check (`tests/test_mutation_check.py`), so a new loss change that no test guards fails CI.
Caught: {caught} of {len(results)}.

{table(results)}
""")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="mutation names (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="parallel workers, one scratch copy each")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per mutation run")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite {DOCS.relative_to(ROOT)}")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--list", action="store_true", help="print the mutation names and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(f"{mu.name}: {mu.what}" for mu in MUTATIONS))
        return 0
    names = {mu.name for mu in MUTATIONS}
    if len(names) != len(MUTATIONS):
        raise SystemExit("mutation names must be unique")
    unknown = sorted(set(args.only or []) - names)
    if unknown:
        raise SystemExit(f"unknown mutation {unknown[0]!r}; see --list")
    todo = [mu for mu in MUTATIONS if not args.only or mu.name in args.only]
    start = time.perf_counter()
    workspaces = [_workspace(ROOT) for _ in range(max(1, min(args.jobs, len(todo))))]
    try:
        union = sorted({t for mu in todo for t in mu.tests})
        rc, out, secs = _pytest(workspaces[0], union, args.timeout)
        if rc != 0:
            print(out[-3000:])
            print(f"baseline: the named tests fail on the unmodified package ({_first_failure(out)}); "
                  "fix them first")
            return 1
        print(f"baseline: {len(union)} test targets pass unmodified ({secs:.0f} s)", flush=True)
        free = list(workspaces)

        def work(mu: Mutation) -> dict:
            ws = free.pop()
            try:
                r = run_one(ws, mu, args.timeout)
            finally:
                free.append(ws)
            print(f"{r['status']:>8}  {mu.name:<28} {r['seconds']:6.1f} s  {r['test']}", flush=True)
            return r

        with ThreadPoolExecutor(len(workspaces)) as pool:
            results = list(pool.map(work, todo))
    finally:
        for ws in workspaces:
            shutil.rmtree(ws, ignore_errors=True)
    wall = time.perf_counter() - start
    print(table(results))
    bad = [r for r in results if r["status"] != "caught"]
    print(f"{len(results) - len(bad)} of {len(results)} mutations caught in {wall:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "seconds": wall}, indent=1))
    if args.write_docs:
        write_docs(results, wall, len(workspaces))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
