"""Online RL recipes: GRPO (Flow-GRPO's SDE steps on SD3/FLUX, DDPO's stochastic DDIM steps on U-Nets) and
DiffusionNFT, trained against in-process rewards, with the reward-hacking monitor.

One training step (``max_steps`` counts these) of :class:`GRPOTrainer`, per process:

1. :meth:`~GRPOTrainer.sample`: ``batch_size`` prompts, ``rollout.group_size`` G images each, sampled by the
   current policy with :func:`diffalign.online.rollout` (no gradient); the steps of the SDE window are stochastic
   and keep their log-probabilities :math:`\\log p_{old}`, the others run the ODE. Then the images are decoded.
2. :meth:`~GRPOTrainer.score`: ``rollout.rewards`` on the images (:class:`diffalign.online.Rewards`), and for the
   monitor the held-out scorers and the artefact statistics of the same images.
3. :meth:`~GRPOTrainer.advantages`: rewards gathered over processes, normalised per prompt
   (:func:`diffalign.online.group_advantages`); the samples of an all-tied group (A = 0) are left out of the loss,
   as flow_grpo drops them.
4. :meth:`~GRPOTrainer.update`: every (micro-batch, stochastic step) pair re-scored with gradient
   (:func:`diffalign.online.rescore`), the objective (:func:`diffalign.online.grpo_loss`, KL to the reference =
   LoRA disabled), ``rollout.updates_per_rollout`` optimizer updates over them. The first update is on-policy:
   its ratios ρ must be 1, and the trainer logs ``ratio/first_update_error`` = max |ρ − 1| and warns above
   ``rollout.ratio_tolerance``.

:class:`NFTTrainer` overrides two steps: :meth:`~NFTTrainer.sample` draws with the *old* (sampling) policy on the
deterministic sampler, and the loss is DiffusionNFT's on forward-noised copies of the samples; after each step
the old policy moves toward the trained one.

The monitor (``monitor`` section): each step's record holds ``reward``, ``reward/<scorer>``,
``heldout/<scorer>`` and ``artefact/<stat>`` (means over processes), with ``monitor.prompts`` also the same of a
fixed evaluation set under ``eval/`` every ``monitor.every`` steps, and
:class:`diffalign.online.HackingMonitor` flags a run whose reward rises while a held-out metric moves the bad way
(``monitor/flagged``); ``monitor.action`` warns, checkpoints or stops.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import ResumableSampler
from ..likelihood import noisy_sample_and_target, x0_coefficients
from ..models.denoiser import UNetCondition
from ..models.latents import unscale_latents
from ..models.text import build_condition, sdxl_time_ids
from ..online import (
    HackingMonitor,
    Rewards,
    RewardSpec,
    Trajectory,
    artefact_record,
    group_advantages,
    rescore,
    rollout,
    sde_window,
)
from .config import ConfigError
from .semi_policy import SnapshotReference
from .trainer import PreferenceTrainer


class PromptList:
    """The prompts of a text file, one per line; blank lines and lines starting with ``#`` are skipped."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"rollout.prompts: {str(path)!r} is not a file (a text file, one prompt per "
                                    "line)")
        self.path = path
        self.prompts = [ln.strip() for ln in path.read_text().splitlines()
                        if ln.strip() and not ln.lstrip().startswith("#")]
        if not self.prompts:
            raise ConfigError(f"rollout.prompts: {str(path)!r} holds no prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> str:
        return self.prompts[i]


@dataclass
class RolloutChunk:
    """One micro-batch of a rollout: its trajectory, its conditions and prompts (``trajectory.batch_size`` rows)."""

    trajectory: Trajectory
    cond: UNetCondition
    uncond: UNetCondition | None
    prompts: list[str]


@dataclass
class Rollout:
    """A step's samples: ``chunks`` (the micro-batches, in order), ``prompts`` (N = B·G, each prompt G times in a
    row), ``images`` float (N, 3, H, W) in [0, 1] on the CPU; then ``rewards`` (N,), ``advantages`` (N,) and
    ``record`` (the step's reward, held-out and artefact means, and timings)."""

    chunks: list[RolloutChunk]
    prompts: list[str]
    images: torch.Tensor
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    record: dict = field(default_factory=dict)

    def rows(self, k: int) -> slice:
        """The rows of chunk ``k`` in the N samples."""
        start = sum(c.trajectory.batch_size for c in self.chunks[:k])
        return slice(start, start + self.chunks[k].trajectory.batch_size)


def _split(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` contiguous runs of near-equal length (empty runs dropped)."""
    bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
    return [items[a:b] for a, b in itertools.pairwise(bounds) if b > a]


class GRPOTrainer(PreferenceTrainer):
    """GRPO on the policy's own samples (``objective: grpo``); see the module docstring for the step."""

    progress_keys = (("reward", "reward"), ("loss", "loss"))

    def setup(self, resume: bool = False, overwrite: bool = False) -> GRPOTrainer:
        PromptList(self.config.rollout.prompts)  # a missing or empty file fails before the model loads
        self.updates = 0  # optimizer updates so far (several per step with rollout.updates_per_rollout)
        self._monitor_state = None
        self._ratio_warned = False
        self._empty_text: dict[str, torch.Tensor] | None = None
        super().setup(resume=resume, overwrite=overwrite)
        cfg, acc = self.config, self.accelerator
        r, mon = cfg.rollout, cfg.monitor
        device = r.reward_device or str(acc.device)
        self.rewards = Rewards(r.rewards, device=device)
        self.held_out = Rewards(mon.held_out, device=device) if mon.held_out is not None else None
        self.eval_prompts = PromptList(mon.prompts) if mon.prompts else None
        prefix = "eval/" if self.eval_prompts else ""  # what the monitor watches: the eval set, or the rollouts
        watched = [f"{prefix}heldout/{n}" for n in (self.held_out.names if self.held_out else [])]
        if mon.artefacts == "watch":
            from ..online import ARTEFACT_STATS

            watched += [f"{prefix}artefact/{s}" for s in ARTEFACT_STATS]
        self.monitor = None
        if watched:
            self.monitor = HackingMonitor(f"{prefix}reward", watched, window=mon.window, patience=mon.patience,
                                          min_rise=mon.min_rise, min_fall=mon.min_fall, action=mon.action,
                                          reference=mon.reference, units=mon.units)
            if self._monitor_state is not None:
                self.monitor.load_state_dict(self._monitor_state)
        return self

    # ---------------------------------------------------------------------------------------------- data
    def build_dataset(self) -> None:
        """``self.dataset``: the prompts of ``rollout.prompts``; no latent cache."""
        cfg, acc = self.config, self.accelerator
        self.dataset = PromptList(cfg.rollout.prompts)
        self.cache = None
        if len(self.dataset) // acc.num_processes < cfg.batch_size:
            raise ConfigError(f"rollout.prompts: {len(self.dataset)} prompts cannot give batch_size="
                              f"{cfg.batch_size} prompts to each of {acc.num_processes} process(es)")

    def data_summary(self) -> str:
        r = self.config.rollout
        return (f"{len(self.dataset)} prompts x {r.group_size} images, reward {RewardSpec.parse(r.rewards)}, "
                f"{r.num_inference_steps} sampling steps")

    def batches(self):
        """``{"prompts": [...]}`` of ``batch_size`` prompts: epochs of a per-epoch permutation sharded by rank; every
        process gets the same number of batches (a short last one is dropped), ``self.position`` counts the
        prompts this process consumed in the epoch."""
        cfg, acc = self.config, self.accelerator
        b = cfg.batch_size
        per_rank = len(self.dataset) // acc.num_processes // b * b
        while True:
            order = ResumableSampler(len(self.dataset), cfg.seed, self.epoch, rank=acc.process_index,
                                     world_size=acc.num_processes).indices()[:per_rank]
            while self.position + b <= per_rank:
                chosen = order[self.position:self.position + b]
                self.position += b
                yield {"prompts": [self.dataset[i] for i in chosen], "indices": chosen, "size": b}
            self.epoch += 1
            self.position = 0

    # ------------------------------------------------------------------------------------------- the step
    def training_step(self, batch: dict):
        """Sample, score, advantages, update (the module docstring); the step's record joins ``self.window``."""
        t0 = self._clock()
        samples = self.sample(batch["prompts"])
        t1 = self._clock()
        self.score(samples)
        t2 = self._clock()
        self.advantages(samples)
        metrics = self.update(samples)
        t3 = self._clock()
        samples.record.update({"time/sample": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2})
        self.window.append({**samples.record, **metrics})
        return samples

    def _clock(self) -> float:
        """Seconds, after the accelerator's queued work is done (so each phase's time is its own)."""
        if self.accelerator.device.type == "cuda":
            torch.cuda.synchronize(self.accelerator.device)
        return time.perf_counter()

    def rollout_condition(self, prompts: list[str]) -> tuple[UNetCondition, UNetCondition | None]:
        """``(cond, uncond)`` for ``prompts`` (N rows each); ``uncond`` None without CFG (``guidance_scale`` 1,
        or FLUX-dev, whose denoiser takes ``model.flux_guidance``)."""
        c, r = self.components, self.config.rollout
        n = len(prompts)
        time_ids = None
        if c.is_sdxl:
            res = self.config.dataset.resolution
            time_ids = sdxl_time_ids(torch.full((n, 2), float(res)), torch.zeros(n, 2), (res, res))
        cond = build_condition(self._encode_rows(list(prompts)), time_ids)
        if r.guidance_scale == 1 or c.family == "flux":
            return cond, None
        return cond, build_condition(self._encode_rows([""] * n), time_ids)

    def _encode_rows(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Text features of each row, each distinct prompt encoded once (a group repeats its prompt G times); the
        empty prompt of CFG is encoded once per run."""
        distinct = list(dict.fromkeys(prompts))
        if distinct == [""]:
            if self._empty_text is None:
                self._empty_text = self.encode_text([""])
            feats = self._empty_text
        else:
            feats = self.encode_text(distinct)
        index = torch.tensor([distinct.index(p) for p in prompts])
        return {k: v[index.to(v.device)] for k, v in feats.items()}

    def latent_shape(self, n: int) -> tuple[int, int, int, int]:
        """(n, C, h, w) of the VAE latents at ``dataset.resolution``."""
        vae = self.components.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        res = self.config.dataset.resolution
        return n, vae.config.latent_channels, res // factor, res // factor

    def sampler(self):
        """The denoiser that samples (GRPO: the current policy)."""
        return self.policy

    def sampler_window(self, num_steps: int) -> tuple[int, int]:
        """The stochastic steps of this rollout: :func:`~diffalign.online.sde_window` of ``rollout.sde_window_size``
        (drawn with the trainer's generator)."""
        r = self.config.rollout
        return sde_window(num_steps, r.sde_window_size, r.sde_window_range, generator=self.generator)

    def sample(self, prompts: list[str]) -> Rollout:
        """Roll out G images per prompt in micro-batches of ``rollout.sample_batch_size`` and decode them."""
        repeated = [p for p in prompts for _ in range(self.config.rollout.group_size)]
        window = self.sampler_window(self.config.rollout.num_inference_steps)
        chunks = self._roll_out(self.sampler(), repeated, window, self.generator)
        images = torch.cat([self.decode(ch.trajectory.final) for ch in chunks])
        return Rollout(chunks, repeated, images)

    def _roll_out(self, denoiser, prompts: list[str], window: tuple[int, int], generator) -> list[RolloutChunk]:
        """``prompts`` (one image each) rolled out by ``denoiser`` with the ``rollout`` settings, in micro-batches of
        ``rollout.sample_batch_size``; the network is in eval mode meanwhile."""
        c, r, acc = self.components, self.config.rollout, self.accelerator
        size = r.sample_batch_size or len(prompts)
        chunks = []
        self.unet.eval()
        try:
            for start in range(0, len(prompts), size):
                part = prompts[start:start + size]
                cond, uncond = self.rollout_condition(part)
                trajectory = rollout(
                    denoiser, c.noise_scheduler, cond, uncond, self.latent_shape(len(part)),
                    num_inference_steps=r.num_inference_steps, guidance_scale=r.guidance_scale,
                    generator=generator, noise_level=r.noise_level, eta=r.eta, sde_type=r.sde_type,
                    window=window, device=acc.device, dtype=self.weight_dtype)
                chunks.append(RolloutChunk(trajectory, cond, uncond, part))
        finally:
            self.unet.train()
        return chunks

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents (n, C, h, w) to float images (n, 3, H, W) in [0, 1] on the CPU (the pipelines'
        ``x / 2 + 0.5`` clamped)."""
        vae = self.components.vae
        x = unscale_latents(vae, latents.to(vae.device, torch.float32))
        images = vae.decode(x.to(vae.dtype)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1).cpu()

    def score(self, samples: Rollout) -> None:
        """``samples.rewards`` and the record's ``reward``, ``reward/<scorer>``, ``heldout/<scorer>`` and
        ``artefact/<stat>`` (this process's means)."""
        samples.rewards, record = self._score(samples.images, samples.prompts)
        samples.record.update(record)

    def _score(self, images: torch.Tensor, prompts: list[str], prefix: str = "") -> tuple[torch.Tensor, dict]:
        """The reward (N,) and the record of ``images``: reward, held-out and artefact means under ``prefix``."""
        total, per_scorer = self.rewards(images, prompts)
        record = self.rewards.record(total, per_scorer, f"{prefix}reward")
        if self.held_out is not None:
            _, held = self.held_out(images, prompts)
            record.update({f"{prefix}heldout/{k}": float(v.mean()) for k, v in held.items()})
        if self.config.monitor.artefacts != "off":
            record.update(artefact_record(images, prefix=f"{prefix}artefact"))
        return total, record

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The fixed evaluation set of ``monitor.prompts``: ``monitor.images_per_prompt`` images per prompt from the
        current policy on the deterministic sampler, the same initial noise at every evaluation (its own
        generator: the run's random streams are untouched), scored like the rollouts under ``eval/``. Every
        process computes the whole set (same weights, same noise: the same values)."""
        cfg = self.config
        prompts = [p for p in self.eval_prompts.prompts for _ in range(cfg.monitor.images_per_prompt)]
        chunks = self._roll_out(self.policy, prompts, (0, 0), torch.Generator().manual_seed(cfg.seed + 1))
        images = [self.decode(ch.trajectory.final) for ch in chunks]
        return self._score(torch.cat(images), prompts, "eval/")[1]

    def advantages(self, samples: Rollout) -> None:
        """``samples.advantages``: :func:`~diffalign.online.group_advantages` over the rewards of every process
        (groups by prompt text, as flow_grpo's per-prompt tracker), this process's rows."""
        r, acc = self.config.rollout, self.accelerator
        prompts, rewards = list(samples.prompts), samples.rewards.float()
        offset = 0
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            everyone = gather_object([(acc.process_index, prompts, rewards.tolist())])
            everyone.sort(key=lambda e: e[0])
            offset = sum(len(e[1]) for e in everyone[:acc.process_index])
            prompts = [p for e in everyone for p in e[1]]
            rewards = torch.tensor([x for e in everyone for x in e[2]], dtype=torch.float32)
        adv = group_advantages(rewards, prompts, per_prompt=r.per_prompt, global_std=r.global_std)
        samples.advantages = adv[offset:offset + len(samples.prompts)]
        samples.record["zero_advantage_fraction"] = float((samples.advantages == 0).float().mean())

    def train_items(self, samples: Rollout) -> list[tuple[int, int]]:
        """The (chunk, step) pairs one pass trains on, chunk-major: GRPO trains every stochastic step."""
        return [(k, j) for k, ch in enumerate(samples.chunks) for j in ch.trajectory.stochastic_steps]

    def item_loss(self, samples: Rollout, k: int, j: int):
        """The objective on chunk ``k`` at step ``j``: the stored step re-scored with gradient, against its recorded
        log-probability; the reference's step mean (LoRA disabled) for the KL."""
        ch, sched = samples.chunks[k], self.components.noise_scheduler
        step = rescore(self.policy, sched, ch.trajectory, ch.cond, ch.uncond, j, dtype=self.weight_dtype)
        ref_mean = None
        if self.config.objective.params.kl_beta > 0:
            with torch.no_grad():
                ref_mean = rescore(self.reference, sched, ch.trajectory, ch.cond, ch.uncond, j,
                                   dtype=self.weight_dtype).mean
        advantages = samples.advantages[samples.rows(k)].to(step.log_prob.device)
        return self.objective(step.log_prob, ch.trajectory.log_probs[j], advantages, mean=step.mean,
                              ref_mean=ref_mean, std=step.std)

    def update(self, samples: Rollout) -> dict[str, float]:
        """``rollout.num_inner_epochs`` passes over :meth:`train_items`, each split into
        ``rollout.updates_per_rollout`` optimizer updates; a sample with advantage 0 (its group tied) is left out
        of the loss (its rows weigh 0). Returns the metrics averaged over the items, with
        ``ratio/first_update_error`` for GRPO."""
        cfg, acc = self.config, self.accelerator
        r = cfg.rollout
        keep = (samples.advantages != 0).float()
        sums: dict[str, float] = {}
        count = 0
        first_error = 0.0
        items = self.train_items(samples)
        for epoch in range(r.num_inner_epochs):
            order = items
            if epoch > 0:  # later passes visit the micro-batches in a new order
                perm = torch.randperm(len(samples.chunks), generator=self.generator).tolist()
                order = [(k, j) for k in perm for (kk, j) in items if kk == k]
            for u, part in enumerate(_split(order, r.updates_per_rollout)):
                bad = False
                for i, (k, j) in enumerate(part):
                    last = i == len(part) - 1
                    sync = contextlib.nullcontext() if last or acc.num_processes == 1 else acc.no_sync(self.unet)
                    with sync:
                        out = self.item_loss(samples, k, j)
                        w = keep[samples.rows(k)].to(out.losses.device)
                        loss = (out.losses * w).sum() / w.sum().clamp_min(1.0) / len(part)
                        if torch.isfinite(loss):
                            acc.backward(loss)
                        else:
                            bad = True
                    for key, value in out.metrics.items():
                        sums[key] = sums.get(key, 0.0) + value
                    count += 1
                    if epoch == 0 and u == 0 and "ratio_max" in out.metrics:
                        first_error = max(first_error, abs(out.metrics["ratio_max"] - 1),
                                          abs(out.metrics["ratio_min"] - 1))
                self._apply_update(bad)
        metrics = {key: value / max(count, 1) for key, value in sums.items()}
        if "ratio_max" in sums:
            metrics["ratio/first_update_error"] = first_error
            self._check_ratio(first_error)
        metrics["updates"] = float(self.updates)
        return metrics

    def _apply_update(self, bad: bool) -> None:
        """Clip and step on the accumulated gradients unless a loss or gradient is non-finite (then the window is
        marked bad and the gradients dropped)."""
        cfg, acc = self.config, self.accelerator
        if not bad and cfg.mixed_precision != "fp16" and not self._grads_finite():
            bad = True
        if bad:
            self.bad_window = True
        else:
            if cfg.optimizer.max_grad_norm:
                acc.clip_grad_norm_(self.unet.parameters(), cfg.optimizer.max_grad_norm)
            self.optimizer.step()
            self.updates += 1
        self.optimizer.zero_grad(set_to_none=True)

    def _check_ratio(self, error: float) -> None:
        tolerance = self.config.rollout.ratio_tolerance
        if error > tolerance and not self._ratio_warned:
            self._ratio_warned = True
            self.accelerator.print(
                f"diffalign: warning: the first update's importance ratio is off 1 by {error:.2e} (tolerance "
                f"{tolerance:.0e}): the policy that sampled is not the one scored. Keep rollout.sample_batch_size "
                "equal for sampling and training (it is), model.lora.dropout 0, and log-probs in fp32; bf16/fp16 "
                "rollouts drift (docs/online.md)")

    # ------------------------------------------------------------------------------------------ monitor
    def on_record(self, record: dict) -> None:
        """Evaluate the fixed set when due (step 1, then every ``monitor.every`` steps); feed the monitor; when it
        flags: one line, and ``monitor.action`` (checkpoint, or checkpoint and stop)."""
        if self.eval_prompts is not None and (self.step == 1 or self.step % self.config.monitor.every == 0):
            start = self._clock()
            record.update(self.evaluate())
            record["time/eval"] = self._clock() - start
        if self.monitor is None:
            return
        verdict = self.monitor.update(record)
        record["monitor/flagged"] = float(verdict.flagged)
        if not verdict.first:
            return
        acc = self.accelerator
        acc.print(f"diffalign: reward hacking suspected: {verdict.reason}; monitor.action={verdict.action}")
        if verdict.action in ("checkpoint", "stop"):
            self.save_checkpoint()
        if verdict.action == "stop":
            self.stop_reason = f"reward hacking suspected: {verdict.reason}"

    def checkpoint_extras(self):
        tensors, meta = super().checkpoint_extras()
        meta = {**meta, "updates": self.updates}
        if self.monitor is not None:
            meta["monitor"] = self.monitor.state_dict()
        return tensors, meta

    def restore_extras(self, tensors, meta):
        super().restore_extras(tensors, meta)
        self.updates = int(meta.get("updates", 0))
        self._monitor_state = meta.get("monitor")


class NFTTrainer(GRPOTrainer):
    """DiffusionNFT (``objective: nft``): samples of the *old* policy on the deterministic sampler, the NFT loss
    on forward-noised copies of them at the grid's timesteps of the training window, and after each step
    ``old <- d·old + (1-d)·θ`` (:meth:`diffalign.objectives.NFTConfig.old_decay`). LoRA only: the old policy is
    a second set of adapter weights run on the same network.

    Works on both model kinds through :func:`diffalign.likelihood.x0_coefficients` (flow: the official
    :math:`\\hat x_0 = x_t - σ v`; U-Nets: the same loss on the ε/v-prediction's :math:`\\hat x_0`, an extension
    of ours). The loss uses the conditional prediction (official: CFG-free, ``guidance_scale`` 1); rollouts may
    use CFG.
    """

    def setup(self, resume: bool = False, overwrite: bool = False) -> NFTTrainer:
        if self.config.model.lora is None:
            raise ConfigError("model.lora: DiffusionNFT keeps the sampling (old) policy as a second set of LoRA "
                              "weights and needs LoRA (set model.lora)")
        self.old_state: dict[str, torch.Tensor] | None = None
        super().setup(resume=resume, overwrite=overwrite)
        if self.old_state is None:
            self.old_state = {n: v.detach().clone() for n, v in self.trainable_state().items()}
        self.old = SnapshotReference(self.components.family, self.accelerator.unwrap_model(self.unet),
                                     self.config.model.flux_guidance)
        self.old.state = self.old_state
        return self

    def sampler(self):
        return self.old

    def sampler_window(self, num_steps: int) -> tuple[int, int]:
        """The deterministic sampler (no stochastic step)."""
        return 0, 0

    def train_items(self, samples: Rollout) -> list[tuple[int, int]]:
        """(chunk, grid step) pairs: the steps of :meth:`GRPOTrainer.sampler_window` (every step but the last by
        default, as the official ``timestep_fraction`` 0.99), for each chunk."""
        start, end = GRPOTrainer.sampler_window(self, samples.chunks[0].trajectory.num_steps)
        return [(k, j) for k in range(len(samples.chunks)) for j in range(start, end)]

    def item_loss(self, samples: Rollout, k: int, j: int):
        """DiffusionNFT on chunk ``k`` forward-noised to the sampling grid's timestep ``j``: fresh ε,
        :math:`x_t` by the forward process, :math:`\\hat x_0 = a x_t - b o` for the trained, old and reference
        predictions."""
        ch, sched = samples.chunks[k], self.components.noise_scheduler
        x0 = ch.trajectory.final
        n = x0.shape[0]
        t = ch.trajectory.timesteps[j].repeat(n).to(x0.device)
        noise = torch.randn(x0.shape, generator=self.generator).to(x0.device)
        x_t, _ = noisy_sample_and_target(sched, x0, noise, t)
        a, b = x0_coefficients(sched, t, x0.ndim)
        x_in = x_t.to(self.weight_dtype)
        velocity = self.policy(x_in, t, ch.cond).float()
        with torch.no_grad():
            old = self.old(x_in, t, ch.cond).float()
            ref = self.reference(x_in, t, ch.cond).float() if self.config.objective.params.kl_beta > 0 else None
        advantages = samples.advantages[samples.rows(k)].to(x0.device)
        return self.objective(velocity, old, a * x_t.float(), x0.float(), b.reshape(-1), advantages,
                              ref_velocity=ref)

    def after_step(self):
        """``old <- d·old + (1-d)·θ`` with d from the objective's decay schedule at the current update count."""
        d = self.config.objective.params.old_decay(self.updates)
        with torch.no_grad():
            for name, p in self.trainable_state().items():
                self.old_state[name].mul_(d).add_(p.detach().to(self.old_state[name].dtype), alpha=1.0 - d)

    def checkpoint_extras(self):
        tensors, meta = super().checkpoint_extras()
        tensors.update({f"old.{n}": v for n, v in self.old_state.items()})
        return tensors, meta

    def restore_extras(self, tensors, meta):
        super().restore_extras(tensors, meta)
        self.old_state = {k[len("old."):]: v.to(self.accelerator.device) for k, v in tensors.items()
                          if k.startswith("old.")}
