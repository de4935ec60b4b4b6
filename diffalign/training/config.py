"""Training configuration: YAML mapped to validated dataclasses.

A minimal config::

    model: stable-diffusion-v1-5/stable-diffusion-v1-5     # or {pretrained: ..., lora: {rank: 8}, ...}
    dataset: path/or/hub-id                                 # or {source: ..., resolution: 512, ...}
    objective: dpo                                          # or {name: dpo, beta: 5000}
    output_dir: runs/sd15-dpo
    max_steps: 2000

Unknown keys and bad values raise :class:`ConfigError` with one line naming the key, e.g.
``config error: optimizer.learning_rate: must be > 0, got 0``. ``key.sub=value`` overrides from the command
line are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import personalization as _personalization  # noqa: F401  (registers the "ppd" objective)
from ..objectives import build_objective, get_objective_spec


class ConfigError(ValueError):
    """A config key is unknown, missing, or has a bad value; the message names the key."""


def _check(cond: bool, key: str, msg: str):
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class LoRAConfig:
    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA α (scale α/r); default α = r."})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "Modules that get adapters; null = the family's: to_k/q/v/out.0 (U-Nets), plus the context "
                "stream's add_k/q/v_proj and to_add_out (sd3, flux), as the diffusers LoRA scripts."})
    dropout: float = 0.0
    init: str = field(default="gaussian", metadata={
        "help": "peft init: 'gaussian' (B = 0, policy == reference)."})

    def validate(self, key="model.lora"):
        _check(self.rank >= 1, f"{key}.rank", f"must be >= 1, got {self.rank}")
        _check(self.alpha is None or self.alpha > 0, f"{key}.alpha", f"must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"{key}.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.target_modules is None or len(self.target_modules) > 0, f"{key}.target_modules",
               "must name at least one module (or null for the family's)")


@dataclass
class ModelConfig:
    pretrained: str | None = field(default=None, metadata={"help": "Hub id or local diffusers folder."})
    family: str = field(default="auto", metadata={
        "help": "sd15 | sd21 | sdxl | sd3 (SD3/SD3.5) | flux | auto (from model_index.json)."})
    revision: str | None = None
    variant: str | None = field(default=None, metadata={"help": "e.g. 'fp16' weight files."})
    vae: str | None = field(default=None, metadata={
        "help": "VAE override, e.g. madebyollin/sdxl-vae-fp16-fix."})
    prediction_type: str | None = field(default=None, metadata={"help": "Force 'epsilon' or 'v_prediction'."})
    attention: str = field(default="sdpa", metadata={"help": "sdpa | xformers | math."})
    gradient_checkpointing: bool = False
    flux_guidance: float = field(default=3.5, metadata={
        "help": "FLUX-dev's guidance input while training (diffusers' FLUX LoRA script default)."})
    lora: LoRAConfig | None = field(
        default_factory=LoRAConfig,
        metadata={"help": "LoRA settings; null = full fine-tuning (frozen ref copy)."},
    )

    def validate(self):
        _check(self.family in ("auto", "sd15", "sd21", "sdxl", "sd3", "flux"), "model.family",
               f"must be one of auto, sd15, sd21, sdxl, sd3, flux, got {self.family!r}")
        _check(self.pretrained is not None or self.family != "auto", "model.pretrained",
               "is required (a hub id or local folder), or set model.family to use its default id")
        _check(self.attention in ("sdpa", "xformers", "math"), "model.attention",
               f"must be one of sdpa, xformers, math, got {self.attention!r}")
        _check(self.prediction_type in (None, "epsilon", "v_prediction"), "model.prediction_type",
               f"must be epsilon or v_prediction, got {self.prediction_type!r}")
        if self.lora is not None:
            self.lora.validate()


@dataclass
class DataConfig:
    source: Any = field(default=None, metadata={
        "help": "Hub id, local folder, manifest .jsonl/.csv, or .tar shards."})
    split: str = "train"
    resolution: int | None = field(default=None, metadata={
        "help": "Training size in pixels; null = the model's native size (U-Net sample_size x VAE scale: "
                "SD1.5 512, SDXL 1024)."})
    center_crop: bool = True
    random_flip: bool = True
    keep_ties: bool = field(default=False, metadata={"help": "Ties (0.5/0.5) are dropped unless true."})
    max_samples: int | None = None
    caption_column: str = "caption"
    proportion_empty_prompts: float = field(default=0.0, metadata={"help": "Official DPO used 0.2."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Cache VAE latents + text embeddings here."})
    cache_flips: str = field(default="auto", metadata={
        "help": "With cache_dir and random_flip, what a pair's first visit caches. both = the drawn flip and, "
                "encoded from the mirrored pixels, the other one (one more VAE encode per pair, once), so every "
                "later epoch hits; drawn = the drawn flip only (a later epoch that draws the other flip encodes "
                "again); auto = both when the run visits a pair more than once (max_steps x batch_size x "
                "gradient_accumulation_steps x processes > pairs), else drawn."})
    precompute_text: bool = field(default=False, metadata={
        "help": "With cache_dir: encode every caption once before training, then move the text encoders to the "
                "CPU, so they (T5-XXL: 4.7 B parameters) take no accelerator memory during the steps."})
    num_workers: int = 0
    min_readable_fraction: float = field(default=0.5, metadata={
        "help": "Stop when fewer than this share of the pairs read so far could be decoded (checked from "
                "64 pairs on); a run where no pair can be read always stops."})

    def validate(self, required: bool = True):
        _check(self.source is not None or not required, "dataset.source", "is required")
        _check(self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
               "dataset.resolution", f"must be a positive multiple of 8, got {self.resolution}")
        _check(0 <= self.min_readable_fraction <= 1, "dataset.min_readable_fraction",
               f"must be in [0, 1], got {self.min_readable_fraction}")
        _check(0 <= self.proportion_empty_prompts <= 1, "dataset.proportion_empty_prompts",
               f"must be in [0, 1], got {self.proportion_empty_prompts}")
        _check(self.max_samples is None or self.max_samples > 0, "dataset.max_samples",
               f"must be > 0, got {self.max_samples}")
        _check(self.num_workers >= 0, "dataset.num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.cache_dir is None or self.center_crop, "dataset.cache_dir",
               "the latent cache needs dataset.center_crop: true (random crops cannot be cached)")
        _check(self.cache_flips in ("auto", "both", "drawn"), "dataset.cache_flips",
               f"must be auto, both or drawn, got {self.cache_flips!r}")
        _check(not self.precompute_text or self.cache_dir is not None, "dataset.precompute_text",
               "needs dataset.cache_dir (the embeddings are kept there)")


@dataclass
class OptimizerConfig:
    learning_rate: float = 1e-5
    lr_scheduler: str = field(default="constant_with_warmup",
                              metadata={"help": "constant | constant_with_warmup | linear | cosine."})
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = field(default=False, metadata={"help": "bitsandbytes AdamW8bit (GPU)."})
    max_grad_norm: float | None = 1.0

    def validate(self):
        _check(self.learning_rate > 0, "optimizer.learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(self.lr_scheduler in ("constant", "constant_with_warmup", "linear", "cosine"),
               "optimizer.lr_scheduler", f"must be constant, constant_with_warmup, linear or cosine, "
               f"got {self.lr_scheduler!r}")
        _check(self.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "optimizer.max_grad_norm",
               f"must be > 0 or null, got {self.max_grad_norm}")


@dataclass
class FlowConfig:
    """How rectified-flow models (sd3, flux) draw t: u by ``timestep_sampling``, then the training grid's
    timestep at ⌊u·T⌋ (diffusers' ``compute_density_for_timestep_sampling``). Ignored by U-Nets."""

    timestep_sampling: str = field(default="logit_normal", metadata={
        "help": "logit_normal (SD3 default) | mode | uniform."})
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def validate(self):
        self.timestep_sampling_options()

    def timestep_sampling_options(self):
        """The options as :class:`diffalign.likelihood.FlowTimestepSampling` (a ConfigError when invalid)."""
        from ..likelihood import FlowTimestepSampling

        try:
            return FlowTimestepSampling(self.timestep_sampling, self.logit_mean, self.logit_std, self.mode_scale)
        except ValueError as err:
            raise ConfigError(f"flow: {err}") from None


@dataclass
class ValidationConfig:
    every: int | None = field(default=None, metadata={
        "help": "Write a PNG grid every N steps (null: never)."})
    prompts: list[str] = field(default_factory=list)
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = field(default=0, metadata={"help": "Prompt i is drawn with seed + i (diffalign.inference's rule)."})

    def validate(self):
        _check(self.every is None or self.every > 0, "validation.every", f"must be > 0, got {self.every}")
        _check(self.every is None or len(self.prompts) > 0, "validation.prompts",
               "must list at least one prompt when validation.every is set")


@dataclass
class RolloutConfig:
    """Online objectives (``grpo``, ``nft``): what the policy samples each step and how it is scored. Each process
    takes ``batch_size`` prompts per step and samples ``group_size`` images of each."""

    prompts: str | None = field(default=None, metadata={
        "help": "A text file, one prompt per line (blank lines and lines starting with # are skipped)."})
    group_size: int = field(default=8, metadata={
        "help": "G images per prompt; advantages are normalised within each prompt's group (flow_grpo: 16-24)."})
    num_inference_steps: int = field(default=10, metadata={
        "help": "Sampling steps of a rollout (flow_grpo SD3.5-M: 10; DDPO: 50)."})
    guidance_scale: float = field(default=4.5, metadata={
        "help": "CFG w of the rollouts (and of the re-scored steps); 1 = none. FLUX-dev uses model.flux_guidance."})
    noise_level: float = field(default=0.7, metadata={
        "help": "Flow models: a of the SDE step's σ_t (Flow-GRPO: 0.7; CPS: 0.8)."})
    sde_type: str = field(default="sde", metadata={"help": "Flow models: sde (Flow-GRPO) | cps."})
    eta: float = field(default=1.0, metadata={"help": "U-Nets: η of the stochastic DDIM step (DDPO: 1.0)."})
    sde_window_size: int = field(default=0, metadata={
        "help": "Stochastic (and trained) steps per rollout: 0 = every step but the last; k = a window of k "
                "consecutive steps drawn per rollout, ODE elsewhere (Flow-GRPO-Fast, MixGRPO)."})
    sde_window_range: list[int] | None = field(default=None, metadata={
        "help": "[lo, hi): where the window may start and end; null = the whole trajectory."})
    sample_batch_size: int | None = field(default=None, metadata={
        "help": "Images per rollout forward, and per training micro-batch (equal sizes keep the first ratio at "
                "1); null = all batch_size x group_size at once."})
    updates_per_rollout: int = field(default=1, metadata={
        "help": "Optimizer updates per rollout: the micro-batches x trained steps are split in this many "
                "parts (flow_grpo: 1-2). The first is on-policy (ratio 1); the others are where clipping acts."})
    num_inner_epochs: int = field(default=1, metadata={"help": "Passes over each rollout (official: 1)."})
    rewards: Any = field(default="pickscore", metadata={
        "help": "Reward: 'name[:weight],...' or {name: weight | {weight:, weights:, url:}} of diffalign.evaluators "
                "scorers (pickscore, hpsv2, hpsv2.1, imagereward, clip, aesthetic, toy, brightness)."})
    reward_device: str | None = field(default=None, metadata={
        "help": "Where the reward models run; null = the training device."})
    per_prompt: bool = field(default=True, metadata={
        "help": "Advantages centred per prompt (GRPO); false = over the whole batch."})
    global_std: bool = field(default=True, metadata={
        "help": "Divide by the std of all rewards of the step (flow_grpo default) instead of each group's."})
    ratio_tolerance: float = field(default=1e-4, metadata={
        "help": "Warn when max |ρ - 1| of the first (on-policy) update of a rollout exceeds this."})

    def validate(self, key="rollout"):
        _check(self.group_size >= 2, f"{key}.group_size", f"must be >= 2 (advantages compare the images of a "
               f"prompt), got {self.group_size}")
        _check(self.num_inference_steps >= 2, f"{key}.num_inference_steps",
               f"must be >= 2, got {self.num_inference_steps}")
        _check(self.guidance_scale >= 1, f"{key}.guidance_scale", f"must be >= 1, got {self.guidance_scale}")
        _check(self.noise_level >= 0, f"{key}.noise_level", f"must be >= 0, got {self.noise_level}")
        _check(self.sde_type in ("sde", "cps"), f"{key}.sde_type", f"must be sde or cps, got {self.sde_type!r}")
        _check(self.eta > 0, f"{key}.eta", f"must be > 0, got {self.eta}")
        _check(0 <= self.sde_window_size < self.num_inference_steps, f"{key}.sde_window_size",
               f"must be in [0, num_inference_steps), got {self.sde_window_size}")
        if self.sde_window_range is not None:
            lo_hi = self.sde_window_range
            _check(len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1] <= self.num_inference_steps
                   and lo_hi[1] - lo_hi[0] >= self.sde_window_size, f"{key}.sde_window_range",
                   f"must be [lo, hi) with 0 <= lo < hi <= num_inference_steps holding the window, got {lo_hi}")
        _check(self.sample_batch_size is None or self.sample_batch_size >= 1, f"{key}.sample_batch_size",
               f"must be >= 1 or null, got {self.sample_batch_size}")
        _check(self.updates_per_rollout >= 1, f"{key}.updates_per_rollout",
               f"must be >= 1, got {self.updates_per_rollout}")
        _check(self.num_inner_epochs >= 1, f"{key}.num_inner_epochs", f"must be >= 1, got {self.num_inner_epochs}")
        _check(self.ratio_tolerance > 0, f"{key}.ratio_tolerance", f"must be > 0, got {self.ratio_tolerance}")
        from ..online.rewards import RewardSpec

        try:
            RewardSpec.parse(self.rewards)
        except ValueError as err:
            raise ConfigError(f"{key}.rewards: {err}") from None


@dataclass
class MonitorConfig:
    """The reward-hacking monitor of online runs (:class:`diffalign.online.HackingMonitor`): the rollout images
    are also scored by held-out scorers and artefact statistics, logged beside the training reward; the monitor
    flags a run whose reward rises while a held-out metric moves the bad way. With ``prompts``, it watches a fixed
    evaluation set instead (the same prompts and seeds every ``every`` steps: no step-to-step prompt noise)."""

    held_out: Any = field(default=None, metadata={
        "help": "Held-out scorers, as rollout.rewards (their weights are ignored), logged as heldout/<name>; "
                "null = none."})
    artefacts: Any = field(default="watch", metadata={
        "help": "Artefact statistics of the rollout images (artefact/saturation, high_freq, grid, emptiness): "
                "watch (log them and let them flag), log, or off (YAML reads off/false as false, on/true as "
                "watch)."})
    prompts: str | None = field(default=None, metadata={
        "help": "A prompt file (one per line) of a fixed evaluation set: every `every` steps the current policy "
                "samples images_per_prompt images of each on the deterministic sampler with fixed seeds, scored "
                "by the reward, the held-out scorers and the artefact statistics (eval/reward, eval/heldout/<name>, "
                "eval/artefact/<stat>); the monitor then watches these. null = watch the rollouts."})
    every: int = field(default=10, metadata={"help": "With prompts: steps between evaluations."})
    images_per_prompt: int = field(default=1, metadata={"help": "With prompts: images per prompt."})
    window: int = field(default=10, metadata={
        "help": "Values per running mean (steps, or evaluations with prompts)."})
    patience: int = field(default=3, metadata={"help": "Consecutive bad checks before the monitor flags."})
    units: str = field(default="stderr", metadata={
        "help": "stderr: min_rise and min_fall count standard errors of the change of a running mean (Welch's t: "
                "fits every metric's scale and the step-to-step noise of rollout means); absolute: the metric's "
                "units."})
    min_rise: float = field(default=2.0, metadata={
        "help": "Smallest rise of the reward's running mean that counts."})
    min_fall: float = field(default=2.0, metadata={
        "help": "Smallest bad-way move of a held-out running mean that counts."})
    reference: str = field(default="start", metadata={
        "help": "start: compare with the first window of the run; previous: with the window before."})
    action: str = field(default="warn", metadata={
        "help": "When flagged: warn | checkpoint (save one, go on) | stop (save one and end the run)."})

    def validate(self, key="monitor"):
        _check(self.every >= 1, f"{key}.every", f"must be >= 1, got {self.every}")
        _check(self.images_per_prompt >= 1, f"{key}.images_per_prompt", f"must be >= 1, got {self.images_per_prompt}")
        _check(self.window >= 1, f"{key}.window", f"must be >= 1, got {self.window}")
        _check(self.patience >= 1, f"{key}.patience", f"must be >= 1, got {self.patience}")
        _check(self.min_fall >= 0 and self.min_rise >= 0, f"{key}.min_fall",
               "min_rise and min_fall must be >= 0")
        if isinstance(self.artefacts, bool):  # YAML 1.1: `off` / `no` load as false
            self.artefacts = "watch" if self.artefacts else "off"
        _check(self.artefacts in ("watch", "log", "off"), f"{key}.artefacts",
               f"must be watch, log or off, got {self.artefacts!r}")
        _check(self.units in ("stderr", "absolute"), f"{key}.units",
               f"must be stderr or absolute, got {self.units!r}")
        _check(self.reference in ("start", "previous"), f"{key}.reference",
               f"must be start or previous, got {self.reference!r}")
        _check(self.action in ("warn", "checkpoint", "stop"), f"{key}.action",
               f"must be warn, checkpoint or stop, got {self.action!r}")
        if self.held_out is not None:
            from ..online.rewards import RewardSpec

            try:
                RewardSpec.parse(self.held_out)
            except ValueError as err:
                raise ConfigError(f"{key}.held_out: {err}") from None


@dataclass
class ObjectiveSection:
    name: str = "dpo"
    params: Any = None  # the objective's own config dataclass instance


@dataclass
class TrainConfig:
    model: ModelConfig
    objective: ObjectiveSection
    output_dir: str
    max_steps: int
    dataset: DataConfig = field(default_factory=DataConfig, metadata={
        "help": "The preference pairs (offline objectives); online objectives use only its resolution."})
    batch_size: int = field(default=1, metadata={"help": "Pairs (online: prompts) per device per micro-step."})
    gradient_accumulation_steps: int = 1
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16."})
    seed: int = 0
    share_noise: bool = field(default=True, metadata={"help": "Winner and loser share t and ε (official)."})
    weighting: str = field(default="none", metadata={
        "help": "ω on each per-sample error: none (official) | U-Nets: snr (the x0-error: ε-error/λ_t), "
                "min_snr (γ = snr_gamma) | sd3/flux: sigma_sqrt, cosmap (diffusers' SD3 weightings)."})
    snr_gamma: float = 5.0
    checkpoint_every: int | None = 500
    keep_last_checkpoints: int | None = None
    log_every: int = 10
    ema_decay: float | None = field(default=None, metadata={
        "help": "Keep an exponential moving average of the trained weights (e.g. 0.999) and export it; "
                "null = off."})
    max_nonfinite_steps: int = field(default=5, metadata={
        "help": "Stop after this many NaN/inf steps in a row."})
    report_to: str | None = field(default="tensorboard", metadata={"help": "tensorboard or null."})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    @property
    def online(self) -> bool:
        """The objective trains on the policy's own samples (``grpo``, ``nft``): a rollout, no pairs."""
        return get_objective_spec(self.objective.name).online

    def validate(self):
        self.model.validate()
        if self.online:
            _check(self.rollout.prompts is not None, "rollout.prompts",
                   f"is required for objective {self.objective.name} (a text file, one prompt per line)")
            self.rollout.validate()
            self.monitor.validate()
            _check(self.gradient_accumulation_steps == 1, "gradient_accumulation_steps",
                   "online objectives accumulate over a rollout's micro-batches; set rollout.updates_per_rollout "
                   "and rollout.sample_batch_size instead")
        self.dataset.validate(required=not self.online)
        self.optimizer.validate()
        self.validation.validate()
        self.flow.validate()
        _check(self.max_steps > 0, "max_steps", f"must be > 0, got {self.max_steps}")
        _check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.gradient_accumulation_steps > 0, "gradient_accumulation_steps",
               f"must be > 0, got {self.gradient_accumulation_steps}")
        _check(self.mixed_precision in ("no", "fp16", "bf16"), "mixed_precision",
               f"must be no, fp16 or bf16, got {self.mixed_precision!r}")
        _check(self.weighting in ("none", "snr", "min_snr", "sigma_sqrt", "cosmap"), "weighting",
               f"must be none, snr, min_snr (U-Nets), sigma_sqrt or cosmap (sd3, flux), got {self.weighting!r}")
        _check(self.checkpoint_every is None or self.checkpoint_every > 0, "checkpoint_every",
               f"must be > 0 or null, got {self.checkpoint_every}")
        _check(self.keep_last_checkpoints is None or self.keep_last_checkpoints > 0, "keep_last_checkpoints",
               f"must be > 0 or null, got {self.keep_last_checkpoints}")
        _check(self.log_every > 0, "log_every", f"must be > 0, got {self.log_every}")
        _check(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay",
               f"must be in (0, 1) or null, got {self.ema_decay}")
        _check(self.max_nonfinite_steps > 0, "max_nonfinite_steps",
               f"must be > 0, got {self.max_nonfinite_steps}")
        _check(self.report_to in (None, "tensorboard"), "report_to",
               f"must be tensorboard or null, got {self.report_to!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        params = dataclasses.asdict(self.objective.params) if self.objective.params is not None else {}
        d["objective"] = {"name": self.objective.name, **params}
        return d


# ---------------------------------------------------------------- dict -> dataclass, with key paths in errors
_SHORTHAND = {ModelConfig: "pretrained", DataConfig: "source"}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) in typing.get_args(tp):
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for a in args:
            try:
                return _coerce(value, a, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1
                          else f"{key}: expected {' or '.join(map(_type_name, args))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-5 as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls, data, key: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types with the key's path."""
    prefix = f"{key}." if key else ""
    if cls in _SHORTHAND and not isinstance(data, dict):
        data = {_SHORTHAND[cls]: data}
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{prefix}{name}: required key is missing")
            continue
        kwargs[name] = _coerce(data[name], hints[name], prefix + name)
    try:
        return cls(**kwargs)
    except ValueError as err:  # __post_init__ checks (objective configs) say "field: message"
        raise ConfigError(f"{prefix}{err}") from None


def _objective_section(data) -> ObjectiveSection:
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict) or "name" not in data:
        raise ConfigError("objective: expected a name (e.g. `objective: dpo`) or a mapping with `name`")
    data = dict(data)
    name = data.pop("name")
    try:
        spec = get_objective_spec(name)
    except ValueError as err:
        raise ConfigError(f"objective.name: {err}") from None
    params = from_dict(spec.config_cls, data, "objective")
    build_objective(name, params)  # fail early on an inconsistent objective config
    return ObjectiveSection(name, params)


def parse_config(data: dict) -> TrainConfig:
    """Validated :class:`TrainConfig` from a plain dict (as YAML loads it)."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping at the top level")
    data = dict(data)
    if "objective" not in data:
        raise ConfigError("objective: required key is missing")
    objective = _objective_section(data.pop("objective"))
    data["objective"] = {}  # placeholder; the section was parsed above with the objective's own dataclass
    cfg = from_dict(TrainConfig, data, "")
    cfg.objective = objective
    cfg.validate()
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict; shorthand strings are
    expanded."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if isinstance(child, str):
                child = {{"model": "pretrained", "dataset": "source",
                          "objective": "name"}.get(part, part): child}
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: cannot set a sub-key of a "
                                  f"{type(child).__name__}")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
    return parse_config(apply_overrides(data, overrides or []))


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
