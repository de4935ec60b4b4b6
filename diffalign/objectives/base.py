"""Objective registry and the container every objective returns.

An objective is a pure function of per-sample denoising errors (see :mod:`diffalign.likelihood`). It never calls a
model: the trainer computes the errors and hands them over as a :class:`PairErrors`. Objectives register by name
(``objective: dpo`` in a config) together with a config dataclass holding their hyperparameters, and declare whether
they need reference errors, so the trainer never branches on an objective's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..likelihood import PairErrors  # the likelihood layer owns it; re-exported here


@dataclass
class ObjectiveOutput:
    """``loss``: 0-d mean loss; ``losses``: (B,) per-pair losses; ``metrics``: floats to log under fixed names."""

    loss: torch.Tensor
    losses: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ObjectiveSpec:
    """What the trainer needs to know about an objective, declared once at registration.

    ``needs_reference``: compute reference errors. ``dual_captions``: winner and loser are conditioned on their own
    captions (DCPO). ``online``: the objective trains on the policy's own samples scored by a reward (GRPO, NFT): its
    callable takes log-probabilities or velocities, not :class:`PairErrors`, and its recipe rolls out. How the errors
    are made (InPO's inversion, SePPO's sampled losers) is the training layer's
    business: ``diffalign.training.trainer.RECIPES``.
    """

    name: str
    config_cls: type
    build: Callable[[object], Callable[[PairErrors], ObjectiveOutput]]
    needs_reference: bool
    doc: str = ""
    dual_captions: bool = False
    online: bool = False


_REGISTRY: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, config_cls: type, *, needs_reference: bool, dual_captions: bool = False,
                       online: bool = False):
    """Function decorator: ``@register_objective("dpo", DPOConfig, needs_reference=True)``.

    The decorated callable takes the config instance and returns ``objective(errors: PairErrors) -> ObjectiveOutput``.
    """

    def wrap(build):
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice")
        _REGISTRY[name] = ObjectiveSpec(name, config_cls, build, needs_reference, (build.__doc__ or "").strip(),
                                        dual_captions, online)
        return build

    return wrap


def available_objectives() -> list[str]:
    return sorted(_REGISTRY)


def get_objective_spec(name: str) -> ObjectiveSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; available: {', '.join(available_objectives())}")
    return _REGISTRY[name]


def objective_config_fields(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(get_objective_spec(name).config_cls)}


def build_objective(name: str, config=None):
    """Return ``(objective_callable, spec)``; ``config`` defaults to the objective's config dataclass defaults."""
    spec = get_objective_spec(name)
    cfg = config if config is not None else spec.config_cls()
    return spec.build(cfg), spec
