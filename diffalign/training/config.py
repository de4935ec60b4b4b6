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
    precompute_text: bool = field(default=False, metadata={
        "help": "With cache_dir: encode every caption once before training, then move the text encoders to the "
                "CPU, so they (T5-XXL: 4.7 B parameters) take no accelerator memory during the steps."})
    num_workers: int = 0
    min_readable_fraction: float = field(default=0.5, metadata={
        "help": "Stop when fewer than this share of the pairs read so far could be decoded (checked from "
                "64 pairs on); a run where no pair can be read always stops."})

    def validate(self):
        _check(self.source is not None, "dataset.source", "is required")
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
class ObjectiveSection:
    name: str = "dpo"
    params: Any = None  # the objective's own config dataclass instance


@dataclass
class TrainConfig:
    model: ModelConfig
    dataset: DataConfig
    objective: ObjectiveSection
    output_dir: str
    max_steps: int
    batch_size: int = field(default=1, metadata={"help": "Pairs per device per micro-step."})
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

    def validate(self):
        self.model.validate()
        self.dataset.validate()
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
