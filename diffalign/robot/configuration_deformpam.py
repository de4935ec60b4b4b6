"""Configuration of the DeformPAM head: Diffusion-DPO fine-tuning of an action policy and reward-guided
selection.

DeformPAM: Chen et al., "DeformPAM: Data-Efficient Learning for Long-horizon Deformable Object Manipulation
via Preference-based Action Alignment", ICRA 2025, https://arxiv.org/abs/2410.11584. Defaults marked
"DeformPAM" are the values of the official code (``xiaoxiaoxh/DeformPAM`` @ 976b297:
``config/finetune_experiment/*_real.yaml`` and the ``Makefile`` target ``test_real``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .objectives import DPO_FORMS, TIE_MODES

REFERENCE_MODES = ("frozen", "deformpam_encoder")
CANDIDATE_SOURCES = ("reference", "policy")


@dataclass
class DeformPAMConfig:
    # Objective.
    form: str = field(
        default="deformpam",
        metadata={"help": f"One of {DPO_FORMS}: `logsigmoid` = official Diffusion-DPO -log σ(-β/2 Δ); "
                  "`deformpam` = the DeformPAM code's -σ(-β Δ), no 1/2."},
    )
    beta: float = field(
        default=100.0, metadata={"help": "β (DeformPAM configs: 100; constructor default 1000)."}
    )
    tie_mode: str = field(
        default="drop", metadata={"help": f"One of {TIE_MODES}: drop ties or give them the SFT term."}
    )
    sft_weight: float = field(default=1.0, metadata={"help": "Weight of the tie SFT term (e_θ^w + e_θ^l)/2."})
    reference_mode: str = field(
        default="frozen",
        metadata={"help": f"One of {REFERENCE_MODES}. `frozen`: a frozen copy of the imitation policy "
                  "(standard Diffusion-DPO). `deformpam_encoder`: the DeformPAM code's convention, the "
                  "frozen reference *encoder* with the policy's own trainable diffusion head (gradient "
                  "through both terms). Not the default because it is degenerate for a policy without a "
                  "separate encoder: with an identity encoder e_θ ≡ e_ref, so the loss is constant "
                  "(tests/robot/test_robot_policy.py)."},
    )
    weighting: str = field(
        default="none", metadata={"help": "ω(λ_t): none | snr (the x0-error) | min_snr (DeformPAM: none)."}
    )

    # Optimisation.
    lr: float = field(
        default=1e-5,
        metadata={"help": "AdamW learning rate (DeformPAM stage 2: 1e-5; the Detour2D toy: 1e-4)."},
    )
    steps: int = field(default=500, metadata={"help": "Optimiser steps."})
    batch_size: int = field(
        default=128, metadata={"help": "Pairs per step (DeformPAM: 28 states x 24 pairs)."}
    )
    grad_clip: float = field(default=1.0, metadata={"help": "Max gradient norm (0 disables)."})

    # Reward-guided action selection (RAS).
    n_candidates: int = field(default=8, metadata={"help": "N candidates per state (DeformPAM: 8)."})
    n_draws: int = field(
        default=100,
        metadata={"help": "M (t, ε) draws per candidate (DeformPAM: 100; the Detour2D toy: 32)."},
    )
    t_max_frac: float = field(
        default=0.1, metadata={"help": "t ~ U{0..⌊T·frac⌋-1}: the low-noise end (DeformPAM: T/10)."}
    )
    share_noise_across_candidates: bool = field(
        default=True,
        metadata={"help": "Common random numbers: every candidate of a state sees the same ε per draw "
                  "(DeformPAM shares only t across candidates; sharing ε too lowers ranking variance)."},
    )
    candidate_source: str = field(
        default="reference",
        metadata={"help": f"One of {CANDIDATE_SOURCES}: sample candidates from the reference (DeformPAM) "
                  "or the aligned policy."},
    )

    def __post_init__(self):
        if self.form not in DPO_FORMS:
            raise ValueError(f"`form` must be one of {DPO_FORMS}. Got {self.form!r}.")
        if self.tie_mode not in TIE_MODES:
            raise ValueError(f"`tie_mode` must be one of {TIE_MODES}. Got {self.tie_mode!r}.")
        if self.reference_mode not in REFERENCE_MODES:
            raise ValueError(f"`reference_mode` must be one of {REFERENCE_MODES}. "
                             f"Got {self.reference_mode!r}.")
        if self.candidate_source not in CANDIDATE_SOURCES:
            raise ValueError(f"`candidate_source` must be one of {CANDIDATE_SOURCES}. "
                             f"Got {self.candidate_source!r}.")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 < self.t_max_frac <= 1:
            raise ValueError(f"t_max_frac must be in (0, 1], got {self.t_max_frac}")
        if self.n_candidates < 1 or self.n_draws < 1:
            raise ValueError(f"n_candidates and n_draws must be >= 1, got {self.n_candidates} and "
                             f"{self.n_draws}")

    def to_dict(self) -> dict:
        return asdict(self)
