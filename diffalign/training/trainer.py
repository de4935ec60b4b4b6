"""The preference-training recipe: one class with ``setup()``, ``train()`` and ``cleanup()``.

Each optimizer step: decode a batch of B pairs (or take their VAE latents from the cache), encode the prompts,
draw (t, ε) shared by winner and loser, run the policy U-Net **once** on the ``[winners; losers]`` batch (2B)
with gradients and the reference **once** without, hand the per-sample errors to the configured objective,
step. Runs on ``accelerate``: ``accelerate launch -m diffalign.cli train cfg.yaml`` shards the data over
processes.

The recipe holds no objective math; it only asks the objective whether it needs a reference. The loop calls
named steps, and recipes override them (:data:`RECIPES` maps an objective to its recipe):

==========================  ======================================================  ==============================
step                        does                                                    overridden by
==========================  ======================================================  ==============================
``configure_model``         what trains (LoRA adapters or the whole U-Net)           PPD (adds the user branch)
``trainable_parameters``    the one list the optimizer, EMA and the log line use     PPD
``build_reference``         the frozen model of the log-ratio                        SePPO (snapshot pool), PPD
``build_dataset``           ``self.dataset`` (pairs) and the latent cache             GRPO/NFT (a prompt list)
``batches()``               the micro-batches from the resume point on               GRPO/NFT (prompt batches)
``inputs(batch)``           ``(x0_pairs (2B, ...), cond)``: latents and condition    SePPO (sampled losers)
``condition(batch)``        the 2B condition (prompt dropout, dual captions)         PPD (user tokens)
``noise(x0_pairs, cond)``   ``(t, ε)`` for the forward process                       InPO (DDIM inversion)
``errors(x0, cond, t, ε)``  policy and reference errors (:class:`PairErrors`)
``compute_loss(batch)``     the objective on one micro-batch                         PPD (adds a metric)
``training_step(batch)``    loss, backward, clip, optimizer update                   GRPO/NFT (sample, score,
                                                                                     advantages, update)
``export``                  the trained weights in ``output_dir``                    PPD (the user branch)
==========================  ======================================================  ==============================
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import EmbeddingCache, PairTransform, PreferencePairs, ResumableSampler, cache_key, collate_pairs
from ..likelihood import FLOW_WEIGHTINGS, WEIGHTINGS, PairErrors, pair_timesteps_and_noise, preference_errors
from ..models import (
    Components,
    UNetCondition,
    add_lora,
    default_target_modules,
    load_components,
    make_denoiser,
    make_reference,
    save_lora,
    scale_latents,
    set_attention_backend,
)
from ..models.text import build_condition, encode_prompts, sdxl_time_ids
from ..objectives import ObjectiveOutput, build_objective, get_objective_spec
from . import checkpoint as ckpt
from .config import TrainConfig, dump_config


class UnreadableDataError(RuntimeError):
    """Too few pairs of the dataset can be decoded to train on."""


class ResumeMismatchError(RuntimeError):
    """The checkpoint to resume does not fit the model built from the config."""


class LaunchError(RuntimeError):
    """The processes started by the launcher are not the processes accelerate set up."""


def _check_world_size(num_processes: int) -> None:
    """Refuse to run one copy per process when the launcher asked for several (torchrun on CPU without
    ``ACCELERATE_USE_CPU=1``, or ``accelerate launch --multi_gpu`` on a machine without GPUs)."""
    asked = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if asked > num_processes:
        raise LaunchError(
            f"the launcher started {asked} processes (WORLD_SIZE={asked}) but accelerate set up "
            f"{num_processes}: each would train its own copy on the same output_dir. On CPU launch with "
            f"`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {asked} -m diffalign.cli train ...`; "
            "on GPUs with `accelerate launch -m diffalign.cli train ...`")


# What the flow transformers (SD3/FLUX) do not run yet, and why.
FLOW_UNSUPPORTED = {
    "inpo": "InPO inverts the DDPM sampler (DDIM); a flow-ODE inversion is not built yet",
    "ppd": "PPD's user branch sits next to U-Net cross-attention; SD3/FLUX use joint attention",
}


def _check_flow_support(components, cfg) -> None:
    """One line, before anything trains, for what a flow model cannot run: an objective, an attention backend, a
    weighting of the other scheduler family (``snr``/``min_snr`` are DDPM; ``sigma_sqrt``/``cosmap`` flow)."""
    from .config import ConfigError

    name, family = cfg.objective.name, components.family
    if not components.is_flow:
        if cfg.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting: {cfg.weighting!r} is for flow models (sd3, flux); {family} takes "
                              f"{', '.join(WEIGHTINGS)}")
        return
    if name in FLOW_UNSUPPORTED:
        raise ConfigError(f"objective: {name} does not run on {family} yet ({FLOW_UNSUPPORTED[name]}); "
                          "use dpo, mapo, dcpo or seppo")
    if cfg.model.attention != "sdpa":
        raise ConfigError(f"model.attention: {family} transformers run their own SDPA joint attention; "
                          f"{cfg.model.attention!r} applies to U-Nets only")
    if cfg.weighting not in FLOW_WEIGHTINGS:
        raise ConfigError(f"weighting: {cfg.weighting!r} is for DDPM U-Nets; {family} takes "
                          f"{', '.join(FLOW_WEIGHTINGS)}")


def _check_sharding(distributed_type) -> None:
    """Checkpoints and the export hold whole weights on each process (DDP): refuse sharded launches up front."""
    from accelerate.utils import DistributedType

    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise LaunchError(f"{distributed_type.value} is not supported yet: checkpoints and the export assume every "
                          "process holds the whole weights. Launch with DDP (`accelerate launch` without an "
                          "FSDP/DeepSpeed config) and LoRA, which fits SD1.5/SDXL on one GPU each")


class RunExistsError(RuntimeError):
    """The output directory holds another run's checkpoints."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with NaN/inf loss or gradients."""


class PreferenceTrainer:
    """Diffusion preference fine-tuning (Diffusion-DPO and every registered objective).

    >>> trainer = PreferenceTrainer(load_config("configs/sd15_dpo.yaml"))  # doctest: +SKIP
    >>> trainer.setup(); trainer.train(); trainer.cleanup()                 # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig, components: Components | None = None):
        self.config = config
        self.components = components
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.step = 0
        self.epoch = 0
        self.position = 0  # indices of the current epoch already consumed by this process
        self.num_skipped = 0  # unreadable pairs met, counting repeats over epochs
        self.met_here = [0, 0]  # pairs met by this process since it started (or resumed): readable, not
        self.unreadable: dict[int, str] = {}  # index -> why it could not be read
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0
        self.history: list[dict] = []
        self.window: list[dict] = []  # metrics of the micro-batches of the accumulation window under way
        self.bad_window = False  # a non-finite loss or gradient in the window: its update is skipped
        self.stop_reason: str | None = None  # set by a recipe to end the run early (the online monitor's stop)

    # ------------------------------------------------------------------ setup
    def setup(self, resume: bool = False, overwrite: bool = False) -> PreferenceTrainer:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        cfg = self.config
        needed = trainer_class(cfg)
        if not isinstance(self, needed):
            raise TypeError(f"objective {cfg.objective.name!r} trains with {needed.__module__}.{needed.__name__}, "
                            f"not {type(self).__name__}: build the trainer with trainer_class(config)(config)")
        existing = ckpt.list_checkpoints(self.checkpoint_dir)
        if existing and not resume and not overwrite:
            raise RunExistsError(
                f"{self.output_dir} already holds checkpoints of a run ({existing[-1].name}); "
                "pass --resume to continue it or --overwrite to start over"
            )
        finished = self.output_dir / "summary.json"
        if finished.exists() and not existing and not overwrite:
            raise RunExistsError(f"{self.output_dir} holds a finished run ({finished.name}) and no "
                                 "checkpoint to resume from; pass --overwrite to replace it or choose "
                                 "another output_dir")
        latest = ckpt.latest_checkpoint(self.checkpoint_dir) if resume else None
        if latest is not None and ckpt.checkpoint_step(latest) > cfg.max_steps:
            raise RunExistsError(f"--resume: {latest.name} is past max_steps={cfg.max_steps}; resuming would "
                                 "move the run backwards (raise max_steps, or --overwrite to start over)")
        if overwrite and not resume and self.output_dir.exists():
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            (self.output_dir / "metrics.jsonl").unlink(missing_ok=True)
            (self.output_dir / "summary.json").unlink(missing_ok=True)
        # A process may run several trainers (tests, notebooks, the objectives comparison): accelerate keeps
        # one global AcceleratorState, so drop it (keeping the distributed PartialState) before configuring a
        # new one.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            log_with=cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")),
        )
        _check_world_size(acc.num_processes)
        _check_sharding(acc.distributed_type)
        set_seed(cfg.seed)
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16,
                             "bf16": torch.bfloat16}[cfg.mixed_precision]

        m = cfg.model
        if self.components is None:
            self.components = load_components(
                m.pretrained, family=m.family, revision=m.revision, variant=m.variant, vae=m.vae,
                prediction_type=m.prediction_type,
            )
        c = self.components
        _check_flow_support(c, cfg)
        if m.prediction_type is not None:
            c.noise_scheduler.register_to_config(prediction_type=m.prediction_type)
        # The VAE stays fp32 (fp16 SD/SDXL VAEs overflow to NaN); text encoders run in the mixed-precision
        # dtype.
        for frozen in (c.vae, *c.text_encoders()):
            frozen.requires_grad_(False).eval().to(acc.device)
            if frozen is not c.vae and self.weight_dtype != torch.float32:
                frozen.to(dtype=self.weight_dtype)
        unet = c.denoiser_module  # the trained network: a U-Net, or the SD3/FLUX transformer
        if not c.is_flow:  # the transformers keep their own (SDPA) joint-attention processors
            set_attention_backend(unet, m.attention)
        if m.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

        self.objective, spec = build_objective(cfg.objective.name, cfg.objective.params)
        self.configure_model(unet)
        unet.train()
        # One list for the optimizer, EMA, checkpoints and the log line.
        params = self.trainable_parameters()
        self.optimizer = self._make_optimizer(params)
        # Before accelerate.prepare: a frozen copy must not copy accelerate's forward wrappers.
        self.reference = self.build_reference(unet) if spec.needs_reference else None
        self.unet, self.optimizer = acc.prepare(unet, self.optimizer)
        self.policy = make_denoiser(c.family, self.unet, m.flux_guidance)
        self.ema = None
        if cfg.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(params, decay=cfg.ema_decay)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            cfg.optimizer.lr_scheduler, self.optimizer,
            num_warmup_steps=cfg.optimizer.warmup_steps, num_training_steps=cfg.max_steps,
        )

        if cfg.dataset.resolution is None:
            cfg.dataset.resolution = c.native_resolution
        self.build_dataset()
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000 + acc.process_index)

        self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            (self.output_dir / "config.yaml").write_text(dump_config(cfg))
        if resume:
            self._resume()
        if cfg.report_to and acc.is_main_process:
            acc.init_trackers("diffalign", config=_flat_scalars(cfg.to_dict()))
        acc.print(
            f"diffalign: {cfg.objective.name} on {c.source} ({c.family}), {self.data_summary()}, "
            f"{'LoRA r=%d' % m.lora.rank if m.lora else 'full fine-tuning'}, "
            f"{sum(p.numel() for p in params):,} trainable params, {cfg.dataset.resolution} px, device {acc.device}, "
            f"{acc.num_processes} process{'es' if acc.num_processes > 1 else ''}"
        )
        return self

    def build_dataset(self) -> None:
        """``self.dataset`` (the preference pairs, with the objective's dual captions) and ``self.cache`` (VAE
        latents and text embeddings under ``dataset.cache_dir``, else None)."""
        cfg, c, m, d = self.config, self.components, self.config.model, self.config.dataset
        spec = get_objective_spec(cfg.objective.name)
        transform = PairTransform(d.resolution, d.center_crop, d.random_flip)
        self.dataset = PreferencePairs(
            d.source, split=d.split, transform=transform, keep_ties=d.keep_ties, max_samples=d.max_samples,
            seed=cfg.seed, caption_column=d.caption_column,
        )
        if spec.dual_captions:
            self.dataset.dual_captions = self._dual_captions(cfg.objective.params)
        self.cache = None
        if d.cache_dir:
            key_fields = dict(model=c.source, revision=m.revision, variant=m.variant, vae=m.vae,
                              family=c.family, resolution=d.resolution, center_crop=d.center_crop,
                              dataset=str(d.source), split=d.split, keep_ties=d.keep_ties,
                              max_samples=d.max_samples)
            self.cache = EmbeddingCache(d.cache_dir, cache_key(**key_fields), meta=key_fields)
            self.dataset.latent_cache = self.cache
            self.cache_both_flips = self._caches_both_flips()
            if d.precompute_text:
                self._precompute_text()

    def _caches_both_flips(self) -> bool:
        """``dataset.cache_flips`` resolved: cache the other flip too when some pair is visited again."""
        cfg, d = self.config, self.config.dataset
        if not d.random_flip or d.cache_flips == "drawn":
            return False
        visits = cfg.max_steps * cfg.batch_size * cfg.gradient_accumulation_steps * self.accelerator.num_processes
        return d.cache_flips == "both" or visits > len(self.dataset)

    def data_summary(self) -> str:
        """The data part of the start-up line."""
        stats = self.dataset.stats
        flips = ""
        if self.cache is not None and self.config.dataset.random_flip:
            flips = f", cache {'both flips' if self.cache_both_flips else 'the drawn flip'} per pair"
        return (f"{len(self.dataset)} pairs (ties dropped {stats.ties_dropped}, "
                f"bad labels {stats.bad_labels_dropped}){flips}")

    def _dual_captions(self, params):
        from ..data.captions import WordSwap, caption_vocabulary, load_captioner
        from ..data.pairs import DualCaptions

        vocab = caption_vocabulary(self.dataset.caption(i) for i in range(min(len(self.dataset), 2000)))
        captioner = load_captioner(params.captioner) if params.captioner else None
        columns = tuple(params.caption_columns) if params.caption_columns else None
        if params.loser_caption in ("column", "hybrid") and captioner is None:
            # fail at setup, not mid-run, when the columns are missing
            self.dataset.image_captions(0, columns)
        return DualCaptions(params.loser_caption, WordSwap(params.swap_fraction, vocab), captioner, columns)

    def _precompute_text(self):
        """Every caption of the data set (and the empty prompt) into the cache, encoded once by the main process;
        then the text encoders move to the CPU. A caption the cache misses later (e.g. DCPO's word swaps) is
        encoded there."""
        acc = self.accelerator
        if acc.is_main_process:
            captions = sorted({self.dataset.caption(i) for i in range(len(self.dataset))} | {""})
            todo = [p for p in captions if not self.cache.has_text(p)]
            for i in tqdm(range(0, len(todo), 64), desc="text embeddings", disable=not todo, dynamic_ncols=True):
                self.encode_text(todo[i:i + 64])
        acc.wait_for_everyone()
        for encoder in self.components.text_encoders():
            encoder.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ named steps recipes override
    def configure_model(self, unet) -> None:
        """Decide what trains: LoRA adapters on the frozen network (``model.lora``; target modules default to the
        family's, :func:`~diffalign.models.default_target_modules`), else the whole network."""
        m, device = self.config.model, self.accelerator.device
        if m.lora is None:
            unet.requires_grad_(True).to(device)
            return
        unet.requires_grad_(False).to(device)
        if self.weight_dtype != torch.float32:
            unet.to(dtype=self.weight_dtype)
        targets = m.lora.target_modules or default_target_modules(self.components.family)
        add_lora(unet, m.lora.rank, m.lora.alpha, targets, m.lora.dropout, m.lora.init)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters that train, in a fixed order: the optimizer, EMA and the log line all take this list."""
        return [p for p in self.components.denoiser_module.parameters() if p.requires_grad]

    def build_reference(self, unet):
        """The frozen model of the objective's log-ratio: the same network with adapters disabled (LoRA), else a
        frozen copy taken now (full fine-tuning)."""
        m = self.config.model
        return make_reference(self.components.family, unet, frozen_copy=m.lora is None, dtype=self.weight_dtype,
                              guidance_scale=m.flux_guidance)

    def export(self) -> None:
        """Write the trained weights to ``output_dir``: the LoRA (``pipeline.load_lora_weights`` reads it) or the
        whole network in the pipeline's subfolder name (``unet/``, or ``transformer/`` for SD3/FLUX)."""
        unet = self.accelerator.unwrap_model(self.unet)
        if self.config.model.lora is not None:
            save_lora(unet, self.output_dir, sdxl=self.components.is_sdxl)
        else:
            folder = "transformer" if self.components.is_flow else "unet"
            unet.save_pretrained(str(self.output_dir / folder), safe_serialization=True)

    def _make_optimizer(self, params):
        o = self.config.optimizer
        kw = dict(lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay,
                  eps=o.adam_epsilon)
        if o.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ImportError("optimizer.use_8bit_adam needs bitsandbytes: "
                                  "`pip install diffalign[bnb]`") from None
            return bnb.optim.AdamW8bit(params, **kw)
        return torch.optim.AdamW(params, **kw)

    # ------------------------------------------------------------------ one step's math
    def encode_latents(self, batch: dict) -> torch.Tensor:
        """``[winners; losers]`` VAE latents (2B, C, h, w), ``z = (μ + σ ξ − shift_factor) · scaling_factor``
        (no shift for SD1.x/SDXL)."""
        c, acc = self.components, self.accelerator
        b = batch["size"]
        mean = std = None
        if batch.get("pixel_rows"):
            pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]]).to(
                acc.device, torch.float32)  # (2P, 3, R, R)
            m_new, s_new = self._posterior(pixels)  # (P, 2, C, h, w)
            if self.cache is not None:
                self._cache_posteriors(batch, pixels, m_new, s_new)
            mean = torch.empty((b, *m_new.shape[1:]), device=acc.device)
            std = torch.empty_like(mean)
            mean[batch["pixel_rows"]], std[batch["pixel_rows"]] = m_new, s_new
        if batch.get("latent_rows"):
            lm, ls = (batch["latent_mean"].to(acc.device, torch.float32),
                      batch["latent_std"].to(acc.device, torch.float32))
            if mean is None:
                mean, std = (torch.empty((b, *lm.shape[1:]), device=acc.device),
                             torch.empty((b, *lm.shape[1:]), device=acc.device))
            mean[batch["latent_rows"]], std[batch["latent_rows"]] = lm, ls
        xi = torch.randn(mean.shape, generator=self.generator).to(acc.device)
        z = scale_latents(c.vae, mean + std * xi)  # (B, 2, C, h, w): (x − shift) · scale
        return torch.cat([z[:, 0], z[:, 1]]).to(self.weight_dtype)  # (2B, C, h, w): winners then losers

    def _posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior ``(μ, σ)`` of ``[winners; losers]`` pixels (2P, 3, R, R), each (P, 2, C, h, w)."""
        with torch.no_grad():
            dist = self.components.vae.encode(pixels).latent_dist
        p = len(pixels) // 2
        return (torch.stack([dist.mean[:p], dist.mean[p:]], dim=1),
                torch.stack([dist.std[:p], dist.std[p:]], dim=1))

    def _cache_posteriors(self, batch: dict, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the freshly encoded pairs under their (index, flip) and, when :meth:`_caches_both_flips`, the
        posterior of the mirrored pixels under the other flip, so every later epoch hits whichever it draws."""
        others = self._posterior(pixels.flip(-1)) if self.cache_both_flips else None
        for j, row in enumerate(batch["pixel_rows"]):
            index, flip = int(batch["indices"][row]), bool(batch["flips"][row])
            extra = {"original_size": batch["original_sizes"][row], "crop_top_left": batch["crops_top_left"][row]}
            self.cache.put_latents(index, flip, mean[j], std[j], **extra)
            if others is not None:
                self.cache.put_latents(index, not flip, others[0][j], others[1][j], **extra)

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Per-caption text features, from the cache when present."""
        c, acc = self.components, self.accelerator
        feats: list[dict | None] = [self.cache.get_text(p) if self.cache else None for p in captions]
        missing = [i for i, f in enumerate(feats) if f is None]
        if missing:
            with torch.no_grad():
                new = encode_prompts(c, [captions[i] for i in missing], device=c.text_encoder.device)
            for j, i in enumerate(missing):
                feats[i] = {k: v[j] for k, v in new.items()}
                if self.cache is not None:
                    self.cache.put_text(captions[i], feats[i])
        return {k: torch.stack([f[k] for f in feats]).to(acc.device, self.weight_dtype) for k in feats[0]}

    def condition(self, batch: dict) -> UNetCondition:
        """U-Net condition for the 2B batch: winner and loser share the prompt (and SDXL time ids), unless the
        batch carries the losers' own captions (DCPO), then it is ``[c(z_w); c(z_l)]``."""
        captions = list(batch["captions"])
        losers = list(batch["captions_l"]) if "captions_l" in batch else None
        p_empty = self.config.dataset.proportion_empty_prompts
        if p_empty > 0:
            drop = (torch.rand(len(captions), generator=self.generator) < p_empty).tolist()
            captions = ["" if d else cap for cap, d in zip(captions, drop)]
            losers = losers and ["" if d else cap for cap, d in zip(losers, drop)]
        time_ids = None
        if self.components.is_sdxl:
            r = self.config.dataset.resolution
            time_ids = sdxl_time_ids(batch["original_sizes"], batch["crops_top_left"], (r, r))
        if losers is None:
            return build_condition(self.encode_text(captions), time_ids).repeat(2)
        return UNetCondition.cat(build_condition(self.encode_text(captions), time_ids),
                                 build_condition(self.encode_text(losers), time_ids))

    def inputs(self, batch: dict) -> tuple[torch.Tensor, UNetCondition]:
        """``(x0_pairs, cond)``: the ``[winners; losers]`` latents (2B, C, h, w) and their condition (2B)."""
        return self.encode_latents(batch), self.condition(batch)

    def noise(self, x0_pairs: torch.Tensor, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t (2B,), ε (2B, ...))`` for the forward process, shared by winner and loser with ``share_noise``."""
        scheduler = self.components.noise_scheduler
        sampling = self.config.flow.timestep_sampling_options() if self.components.is_flow else None
        return pair_timesteps_and_noise(x0_pairs, scheduler, share=self.config.share_noise,
                                        generator=self.generator, timestep_sampling=sampling)

    def errors(self, x0_pairs: torch.Tensor, cond, t: torch.Tensor, noise: torch.Tensor) -> PairErrors:
        """Per-sample errors of the policy (with grad) and the reference (without) on the same ``(x_t, t, c)``."""
        cfg = self.config
        return preference_errors(
            self.policy, self.components.noise_scheduler, x0_pairs, cond, reference=self.reference, t=t,
            noise=noise, weighting=cfg.weighting, snr_gamma=cfg.snr_gamma,
        )

    def compute_loss(self, batch: dict) -> ObjectiveOutput:
        """The objective on one micro-batch: :meth:`inputs` -> :meth:`noise` -> :meth:`errors` -> objective."""
        x0_pairs, cond = self.inputs(batch)
        t, noise = self.noise(x0_pairs, cond)
        return self.objective(self.errors(x0_pairs, cond, t, noise))

    def training_step(self, batch: dict) -> ObjectiveOutput:
        """One micro-batch: :meth:`compute_loss`, backward and, when an accumulation window ends
        (``accelerator.sync_gradients``), clip and the optimizer update.

        The micro-batch's metrics join ``self.window``; a non-finite loss, or non-finite gradients outside fp16
        (whose grad scaler skips such steps itself), mark the window bad: no update, gradients dropped.
        """
        cfg, acc = self.config, self.accelerator
        with acc.accumulate(self.unet):
            out = self.compute_loss(batch)
            if torch.isfinite(out.loss):
                acc.backward(out.loss)
            else:  # never backpropagate a NaN/inf loss into the accumulated gradients
                self.bad_window = True
            self.window.append({"loss": out.loss.item(), **out.metrics, **self._cache_metrics(batch)})
            if acc.sync_gradients:
                if not self.bad_window and cfg.mixed_precision != "fp16" and not self._grads_finite():
                    self.bad_window = True
                if not self.bad_window:
                    if cfg.optimizer.max_grad_norm:
                        acc.clip_grad_norm_(self.unet.parameters(), cfg.optimizer.max_grad_norm)
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return out

    def _cache_metrics(self, batch: dict) -> dict[str, float]:
        """``data/latent_cache_hits``: the share of the micro-batch's pairs served from the latent cache."""
        if self.cache is None:
            return {}
        return {"data/latent_cache_hits": len(batch.get("latent_rows") or ()) / max(batch["size"], 1)}

    # ------------------------------------------------------------------ loop
    def batches(self):
        """The micro-batches of the run, from the resume point on: epochs of the pairs in a per-epoch
        permutation sharded by rank (:class:`ResumableSampler`); ``self.position`` counts what this process
        consumed, unreadable pairs included."""
        cfg, acc = self.config, self.accelerator
        while True:
            self.dataset.epoch = self.epoch
            sampler = ResumableSampler(len(self.dataset), cfg.seed, self.epoch, self.position,
                                       rank=acc.process_index, world_size=acc.num_processes)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate_pairs,
                num_workers=cfg.dataset.num_workers,
            )
            read, unread = 0, 0  # this epoch's pairs, readable and not
            for batch in loader:
                self.position += batch["size"] + batch["num_skipped"]
                self._count_unreadable(batch)
                read, unread = read + batch["size"], unread + batch["num_skipped"]
                if batch["size"]:
                    yield batch
            if unread and not read:
                raise UnreadableDataError(self._unreadable_message("no pair of the epoch could be read"))
            self.epoch += 1
            self.position = 0

    progress_keys = (("loss", "loss"), ("acc", "rewards/accuracies"))  # progress-bar (label, record key)

    def train(self) -> dict:
        cfg, acc = self.config, self.accelerator
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train",
                   disable=not acc.is_local_main_process, dynamic_ncols=True)
        start = time.time()
        self.stop_reason = None  # a recipe may end the run early (the online monitor's ``action: stop``)
        batches = self.batches()
        try:  # the bar ends its line even when the run stops with an error
            while self.step < cfg.max_steps and self.stop_reason is None:
                self.training_step(next(batches))
                if not acc.sync_gradients:
                    continue
                if self.bad_window:
                    self._on_nonfinite(self.window)
                    self.window, self.bad_window = [], False
                    continue
                self.consecutive_nonfinite = 0
                self.lr_scheduler.step()
                self.step += 1
                if self.ema is not None:
                    self.ema.step(self.trainable_parameters())
                self.after_step()
                bar.update(1)
                record = self._mean_over_ranks(
                    {k: float(np.mean([w[k] for w in self.window])) for k in self.window[0]})
                record.update(step=self.step, lr=self.lr_scheduler.get_last_lr()[0],
                              skipped=self.num_skipped, nonfinite_skipped=self.nonfinite_skipped)
                self.window = []
                self.on_record(record)
                self.history.append(record)
                bar.set_postfix({label: f"{record[key]:.4f}" for label, key in self.progress_keys if key in record})
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self._log(record)
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                        and self.step < cfg.max_steps):
                    self.save_checkpoint()
                if cfg.validation.every and self.step % cfg.validation.every == 0:
                    self.validate()
        finally:
            batches.close()
            bar.close()
        acc.wait_for_everyone()
        unreadable = sorted(self.unreadable.items())
        summary = {"steps": self.step, "skipped_samples": self.num_skipped, "stopped": self.stop_reason,
                   "unreadable_pairs": len(unreadable),
                   "unreadable": [{"index": i, "reason": r} for i, r in unreadable[:100]],
                   "nonfinite_steps_skipped": self.nonfinite_skipped, "seconds": time.time() - start,
                   "final": self.history[-1] if self.history else {}}
        if acc.is_main_process:
            self.save_final()
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if unreadable:
                acc.print(f"diffalign: skipped {len(unreadable)} unreadable "
                          f"pair{'s' if len(unreadable) > 1 else ''} "
                          f"({self.num_skipped} time{'s' if self.num_skipped > 1 else ''}); "
                          f"first: {unreadable[0][1]} (all in summary.json)")
        return summary

    def _mean_over_ranks(self, record: dict[str, float]) -> dict[str, float]:
        """Each logged value averaged over the processes (every process logs the same keys at every step)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return record
        keys = sorted(record)
        values = acc.reduce(torch.tensor([record[k] for k in keys], dtype=torch.float64, device=acc.device),
                            reduction="mean")
        return dict(zip(keys, values.tolist()))

    def _count_unreadable(self, batch: dict):
        """Count this batch's unreadable pairs (by index, with the first reason) and stop when the share of
        readable pairs read so far falls below ``dataset.min_readable_fraction`` (from 64 attempts on)."""
        self.num_skipped += batch["num_skipped"]
        self.met_here[0] += batch["size"]
        self.met_here[1] += batch["num_skipped"]
        for index, reason in batch["unreadable"]:
            self.unreadable.setdefault(int(index), reason)
        read, attempts = self.met_here[0], sum(self.met_here)
        floor = self.config.dataset.min_readable_fraction
        if attempts >= min(64, len(self.dataset)) and read < floor * attempts:
            what = f"only {read} of {attempts}" if read else f"none of the {attempts}"
            raise UnreadableDataError(self._unreadable_message(
                f"{what} pairs read so far could be decoded (below dataset.min_readable_fraction={floor})"))

    def _unreadable_message(self, what: str) -> str:
        first = min(self.unreadable.items())[1] if self.unreadable else "?"
        return f"{what}; first unreadable: {first}"

    def _grads_finite(self) -> bool:
        grads = [p.grad for p in self.unet.parameters() if p.grad is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    def _on_nonfinite(self, window: list[dict]):
        """Count a skipped step; after ``max_nonfinite_steps`` in a row, checkpoint the (still good) weights
        and stop."""
        self.nonfinite_skipped += 1
        self.consecutive_nonfinite += 1
        losses = [w["loss"] for w in window]
        self.accelerator.print(f"diffalign: non-finite loss or gradients at step {self.step + 1} "
                               f"(losses {losses}); step skipped ({self.consecutive_nonfinite} in a row)")
        if self.consecutive_nonfinite >= self.config.max_nonfinite_steps:
            self.save_checkpoint()
            raise NonFiniteError(
                f"{self.consecutive_nonfinite} non-finite steps in a row at step {self.step}; stopped. "
                f"Last good weights: {self.checkpoint_dir / f'checkpoint-{self.step}'} (lower the learning "
                "rate or β, use bf16 instead of fp16, or check the data)"
            )

    def _log(self, record: dict):
        acc = self.accelerator
        if self.config.report_to:
            acc.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        if acc.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------- hooks for recipes that extend the loop
    def after_step(self):
        """Called after every optimizer step (e.g. SePPO adds a reference snapshot)."""

    def on_record(self, record: dict):
        """Called with each step's record (means over ranks, so equal on every process) before it is logged; a
        recipe may add keys or end the run by setting ``self.stop_reason`` (the online monitor)."""

    def checkpoint_extras(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Extra tensors (saved in the safetensors file) and plain state a recipe needs on resume (here:
        EMA)."""
        if self.ema is None:
            return {}, {}
        ema = {f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)}
        return ema, {"ema_optimization_step": self.ema.optimization_step}

    def restore_extras(self, tensors: dict[str, torch.Tensor], meta: dict):
        if self.ema is not None:
            with torch.no_grad():
                for i, p in enumerate(self.ema.shadow_params):
                    p.copy_(tensors[f"ema.{i}"])
            self.ema.optimization_step = meta["ema_optimization_step"]

    # ------------------------------------------------------------------ state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        unet = self.accelerator.unwrap_model(self.unet)
        return {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}

    def save_checkpoint(self):
        acc = self.accelerator
        acc.wait_for_everyone()
        # Every process has its own generators and data position: gather them so each rank resumes its own.
        ranks = self._per_rank_state()
        if not acc.is_main_process:
            return
        state = {
            "step": self.step, "epoch": self.epoch,
            "num_skipped": self.num_skipped, "nonfinite_skipped": self.nonfinite_skipped,
            "unreadable": dict(self.unreadable),
            "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
            "ranks": ranks,  # per process: RNG states and data position
        }
        if acc.scaler is not None:  # fp16: the loss scale and its growth tracker
            state["grad_scaler"] = acc.scaler.state_dict()
        extra_tensors, extra_meta = self.checkpoint_extras()
        state["extras"] = extra_meta
        weights = {**{f"trainable.{k}": v for k, v in self.trainable_state().items()}, **extra_tensors}
        ckpt.save_checkpoint(self.checkpoint_dir, self.step, weights, state,
                             self.config.keep_last_checkpoints)

    def _per_rank_state(self) -> list[dict]:
        """This process's random states and data position, gathered from every process (rank order)."""
        from accelerate.utils import gather_object

        mine = {"position": self.position,
                "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state(),
                        "numpy": _numpy_state(), "python": _python_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
        if self.accelerator.num_processes == 1:
            return [mine]
        return gather_object([mine])

    def _resume(self):
        path = ckpt.latest_checkpoint(self.checkpoint_dir)
        if path is None:
            self.accelerator.print(f"diffalign: no complete checkpoint in {self.checkpoint_dir}; "
                                   "starting fresh")
            return
        saved, state = ckpt.load_checkpoint(path)
        weights = {k[len("trainable."):]: v for k, v in saved.items() if k.startswith("trainable.")}
        self.restore_extras({k: v for k, v in saved.items() if not k.startswith("trainable.")},
                            state["extras"])
        params = dict(self.accelerator.unwrap_model(self.unet).named_parameters())
        missing = set(n for n, p in params.items() if p.requires_grad) - set(weights)
        extra = set(weights) - set(params)
        reshaped = sorted(n for n, w in weights.items() if n in params and params[n].shape != w.shape)
        if missing or extra or reshaped:
            if reshaped:
                n = reshaped[0]
                example = f"{n}: {tuple(weights[n].shape)} in the checkpoint, {tuple(params[n].shape)} here"
            else:
                example = f"{'missing' if missing else 'unexpected'} {min(missing or extra)}"
            raise ResumeMismatchError(
                f"--resume: {path.name} was written for another model or LoRA setting ({example}); "
                "resume with the run's own config.yaml, or --overwrite to start over")
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.accelerator.scaler is not None and "grad_scaler" in state:
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.num_skipped = state["num_skipped"]
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        self.unreadable = dict(state.get("unreadable", {}))
        # checkpoints from before per-process state held rank 0's alone
        ranks = state.get("ranks") or [{"rng": state["rng"], "position": state["position"]}]
        acc = self.accelerator
        if len(ranks) != acc.num_processes:
            acc.print(f"diffalign: {path.name} was written by {len(ranks)} process(es), this run has "
                      f"{acc.num_processes}: every process resumes from rank 0's random state and position")
        mine = ranks[acc.process_index] if len(ranks) == acc.num_processes else ranks[0]
        self.position = mine["position"]
        rng = mine["rng"]
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        _set_numpy_state(rng["numpy"])
        _set_python_state(rng["python"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        metrics = self.output_dir / "metrics.jsonl"
        if metrics.exists() and self.accelerator.is_main_process:  # drop records past the checkpoint
            keep = [ln for ln in metrics.read_text().splitlines() if _record_step(ln) <= self.step]
            metrics.write_text("".join(ln + "\n" for ln in keep))
        # restored: retention can apply (a kill may have cut a prune short)
        if self.accelerator.is_main_process:
            ckpt.prune_checkpoints(self.checkpoint_dir, self.config.keep_last_checkpoints, keep=(path,))
        self.accelerator.print(f"diffalign: resumed from {path} (step {self.step}, epoch {self.epoch})")

    def save_final(self):
        """:meth:`export` the trained weights; with EMA, the EMA weights."""
        if self.ema is not None:
            self.ema.copy_to(self.trainable_parameters())
        self.export()

    # ------------------------------------------------------------------ validation images
    def pipeline(self):
        """A diffusers pipeline over the current (unwrapped) policy, for validation and demos."""
        from ..inference import pipeline_from_components

        c, trained = self.components, self.accelerator.unwrap_model(self.unet)
        view = dataclasses.replace(c, **{"transformer" if c.is_flow else "unet": trained})
        return pipeline_from_components(view)

    def validate(self):
        from ..inference import generate
        from .images import save_grid

        v, acc = self.config.validation, self.accelerator
        if not acc.is_main_process:
            return
        unet = acc.unwrap_model(self.unet)
        unet.eval()
        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=True)
        r = self.config.dataset.resolution
        with torch.autocast(acc.device.type, enabled=self.weight_dtype != torch.float32, dtype=self.weight_dtype):
            images = generate(pipe, v.prompts, [v.seed + i for i in range(len(v.prompts))],
                              batch_size=len(v.prompts), num_inference_steps=v.num_inference_steps,
                              guidance_scale=v.guidance_scale, height=r, width=r)
        unet.train()
        out = self.output_dir / "validation" / f"step-{self.step:06d}.png"
        save_grid(images, out)
        return out

    def cleanup(self):
        self.accelerator.end_training()


# Objectives whose errors need more than the forward process: the recipe (a PreferenceTrainer subclass) that makes
# them, as "module:Class" (imported on use: a recipe may live in a package built on top of training).
RECIPES: dict[str, str] = {
    "inpo": "diffalign.training.inpo:InversionTrainer",
    "seppo": "diffalign.training.semi_policy:SemiPolicyTrainer",
    "ppd": "diffalign.personalization.trainer:PersonalizedTrainer",
    "grpo": "diffalign.training.online:GRPOTrainer",
    "nft": "diffalign.training.online:NFTTrainer",
}


def trainer_class(config: TrainConfig) -> type[PreferenceTrainer]:
    """The recipe the objective needs (:data:`RECIPES`), else :class:`PreferenceTrainer`."""
    from importlib import import_module

    recipe = RECIPES.get(config.objective.name)
    if recipe is None:
        return PreferenceTrainer
    module, name = recipe.split(":")
    return getattr(import_module(module), name)


def _record_step(line: str) -> float:
    """Step of a metrics.jsonl line; a line torn by a crash counts as past the checkpoint (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _numpy_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
            "cached": cached}


def _set_numpy_state(s):
    np.random.set_state(("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                         s["cached"]))


def _python_state():
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _set_python_state(s):
    random.setstate((s["version"], tuple(int(x) for x in s["internal"].tolist()), s["gauss"]))


def _flat_scalars(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is not None:
            out[key] = str(v)
    return out
