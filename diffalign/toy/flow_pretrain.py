"""Pretrain the toy flow pipeline (``assets/toy-flow``) from scratch on the shapes world (CPU, minutes).

    python -m diffalign.toy pretrain-flow --out assets/toy-flow --seed 0 --threads 1

1. **Data and latents**: the same rendered TRAIN-prompt images as ``pretrain`` (:func:`~diffalign.toy.pretrain
   .training_data`, same seed), encoded once by toy-sd's frozen VAE (:func:`~diffalign.toy.pretrain
   .encode_posteriors`); ``x0 = (μ + σ ξ − shift) · scaling_factor`` (shift 0) is drawn afresh every step.
2. **Transformer + both CLIP encoders**, trained jointly with the rectified-flow loss (Esser et al. 2024):
   ``x_t = (1 − σ) x0 + σ ε``, ``loss = mean((v_θ(x_t, t, c) − (ε − x0))²)``, t from the training grid at a
   logit-normal(0, 1) u (:func:`diffalign.likelihood.sample_flow_timesteps`, :func:`~diffalign.likelihood
   .noisy_sample_and_target`). A caption becomes the empty prompt with probability 0.1 (for CFG); weights
   are an EMA of the iterates. The 77 zero "T5" tokens are computed as one token of multiplicity 77
   (:func:`~diffalign.toy.flow.set_repeated_zero_tokens`: the same function, a third of the cost).
3. **Evaluate** the saved ``StableDiffusion3Pipeline`` with the oracle exactly as ``pretrain`` does
   (:func:`~diffalign.toy.pretrain.evaluate`): caption match, reward and size on TRAIN and HELD-OUT prompts.

Everything random flows from ``--seed`` through explicit generators: same seed, thread count and machine give
the same weights.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..likelihood import FlowTimestepSampling, noisy_sample_and_target, sample_flow_timesteps
from ..models.latents import scale_latents
from .components import DEFAULT_FLOW_GUIDANCE_SCALE, DEFAULT_FLOW_NUM_INFERENCE_STEPS
from .flow import (
    T5_TOKENS,
    ToyFlowConfig,
    build_flow_components,
    build_flow_pipeline,
    encode_token_ids,
    load_toy_vae,
    save_flow_pipeline,
    set_repeated_zero_tokens,
)
from .pretrain import _EMA, REPORT_NAME, _lr_lambda, encode_posteriors, evaluate, training_data


@dataclass
class FlowPretrainConfig:
    """Everything ``pretrain-flow`` needs. The defaults produced ``assets/toy-flow`` (assets/README.md)."""

    seed: int = field(default=0, metadata={"help": "Seeds data, initialisation, noise and evaluation."})
    model: ToyFlowConfig = field(default_factory=ToyFlowConfig)
    n_images: int = field(default=20_000, metadata={"help": "Rendered TRAIN-prompt images (as toy-sd's)."})
    # The shapes world's plain data (what toy-sd was trained on); read by training_data and evaluate.
    aspect_jitter: float = 0.0
    shade_jitter: float = 0.0
    background_jitter: float = 0.0
    cast_jitter: float = 0.0
    steps: int = field(default=3000, metadata={"help": "Transformer + text encoder optimiser steps."})
    batch_size: int = field(default=128, metadata={"help": "Batch size."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW peak lr (linear warm-up, cosine decay)."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    caption_dropout: float = field(default=0.1, metadata={"help": "P(caption -> empty prompt), for CFG."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the trained weights."})
    logit_mean: float = field(default=0.0, metadata={"help": "Logit-normal t sampling: mean."})
    logit_std: float = field(default=1.0, metadata={"help": "Logit-normal t sampling: std."})
    eval_seeds_train: int = field(default=4, metadata={"help": "Generations per TRAIN prompt (78 prompts)."})
    eval_seeds_heldout: int = field(default=16, metadata={"help": "Generations per HELD-OUT prompt (12)."})
    num_inference_steps: int = field(default=DEFAULT_FLOW_NUM_INFERENCE_STEPS,
                                     metadata={"help": "Euler steps."})
    guidance_scale: float = field(default=DEFAULT_FLOW_GUIDANCE_SCALE, metadata={"help": "CFG scale."})

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ToyFlowConfig(**self.model)
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


def train_flow(components: dict, mean: torch.Tensor, std: torch.Tensor, prompt_index: torch.Tensor,
               prompt_ids: torch.Tensor, cfg: FlowPretrainConfig, generator: torch.Generator,
               bar=None) -> list[float]:
    """Transformer and both text encoders, jointly; returns the loss of every step.

    ``mean``, ``std``: (N, 4, 8, 8) raw posteriors; ``prompt_index``: (N,) row of ``prompt_ids`` per image;
    ``prompt_ids``: (P + 1, L), the last row the empty prompt."""
    transformer, scheduler, vae = components["transformer"], components["scheduler"], components["vae"]
    encoders = [components["text_encoder"], components["text_encoder_2"]]
    modules = [transformer, *encoders]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.steps))
    ema = _EMA(params, cfg.ema_decay)
    sampling = FlowTimestepSampling("logit_normal", cfg.logit_mean, cfg.logit_std)
    empty_row = prompt_ids.shape[0] - 1
    set_repeated_zero_tokens(transformer, T5_TOKENS)
    losses = []
    try:
        for _ in range(cfg.steps):
            b = cfg.batch_size
            idx = torch.randint(0, len(mean), (b,), generator=generator)
            x0 = scale_latents(vae, mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator))
            noise = torch.randn(x0.shape, generator=generator)
            t = sample_flow_timesteps(b, scheduler, sampling, generator=generator)  # (B,) float, 1000 σ
            drop = torch.rand(b, generator=generator) < cfg.caption_dropout
            rows = torch.where(drop, torch.full_like(prompt_index[idx], empty_row), prompt_index[idx])
            x_t, target = noisy_sample_and_target(scheduler, x0, noise, t)  # target ε − x0
            embeds, pooled = encode_token_ids(*encoders, prompt_ids, t5_tokens=1)  # (P+1, L+1, D), (P+1, D)
            pred = transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=embeds[rows],
                               pooled_projections=pooled[rows], return_dict=False)[0]
            loss = F.mse_loss(pred, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            ema.update()
            losses.append(loss.item())
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                bar.update(1)
    finally:
        set_repeated_zero_tokens(transformer, None)
    ema.copy_to_params()
    for m in modules:
        m.eval()
    return losses


def pretrain_flow(cfg: FlowPretrainConfig, out_dir: str | Path | None, *, progress: bool = True,
                  run_eval: bool = True) -> dict:
    """Train the toy flow pipeline; returns the report (config, losses, quality, wall times) with the trained
    ``StableDiffusion3Pipeline`` under ``"pipeline"``. With ``out_dir``, save both there."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    components = build_flow_components(cfg.model, seed=cfg.seed, vae=load_toy_vae())
    images, prompt_index, prompt_ids = training_data(cfg, components["tokenizer"])
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    mean, std = encode_posteriors(components["vae"], images)
    timings["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tqdm(total=cfg.steps, desc="pretrain toy-flow", disable=not progress) as bar:
        losses = train_flow(components, mean, std, prompt_index, prompt_ids, cfg, generator, bar)
    timings["transformer_s"] = time.perf_counter() - t0
    pipe = build_flow_pipeline(components)
    t0 = time.perf_counter()
    quality = evaluate(pipe, cfg) if run_eval else {}
    timings["eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    report = {
        "config": cfg.to_dict(),
        "vae": "toy-sd's, frozen (shift_factor 0.0 added)",
        "final_loss": float(np.mean(losses[-50:])),
        "loss_every_100": [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)],
        "quality": quality,
        "wall_time_s": {k: round(v, 1) for k, v in timings.items()},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.machine(), "processor": platform.processor()},
    }
    if out_dir is not None:
        save_flow_pipeline(pipe, out_dir)
        (Path(out_dir) / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    report["pipeline"] = pipe
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m diffalign.toy pretrain-flow",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (a diffusers StableDiffusion3Pipeline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--n-images", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("steps", args.steps), ("n_images", args.n_images)) if v is not None}
    cfg = FlowPretrainConfig(seed=args.seed, **overrides)
    report = pretrain_flow(cfg, args.out, progress=not args.no_progress)
    report.pop("pipeline")
    q = report["quality"]
    print(json.dumps({"wall_time_s": report["wall_time_s"], "final_loss": report["final_loss"],
                      **{f"{s}_{k}": q[s][k] for s in ("train", "heldout")
                         for k in ("match", "reward", "taste")}},
                     indent=2))
    return 0
