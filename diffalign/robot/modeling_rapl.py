"""RAPL head: align a visual encoder φ with preference triplets, then reward trajectories by optimal transport.

For a triplet ξ_A ≻ ξ_B ≻ ξ_C of videos (T frames each), with ``R(X|A) = Σ_t r_t`` the OT reward of X's frames against
A's frames (:func:`diffalign.robot.ot.ot_step_rewards`), RAPL trains φ so that ``p = σ(R(B|A) - R(C|A))`` is high
(:func:`diffalign.robot.objectives.rapl_triplet_loss`). The aligned φ then scores any trajectory against the preferred
demonstrations (``RAPLReward``), and that reward ranks policy rollouts into pairs for the Diffusion-DPO head.

Encoders map frames (N, 3, H, W) in [0, 1] to (N, d): ``SmallCNN`` by default, or ``TorchvisionEncoder`` (a named
torchvision backbone with a frozen trunk and a trainable linear head; random init or a local weights file).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .configuration_rapl import RAPLConfig
from .objectives import rapl_triplet_loss
from .ot import ot_reward, ot_step_rewards


class SmallCNN(nn.Module):
    """Stride-2 conv stack + global max pool + linear: (N, 3, H, W) -> (N, emb_dim).

    Max pooling (not RAPL's ResNet average pool) keeps small, sparse cues such as a few pixels of trail visible.
    """

    def __init__(self, emb_dim: int = 32, channels: tuple[int, ...] = (16, 32, 64), in_channels: int = 3):
        super().__init__()
        layers, c_in = [], in_channels
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, emb_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(frames).amax(dim=(2, 3)))  # (N, C, h, w) -> (N, C) -> (N, d)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _strip_classifier(model: nn.Module) -> nn.Module:
    """Replace the classification layer of a torchvision model by Identity (``fc``, ``classifier`` or ``heads``)."""
    for name in ("fc", "classifier", "heads", "head"):
        if hasattr(model, name) and isinstance(getattr(model, name), nn.Module):
            setattr(model, name, nn.Identity())
            return model
    raise ValueError(f"don't know where the classifier of {type(model).__name__} is (tried fc, classifier, heads, head)")


class TorchvisionEncoder(nn.Module):
    """A torchvision backbone by name (``torchvision.models.get_model(name, weights=None)``) with its classifier
    removed, a frozen trunk (unless ``train_backbone``) kept in eval mode, and a trainable linear head.

    ``weights``: an optional local file holding the *full* torchvision state dict (classifier included), loaded
    strictly before the classifier is stripped. Inputs in [0, 1] are normalised with the ImageNet mean/std when
    ``imagenet_norm`` (RAPL's code feeds [0, 1] pixels without it; default off).
    """

    def __init__(self, name: str = "resnet18", emb_dim: int = 32, *, weights: str | Path | None = None,
                 train_backbone: bool = False, imagenet_norm: bool = False, probe_size: int = 32):
        super().__init__()
        import torchvision

        trunk = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            trunk.load_state_dict(load_state_dict_file(weights))
        self.trunk = _strip_classifier(trunk)
        self.train_backbone = train_backbone
        for p in self.trunk.parameters():
            p.requires_grad_(train_backbone)
        self.trunk.eval()
        with torch.no_grad():
            feat_dim = self.trunk(torch.zeros(1, 3, probe_size, probe_size)).reshape(1, -1).shape[1]
        self.head = nn.Linear(feat_dim, emb_dim)
        self.imagenet_norm = imagenet_norm
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_backbone:
            self.trunk.eval()  # frozen BatchNorm statistics
        return self

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = (frames - self.mean) / self.std if self.imagenet_norm else frames
        feats = self.trunk(x).reshape(frames.shape[0], -1)
        return self.head(feats)


def build_encoder(config: RAPLConfig) -> nn.Module:
    if config.encoder == "small_cnn":
        return SmallCNN(config.emb_dim, config.cnn_channels)
    return TorchvisionEncoder(config.backbone, config.emb_dim, weights=config.backbone_weights,
                              train_backbone=config.train_backbone)


def embed_frames(encoder: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """(B, T, 3, H, W) -> (B, T, d)."""
    b, t = frames.shape[:2]
    return encoder(frames.reshape(b * t, *frames.shape[2:])).view(b, t, -1)


class RAPLReward:
    """``R(ξ) = Σ_t r_t`` of trajectories against preferred demonstrations in φ's embedding.

    ``demo_frames``: (K, T', 3, H, W) shared by every trajectory, or None to pass per-trajectory demonstrations
    (B, K, T', 3, H, W) at call time. Call with frames (B, T, 3, H, W) -> (B,) totals.
    """

    def __init__(self, encoder: nn.Module, demo_frames: torch.Tensor | None, config: RAPLConfig):
        self.encoder, self.config = encoder, config
        self.demo_frames = demo_frames

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, demo_frames: torch.Tensor | None = None, *,
                 batch: int = 128) -> torch.Tensor:
        cfg = self.config
        self.encoder.eval()
        shared = None
        if demo_frames is None:
            if self.demo_frames is None:
                raise ValueError("no demonstrations: give demo_frames here or to the constructor")
            shared = embed_frames(self.encoder, self.demo_frames)  # (K, T', d)
        out = []
        for i in range(0, frames.shape[0], batch):
            emb = embed_frames(self.encoder, frames[i:i + batch])
            if shared is None:
                demos = demo_frames[i:i + batch]  # (b, K, T', 3, H, W)
                demos = embed_frames(self.encoder, demos.flatten(0, 1)).view(*demos.shape[:3], -1)
            else:
                demos = shared
            total, _ = ot_reward(emb, demos, eps=cfg.eps, n_iters=cfg.sinkhorn_iters, cost=cfg.cost,
                                 reduce=cfg.demo_reduce)
            out.append(total)
        return torch.cat(out)


def triplet_rewards(encoder: nn.Module, anchor: torch.Tensor, better: torch.Tensor, worse: torch.Tensor,
                    config: RAPLConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``R(B|A)``, ``R(C|A)`` for a batch of triplets of frames (B, T, 3, H, W) each: (B,), (B,), with gradients."""
    b = anchor.shape[0]
    emb = embed_frames(encoder, torch.cat([anchor, better, worse]))  # (3B, T, d)
    e_a, e_b, e_c = emb.split(b)
    kw = {"eps": config.eps, "n_iters": config.sinkhorn_iters, "cost": config.cost}
    r_better = ot_step_rewards(e_b, e_a, **kw).sum(dim=1)
    r_worse = ot_step_rewards(e_c, e_a, **kw).sum(dim=1)
    return r_better, r_worse


class RAPLHead:
    """Fine-tune ``encoder`` on triplets (anchor ≻ better ≻ worse) and build the OT reward from it.

    >>> head = RAPLHead(RAPLConfig(eps=0.1))
    >>> history = head.fit(anchor, better, worse, seed=0)   # (N, T, 3, H, W) frames each
    >>> reward = head.reward(demo_frames)                  # RAPLReward; reward(frames) -> (B,)
    """

    def __init__(self, config: RAPLConfig | None = None, encoder: nn.Module | None = None):
        self.config = config or RAPLConfig()
        self.encoder = encoder if encoder is not None else build_encoder(self.config)

    def loss(self, anchor, better, worse, *, tie: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        r_better, r_worse = triplet_rewards(self.encoder, anchor, better, worse, self.config)
        losses = rapl_triplet_loss(r_better, r_worse, form=self.config.loss_form, tie=tie)
        acc = (r_better > r_worse).float().mean().item()
        loss = losses.sum() if self.config.reduction == "sum" else losses.mean()
        return loss, {"triplets/accuracy": acc, "triplets/margin": (r_better - r_worse).mean().item()}

    @torch.no_grad()
    def accuracy(self, anchor, better, worse, *, batch: int = 64) -> float:
        self.encoder.eval()
        hits = []
        for i in range(0, anchor.shape[0], batch):
            rb, rw = triplet_rewards(self.encoder, anchor[i:i + batch], better[i:i + batch], worse[i:i + batch],
                                     self.config)
            hits.append((rb > rw).float())
        return torch.cat(hits).mean().item()

    def fit(self, anchor: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, *, seed: int = 0,
            log_every: int = 0) -> list[dict[str, float]]:
        """Adam on the trainable encoder parameters; keeps the checkpoint with the best validation accuracy
        (RAPL code), validation = the last ``val_frac`` of a seeded permutation of the triplets."""
        cfg = self.config
        g = torch.Generator().manual_seed(seed)
        n = anchor.shape[0]
        perm = torch.randperm(n, generator=g)
        n_val = round(n * cfg.val_frac)
        train_idx, val_idx = perm[: n - n_val], perm[n - n_val:]
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        best_acc, best_state, history = -1.0, None, []
        for epoch in range(cfg.epochs):
            self.encoder.train()
            order = train_idx[torch.randperm(len(train_idx), generator=g)]
            losses = []
            for i in range(0, len(order), cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                loss, _ = self.loss(anchor[idx], better[idx], worse[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            val_acc = self.accuracy(anchor[val_idx], better[val_idx], worse[val_idx]) if n_val else float("nan")
            record = {"epoch": epoch, "loss": float(np.mean(losses)), "val/accuracy": val_acc}
            history.append(record)
            if log_every and epoch % log_every == 0:
                print(" ".join(f"{k}={v:.4g}" for k, v in record.items()), flush=True)
            if n_val and val_acc > best_acc:
                best_acc, best_state = val_acc, copy.deepcopy(self.encoder.state_dict())
        if best_state is not None:
            self.encoder.load_state_dict(best_state)
        self.encoder.eval()
        return history

    def reward(self, demo_frames: torch.Tensor | None = None) -> RAPLReward:
        return RAPLReward(self.encoder, demo_frames, self.config)
