"""Preference objectives: pure functions of per-sample denoising errors, registered by name."""

from .base import (
    ObjectiveOutput,
    PairErrors,
    available_objectives,
    build_objective,
    get_objective_spec,
    register_objective,
)
from .dcpo import DCPOConfig
from .dpo import DPOConfig, dpo_logits, dpo_loss, dpo_metrics
from .inpo import InPOConfig
from .mapo import MaPOConfig, mapo_log_odds, mapo_loss, phi
from .online import GRPOConfig, NFTConfig
from .seppo import SePPOConfig, aaf_sign, seppo_loss

__all__ = [
    "DCPOConfig",
    "DPOConfig",
    "GRPOConfig",
    "InPOConfig",
    "MaPOConfig",
    "NFTConfig",
    "ObjectiveOutput",
    "PairErrors",
    "SePPOConfig",
    "aaf_sign",
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
    "seppo_loss",
]
