"""Preference objectives: pure functions of per-sample denoising errors, registered by name."""

from .base import (
    ObjectiveOutput,
    PairErrors,
    available_objectives,
    build_objective,
    get_objective_spec,
    register_objective,
)
from .dpo import DPOConfig, dpo_logits, dpo_loss, dpo_metrics
from .dcpo import DCPOConfig
from .inpo import InPOConfig
from .seppo import SePPOConfig, aaf_sign, seppo_loss
from .mapo import MaPOConfig, mapo_log_odds, mapo_loss, phi

__all__ = [
    "DCPOConfig",
    "DPOConfig",
    "InPOConfig",
    "MaPOConfig",
    "ObjectiveOutput",
    "PairErrors",
    "SePPOConfig",
    "aaf_sign",
    "seppo_loss",
    "available_objectives",
    "build_objective",
    "dpo_logits",
    "dpo_loss",
    "dpo_metrics",
    "get_objective_spec",
    "mapo_log_odds",
    "mapo_loss",
    "phi",
    "register_objective",
]
