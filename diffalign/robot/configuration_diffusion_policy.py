"""Configuration of the observation-conditioned diffusion action policy (lerobot-style config/modeling split).

Defaults follow Diffusion Policy (Chi et al., RSS 2023; ``real-stanford/diffusion_policy`` @ 5ba07ac6) where they apply
to a CPU toy: 100 DDPM training steps, ``squaredcos_cap_v2``, ε-prediction, ``clip_sample`` on actions normalised to
[-1, 1]. Sampling uses DDIM with fewer steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

OBS_ENCODERS = ("identity", "mlp", "pointnet")
DENOISERS = ("mlp", "unet1d")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass
class DiffusionPolicyConfig:
    # Action chunk.
    horizon: int = field(default=8, metadata={"help": "H: actions per chunk (Diffusion Policy: 16)."})
    action_dim: int = field(default=2, metadata={"help": "Da: dimensions of one action."})

    # Observation encoder.
    obs_encoder: str = field(
        default="mlp",
        metadata={"help": f"One of {OBS_ENCODERS}. `pointnet` takes (B, P, point_dim) point clouds "
                  "(a CPU-light stand-in for DeformPAM's sparse ResUNet + transformer)."},
    )
    obs_dim: int = field(default=7, metadata={"help": "Feature-vector size (identity / mlp encoders)."})
    point_dim: int = field(default=3, metadata={"help": "Channels per point (pointnet encoder), e.g. x, y, type."})
    pointnet_dims: tuple[int, ...] = field(
        default=(64, 128, 256), metadata={"help": "Widths of the shared per-point MLP before the max-pool."}
    )
    cond_dim: int = field(default=64, metadata={"help": "Size of the encoded observation (mlp / pointnet)."})

    # Denoiser.
    denoiser: str = field(default="mlp", metadata={"help": f"One of {DENOISERS}."})
    hidden_dim: int = field(default=256, metadata={"help": "Width of the MLP denoiser's residual blocks."})
    n_blocks: int = field(default=3, metadata={"help": "Residual FiLM blocks of the MLP denoiser."})
    time_embed_dim: int = field(default=64, metadata={"help": "Sinusoidal timestep embedding size."})
    unet_down_dims: tuple[int, ...] = field(
        default=(64, 128), metadata={"help": "Channels per level of the 1-D U-Net (Diffusion Policy: 256, 512, 1024)."}
    )
    unet_kernel_size: int = field(default=5, metadata={"help": "1-D convolution kernel (Diffusion Policy: 5)."})

    # Noise scheduler.
    num_train_timesteps: int = field(default=100, metadata={"help": "T of the DDPM forward process."})
    beta_schedule: str = field(default="squaredcos_cap_v2", metadata={"help": "diffusers beta schedule name."})
    prediction_type: str = field(default="epsilon", metadata={"help": f"One of {PREDICTION_TYPES}."})
    clip_sample: bool = field(default=True, metadata={"help": "Clip x0 estimates to [-1, 1] while sampling."})

    # Inference.
    num_inference_steps: int = field(default=10, metadata={"help": "DDIM steps when sampling."})
    ddim_eta: float = field(default=1.0, metadata={"help": "DDIM η (DeformPAM: 0 or 1; 1 keeps samples diverse)."})

    def __post_init__(self):
        if self.obs_encoder not in OBS_ENCODERS:
            raise ValueError(f"`obs_encoder` must be one of {OBS_ENCODERS}. Got {self.obs_encoder!r}.")
        if self.denoiser not in DENOISERS:
            raise ValueError(f"`denoiser` must be one of {DENOISERS}. Got {self.denoiser!r}.")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}. Got {self.prediction_type!r}.")
        if self.horizon < 1 or self.action_dim < 1:
            raise ValueError(f"horizon and action_dim must be >= 1, got {self.horizon} and {self.action_dim}")
        if self.denoiser == "unet1d" and self.horizon % (2 ** (len(self.unet_down_dims) - 1)):
            raise ValueError(
                f"the 1-D U-Net halves the horizon {len(self.unet_down_dims) - 1} times; horizon {self.horizon} "
                f"is not divisible by {2 ** (len(self.unet_down_dims) - 1)}"
            )
        if not 0 < self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {self.num_inference_steps}"
            )
        self.pointnet_dims = tuple(self.pointnet_dims)
        self.unet_down_dims = tuple(self.unet_down_dims)

    @property
    def flat_action_dim(self) -> int:
        return self.horizon * self.action_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pointnet_dims"] = list(self.pointnet_dims)
        d["unet_down_dims"] = list(self.unet_down_dims)
        return d
