"""The trained user branch on disk, next to the LoRA, and how to put it on a U-Net.

A PPD run's ``output_dir`` holds:

=================================  ===================================================================================
``pytorch_lora_weights.safetensors``  the LoRA, when ``model.lora`` was set (``pipeline.load_lora_weights(dir)``)
``user_branch.safetensors``        W'_k, W'_v (and gates) of every cross-attention, the feature->token projection,
                                   and as metadata the :class:`UserBranchSpec` (token sizes, encoder config)
``user_embeddings.safetensors``    the cached encoder features of every training user (``user.<id>``: (K, N_f, D_f))
=================================  ===================================================================================

Using it with a plain diffusers pipeline::

    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(run_dir)                      # only if the run trained a LoRA
    spec = load_user_branch(pipe.unet, run_dir)          # installs the processors + projection
    encoder = build_user_encoder(spec.encoder)
    tokens = user_tokens(pipe.unet, encoder.encode(load_examples("me.jsonl")))  # (1, N_u, D_u)
    image = pipe(prompt, cross_attention_kwargs={"user_tokens": tokens}).images[0]

Without ``user_tokens`` the pipeline is the base model (plus the LoRA) exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .attention import install_user_branch, remove_user_branch, user_processors
from .user_encoder import UserEncoderConfig, UserProjection

USER_BRANCH_NAME = "user_branch.safetensors"
USER_EMBEDDINGS_NAME = "user_embeddings.safetensors"
FORMAT = "diffalign-ppd-user-branch"
VERSION = 1


@dataclass
class UserBranchSpec:
    """Everything needed to rebuild the branch: feature and token sizes, the branch scale and init, the encoder."""

    feature_shape: tuple[int, int]
    num_tokens: int
    token_dim: int
    scale: float = 1.0
    init: str = "zero_v"
    encoder: UserEncoderConfig = field(default_factory=UserEncoderConfig)

    def __post_init__(self):
        self.feature_shape = tuple(int(v) for v in self.feature_shape)
        if isinstance(self.encoder, dict):
            self.encoder = UserEncoderConfig(**self.encoder)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> UserBranchSpec:
        d = json.loads(text)
        if d.pop("format", None) != FORMAT:
            raise ValueError(f"not a diffalign PPD user branch (metadata format is not {FORMAT!r})")
        d.pop("version", None)
        return cls(**d)


def attach_user_branch(unet, spec: UserBranchSpec, *, fast: bool = True) -> UserProjection:
    """Install the decoupled cross-attention processors and the projection (as ``unet.user_projection``).

    New parameters are fp32 on the U-Net's device and trainable. Returns the projection.
    """
    install_user_branch(unet, spec.token_dim, scale=spec.scale, init=spec.init, fast=fast)
    device = next(unet.parameters()).device
    unet.user_projection = UserProjection(spec.feature_shape, spec.num_tokens, spec.token_dim).to(device)
    return unet.user_projection


def detach_user_branch(unet) -> None:
    """Undo :func:`attach_user_branch`: original processors back, projection removed."""
    remove_user_branch(unet)
    if hasattr(unet, "user_projection"):
        del unet.user_projection


def user_branch_state(unet) -> dict[str, torch.Tensor]:
    """The branch's weights: ``projection.*`` and ``<attn2 layer>.to_k_u.weight`` etc., fp32 on CPU."""
    state = {f"projection.{k}": v for k, v in unet.user_projection.state_dict().items()}
    for name, proc in user_processors(unet).items():
        state.update({f"{name}.{k}": v for k, v in proc.state_dict().items()})
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def branch_parameters(unet) -> list[torch.nn.Parameter]:
    params = list(unet.user_projection.parameters())
    for proc in user_processors(unet).values():
        params += list(proc.parameters())
    return params


def save_user_branch(unet, output_dir, spec: UserBranchSpec) -> Path:
    """Write ``output_dir/user_branch.safetensors`` (weights + spec as metadata)."""
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / USER_BRANCH_NAME
    tmp = path.with_suffix(".partial")
    save_file(user_branch_state(unet), str(tmp), metadata={"spec": spec.to_json()})
    tmp.replace(path)
    return path


def read_spec(directory) -> UserBranchSpec:
    from safetensors import safe_open

    path = _branch_file(directory)
    with safe_open(str(path), "pt") as f:
        return UserBranchSpec.from_json((f.metadata() or {}).get("spec", "{}"))


def _branch_file(directory) -> Path:
    path = Path(directory)
    path = path / USER_BRANCH_NAME if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no {USER_BRANCH_NAME} in {directory!s} (is it the output_dir of a PPD run?)")
    return path


def load_user_branch(unet, directory, *, fast: bool = True) -> UserBranchSpec:
    """Attach a saved branch to ``unet`` (any U-Net of the architecture it was trained on) and load its weights.

    The branch takes the U-Net's dtype and device and is frozen. Returns the spec (``spec.encoder`` rebuilds the
    user encoder for new users).
    """
    from safetensors.torch import load_file

    spec = read_spec(directory)
    state = load_file(str(_branch_file(directory)))
    if user_processors(unet):
        detach_user_branch(unet)
    attach_user_branch(unet, spec, fast=fast)
    expected = set(user_branch_state(unet))
    if expected != set(state):
        detach_user_branch(unet)
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise ValueError(f"user branch does not match this U-Net: missing {missing[:2]}, unexpected {extra[:2]}")
    unet.user_projection.load_state_dict({k[len("projection."):]: v for k, v in state.items()
                                          if k.startswith("projection.")})
    for name, proc in user_processors(unet).items():
        prefix = name + "."
        proc.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    dtype = next(p for n, p in unet.named_parameters() if "user_projection" not in n and ".processor." not in n).dtype
    for p in branch_parameters(unet):
        p.requires_grad_(False)
        p.data = p.data.to(dtype)
    return spec


@torch.no_grad()
def user_tokens(unet, features: torch.Tensor) -> torch.Tensor:
    """Features (N_f, D_f) or (B, N_f, D_f) -> tokens (B, N_u, D_u) through the attached projection."""
    proj = unet.user_projection
    p = next(proj.parameters())
    return proj(features.to(p.device, p.dtype))


def save_user_embeddings(features: dict[str, torch.Tensor], output_dir, meta: dict) -> Path:
    """``user.<id>`` -> (K, N_f, D_f) encoder features of each training user, with ``meta`` (json) as metadata."""
    from safetensors.torch import save_file

    path = Path(output_dir) / USER_EMBEDDINGS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({f"user.{k}": v.float().contiguous() for k, v in features.items()}, str(tmp),
              metadata={"meta": json.dumps(meta, sort_keys=True)})
    tmp.replace(path)
    return path


def load_user_embeddings(directory) -> tuple[dict[str, torch.Tensor], dict]:
    """``({user id: (K, N_f, D_f)}, meta)`` from ``directory/user_embeddings.safetensors``."""
    from safetensors import safe_open

    path = Path(directory)
    path = path / USER_EMBEDDINGS_NAME if path.is_dir() else path
    out = {}
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        for k in f.keys():
            out[k[len("user."):]] = f.get_tensor(k)
    return out, meta
