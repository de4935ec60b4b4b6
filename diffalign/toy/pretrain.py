"""Pretrain the toy text-to-image pipeline from scratch on procedural shapes (CPU, minutes).

    python -m diffalign.toy pretrain --out assets/toy-sd --seed 0

Three stages, one progress bar:

1. **VAE.** ``AutoencoderKL`` on rendered TRAIN-prompt images in [-1, 1]:
   ``loss = mean((D(z) - x)²) + kl_weight · KL(q(z|x) || N(0, I))`` with ``z ~ q(z|x)`` (KL summed over latent
   elements, averaged over the batch). Afterwards ``scaling_factor = 1 / std(z)`` over the dataset, so that
   ``scaling_factor · z`` has unit variance as the diffusion prior assumes (SD1.x's 0.18215 was found the same way).
2. **U-Net + text encoder**, trained jointly from scratch with the standard ε objective of DDPM (Ho et al. 2020,
   Eq. 14) on cached posteriors: ``z_0 = scaling_factor · (μ + σ ε')``, ``z_t = sqrt(ᾱ_t) z_0 + sqrt(1-ᾱ_t) ε``,
   ``loss = mean_b w(t_b) · mean((ε - ε_θ(z_t, t, τ(c)))²)``, with Min-SNR weights ``w(t) = min(SNR(t), γ) / SNR(t)``
   (Hang et al. 2023, https://arxiv.org/abs/2303.09556, γ = 5) to converge in few steps. A caption is replaced by
   the empty prompt with probability 0.1 so classifier-free guidance works. Weights are an EMA of the iterates.
3. **Evaluate** the saved ``StableDiffusionPipeline`` with the oracle: VAE reconstruction MSE, caption-match rate and
   reward of generations on TRAIN and HELD-OUT prompts, and the size distribution (the taste attribute).

Everything random flows from ``--seed`` through explicit ``torch.Generator`` / numpy generators, so two runs with the
same seed and thread count on the same machine give the same weights.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .components import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NUM_INFERENCE_STEPS,
    ToyModelConfig,
    build_components,
    build_pipeline,
    generate,
    save_pipeline,
)
from .oracle import as_numpy_images, oracle_terms
from .shapes import heldout_prompts, render_batch, sample_captions, train_prompts

REPORT_NAME = "training_report.json"


@dataclass
class PretrainConfig:
    """Everything ``pretrain`` needs. The defaults produced ``assets/toy-sd`` (see ``assets/README.md``)."""

    seed: int = field(default=0, metadata={"help": "Seeds data, initialisation, noise and evaluation."})
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    # Data.
    n_images: int = field(default=20_000, metadata={"help": "Rendered TRAIN-prompt images shared by both stages."})
    aspect_jitter: float = field(default=0.0, metadata={
        "help": "Elongation jitter A of the rendered shapes, α ~ U[-A, A] (diffalign.toy.shapes); 0: as wide as tall."})
    shade_jitter: float = field(default=0.0, metadata={
        "help": "Shade jitter L of the shapes' fill, λ ~ U[-L, L] (diffalign.toy.shapes); 0: the palette colour."})
    background_jitter: float = field(default=0.0, metadata={
        "help": "Shade jitter M of the background, μ ~ U[-M, M] (diffalign.toy.shapes); 0: the palette colour."})
    cast_jitter: float = field(default=0.0, metadata={
        "help": "Colour-cast jitter T of the whole image, τ ~ U[-T, T] toward warm or cold (diffalign.toy.shapes)."})
    # VAE.
    vae_steps: int = field(default=600, metadata={"help": "VAE optimiser steps."})
    vae_batch_size: int = field(default=64, metadata={"help": "VAE batch size."})
    vae_lr: float = field(default=2e-3, metadata={"help": "VAE AdamW peak learning rate (cosine decay)."})
    kl_weight: float = field(default=1e-5, metadata={"help": "Weight of the KL term of the VAE loss."})
    # U-Net + text encoder.
    unet_steps: int = field(default=1500, metadata={"help": "U-Net + text encoder optimiser steps."})
    unet_batch_size: int = field(default=128, metadata={"help": "U-Net batch size."})
    unet_lr: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate (linear warm-up, cosine decay)."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps of both stages."})
    caption_dropout: float = field(default=0.1, metadata={"help": "P(caption -> empty prompt), for CFG."})
    min_snr_gamma: float = field(default=5.0, metadata={"help": "γ of Min-SNR weighting; 0 disables it."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of U-Net and text-encoder weights."})
    # Evaluation.
    eval_seeds_train: int = field(default=4, metadata={"help": "Generations per TRAIN prompt (78 prompts)."})
    eval_seeds_heldout: int = field(default=16, metadata={"help": "Generations per HELD-OUT prompt (12 prompts)."})
    num_inference_steps: int = field(default=DEFAULT_NUM_INFERENCE_STEPS, metadata={"help": "DDIM steps."})
    guidance_scale: float = field(default=DEFAULT_GUIDANCE_SCALE, metadata={"help": "CFG scale."})

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ToyModelConfig(**self.model)
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f


def _to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class _EMA:
    """Exponential moving average of parameters, ``θ_ema <- d θ_ema + (1 - d) θ`` with ``d = min(decay, (1+k)/(10+k))``."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.decay = decay
        self.step = 0

    @torch.no_grad()
    def update(self):
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)
        self.step += 1

    @torch.no_grad()
    def copy_to_params(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def train_vae(vae, images: np.ndarray, cfg: PretrainConfig, generator: torch.Generator, bar=None) -> list[float]:
    """Stage 1. ``images``: uint8 (N, 32, 32, 3). Returns the loss of every step."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.vae_steps))
    losses = []
    for _ in range(cfg.vae_steps):
        idx = torch.randint(0, len(images), (cfg.vae_batch_size,), generator=generator)
        x = _to_model_range(images[idx.numpy()])  # (B, 3, 32, 32)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)  # (B, 4, 8, 8)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(stage="vae", loss=f"{loss.item():.4f}")
            bar.update(1)
    vae.eval()
    return losses


@torch.no_grad()
def encode_posteriors(vae, images: np.ndarray, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: two (N, C, h, w) tensors."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(_to_model_range(images[i : i + batch_size])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_denoiser(
    components: dict,
    mean: torch.Tensor,
    std: torch.Tensor,
    prompt_index: torch.Tensor,
    prompt_ids: torch.Tensor,
    cfg: PretrainConfig,
    generator: torch.Generator,
    bar=None,
) -> list[float]:
    """Stage 2: U-Net and text encoder, jointly. Returns the loss of every step.

    ``mean``, ``std``: (N, C, h, w) posteriors; ``prompt_index``: (N,) row of ``prompt_ids`` for each image;
    ``prompt_ids``: (P + 1, L) token ids of the prompts, the last row being the empty prompt (caption dropout).
    """
    unet, text_encoder, scheduler = components["unet"], components["text_encoder"], components["scheduler"]
    scaling = components["vae"].config.scaling_factor
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.unet_steps))
    ema = _EMA(params, cfg.ema_decay)
    alphas_cumprod = scheduler.alphas_cumprod
    empty_row = prompt_ids.shape[0] - 1
    losses = []
    for _ in range(cfg.unet_steps):
        b = cfg.unet_batch_size
        idx = torch.randint(0, len(mean), (b,), generator=generator)
        eps_post = torch.randn(mean[idx].shape, generator=generator)
        z0 = scaling * (mean[idx] + std[idx] * eps_post)  # (B, 4, 8, 8)
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
        drop = torch.rand(b, generator=generator) < cfg.caption_dropout
        rows = torch.where(drop, torch.full_like(prompt_index[idx], empty_row), prompt_index[idx])
        z_t = scheduler.add_noise(z0, noise, t)
        cond = text_encoder(prompt_ids[rows])[0]  # (B, L, D)
        pred = unet(z_t, t, encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        if cfg.min_snr_gamma > 0:
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            per_sample = per_sample * torch.clamp(snr, max=cfg.min_snr_gamma) / snr
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(stage="unet", loss=f"{loss.item():.4f}")
            bar.update(1)
    ema.copy_to_params()
    unet.eval()
    text_encoder.eval()
    return losses


def _size_summary(half_size: np.ndarray) -> dict:
    q = np.quantile(half_size, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "mean": float(half_size.mean()),
        "std": float(half_size.std()),
        "q10_q25_q50_q75_q90": [round(float(v), 2) for v in q],
    }


def summarise_terms(terms: dict[str, np.ndarray]) -> dict:
    """Means of the oracle terms plus the half-size distribution of the matching images."""
    out = {k: float(v.mean()) for k, v in terms.items() if k != "half_size"}
    out["n"] = int(len(terms["reward"]))
    out["half_size"] = _size_summary(terms["half_size"][terms["match"] > 0] if terms["match"].any() else terms["half_size"])
    return out


@torch.no_grad()
def evaluate(pipe, cfg: PretrainConfig) -> dict:
    """Oracle quality of a pipeline: VAE reconstruction and generations on TRAIN / HELD-OUT prompts."""
    report: dict = {}
    # VAE reconstruction on fresh renders of every prompt (seed offset keeps them out of the training set).
    prompts_all = train_prompts() + heldout_prompts()
    caps = sample_captions(len(prompts_all) * 4, cfg.seed + 1, prompts_all)
    images, _ = render_batch(caps, cfg.seed + 1, cfg.aspect_jitter, cfg.shade_jitter, cfg.background_jitter,
                             cfg.cast_jitter)
    x = _to_model_range(images)
    recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    recon01 = (recon + 1) / 2
    report["vae_recon_mse"] = float(((recon01 - (x + 1) / 2) ** 2).mean())
    report["vae_recon_match"] = float(oracle_terms(recon01, caps)["match"].mean())
    report["data"] = summarise_terms(oracle_terms(images, caps))
    for name, prompts, n_seeds in (
        ("train", train_prompts(), cfg.eval_seeds_train),
        ("heldout", heldout_prompts(), cfg.eval_seeds_heldout),
    ):
        caps = [p for p in prompts for _ in range(n_seeds)]
        seeds = [cfg.seed * 100_000 + 1_000 + i for i in range(len(caps))]
        gen = generate(
            pipe, caps, seeds, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale
        )
        report[name] = summarise_terms(oracle_terms(gen, caps))
    return report


def training_data(cfg, tokenizer) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """The rendered TRAIN-prompt data of ``cfg`` (its ``n_images``, ``seed`` and jitters): images uint8
    (N, 32, 32, 3), ``prompt_index`` (N,) into the prompt rows, and ``prompt_ids`` (P + 1, L): the tokenized
    TRAIN prompts, then the empty prompt (caption dropout). Shared by the U-Net and the flow pretraining."""
    prompts = train_prompts()
    captions = sample_captions(cfg.n_images, cfg.seed, prompts)
    images, _ = render_batch(  # (N, 32, 32, 3) uint8
        captions, cfg.seed, cfg.aspect_jitter, cfg.shade_jitter, cfg.background_jitter, cfg.cast_jitter)
    lookup = {p: i for i, p in enumerate(prompts)}
    prompt_index = torch.tensor([lookup[c] for c in captions])
    prompt_ids = tokenizer(
        prompts + [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # (P + 1, L)
    return images, prompt_index, prompt_ids


def pretrain(
    cfg: PretrainConfig, out_dir: str | Path | None, *, progress: bool = True, run_eval: bool = True
) -> dict:
    """Train the toy pipeline and return a report (config, losses, quality, wall times) whose ``"pipeline"`` entry
    is the trained ``StableDiffusionPipeline``. With ``out_dir``, save the pipeline there with the report as
    ``training_report.json``. ``run_eval=False`` skips stage 3 (``report["quality"]`` is then empty)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    components = build_components(cfg.model, seed=cfg.seed)
    tokenizer = components["tokenizer"]

    images, prompt_index, prompt_ids = training_data(cfg, tokenizer)

    timings: dict[str, float] = {}
    with tqdm(total=cfg.vae_steps + cfg.unet_steps, desc="pretrain toy-sd", disable=not progress) as bar:
        t0 = time.perf_counter()
        vae_losses = train_vae(components["vae"], images, cfg, generator, bar)
        timings["vae_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        mean, std = encode_posteriors(components["vae"], images)
        z = mean + std * torch.randn(mean.shape, generator=generator)
        latent_std = float(z.std())
        components["vae"].register_to_config(scaling_factor=1.0 / latent_std)
        timings["encode_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        unet_losses = train_denoiser(components, mean, std, prompt_index, prompt_ids, cfg, generator, bar)
        timings["unet_s"] = time.perf_counter() - t0

    pipe = build_pipeline(components)
    t0 = time.perf_counter()
    quality = evaluate(pipe, cfg) if run_eval else {}
    timings["eval_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    report = {
        "config": cfg.to_dict(),
        "latent_std": latent_std,
        "scaling_factor": 1.0 / latent_std,
        "final_loss": {"vae": float(np.mean(vae_losses[-50:])), "unet": float(np.mean(unet_losses[-50:]))},
        "quality": quality,
        "wall_time_s": {k: round(v, 1) for k, v in timings.items()},
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        save_pipeline(pipe, out_dir, cfg.model)
        (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    report["pipeline"] = pipe
    return report


def load_report(model_dir: str | Path) -> dict:
    """The ``training_report.json`` next to a pretrained toy pipeline."""
    return json.loads((Path(model_dir) / REPORT_NAME).read_text())


def config_from_args(args) -> PretrainConfig:
    """The :class:`PretrainConfig` the command line asks for: defaults unless a flag is given."""
    overrides = {k: v for k, v in (("vae_steps", args.vae_steps), ("unet_steps", args.unet_steps),
                                   ("n_images", args.n_images), ("aspect_jitter", args.aspect_jitter),
                                   ("shade_jitter", args.shade_jitter),
                                   ("background_jitter", args.background_jitter),
                                   ("cast_jitter", args.cast_jitter))
                 if v is not None}
    if args.unet_down_block_types:
        overrides["model"] = ToyModelConfig(unet_down_block_types=tuple(args.unet_down_block_types))
    return PretrainConfig(seed=args.seed, **overrides)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m diffalign.toy pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (a diffusers StableDiffusionPipeline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--n-images", type=int, default=None)
    p.add_argument("--unet-down-block-types", nargs="+", default=None, metavar="BLOCK",
                   help="U-Net down blocks, highest resolution first (default: DownBlock2D CrossAttnDownBlock2D; the "
                        "PPD toy base adds cross-attention at 8x8: CrossAttnDownBlock2D CrossAttnDownBlock2D)")
    p.add_argument("--aspect-jitter", type=float, default=None, metavar="A",
                   help="draw each shape's elongation log(w/h) from U[-A, A] (default 0)")
    p.add_argument("--shade-jitter", type=float, default=None, metavar="L",
                   help="shade each shape's colour by λ ~ U[-L, L] toward white (λ > 0) or black (default 0; the PPD "
                        "toy base uses 0.3)")
    p.add_argument("--background-jitter", type=float, default=None, metavar="M",
                   help="shade each background's colour by μ ~ U[-M, M] the same way (default 0; the PPD toy base "
                        "uses 0.3)")
    p.add_argument("--cast-jitter", type=float, default=None, metavar="T",
                   help="blend each image toward warm (τ > 0) or cold by |τ|, τ ~ U[-T, T] (default 0; the PPD toy "
                        "base uses 0.2)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = pretrain(config_from_args(args), args.out, progress=not args.no_progress)
    report.pop("pipeline")
    q = report["quality"]
    print(json.dumps({"wall_time_s": report["wall_time_s"], "vae_recon_mse": q["vae_recon_mse"],
                      "vae_recon_match": q["vae_recon_match"],
                      **{f"{s}_{k}": q[s][k] for s in ("train", "heldout") for k in ("match", "reward", "taste")}},
                     indent=2))
    return 0
