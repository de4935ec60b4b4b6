"""Configuration of the RAPL head: preference alignment of a visual encoder, then an optimal-transport reward.

RAPL: Tian, Xu, Tomizuka, Malik, Bajcsy, "What Matters to You? Towards Visual Representation Alignment for
Robot Learning", ICLR 2024, https://arxiv.org/abs/2310.07932. "RAPL code" defaults refer to Ran Tian's
research fork ``thomasrantian/mvp`` (``preference_representation_train/``; not an official release).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .objectives import REDUCTIONS, TRIPLET_FORMS
from .ot import COSTS, DEMO_REDUCTIONS

ENCODERS = ("small_cnn", "torchvision")


@dataclass
class RAPLConfig:
    # Encoder.
    encoder: str = field(
        default="small_cnn",
        metadata={"help": f"One of {ENCODERS}. `torchvision`: a backbone by name (`backbone`) with a frozen "
                  "trunk and a trainable linear head (RAPL HEAD script: ResNet-18, frozen, 512 -> 32)."},
    )
    emb_dim: int = field(default=32, metadata={"help": "Embedding size d of φ (RAPL code: 32)."})
    cnn_channels: tuple[int, ...] = field(default=(16, 32, 64), metadata={"help": "SmallCNN conv widths."})
    backbone: str = field(
        default="resnet18", metadata={"help": "torchvision model name (`torchvision.models.get_model`)."}
    )
    backbone_weights: str | None = field(
        default=None,
        metadata={"help": "Local weights file for the backbone (.safetensors or a torch state dict, loaded "
                  "with weights_only=True). None = random init (no hub downloads)."},
    )
    train_backbone: bool = field(default=False, metadata={"help": "Also train the torchvision trunk."})

    # Optimal-transport reward.
    eps: float = field(
        default=1.0, metadata={"help": "Sinkhorn ε (RAPL parity: 1 = ddn OptimalTransportLayer(γ=1))."}
    )
    sinkhorn_iters: int = field(
        default=100, metadata={"help": "Sinkhorn iterations (unrolled for gradients)."}
    )
    cost: str = field(default="cosine", metadata={"help": f"One of {COSTS} (RAPL code: cosine at c4ef8e2)."})
    demo_reduce: str = field(
        default="best", metadata={"help": f"One of {DEMO_REDUCTIONS}; best = closest demo (RAPL)."}
    )

    # Triplet loss and optimisation.
    loss_form: str = field(
        default="rapl_code",
        metadata={"help": f"One of {TRIPLET_FORMS}: the RAPL code's 1 - p (default), "
                  "or Bradley-Terry -log p."},
    )
    reduction: str = field(
        default="sum",
        metadata={"help": f"One of {REDUCTIONS} over the triplets of a batch (RAPL code: sum)."},
    )
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate (RAPL code: 1e-3)."})
    epochs: int = field(default=30, metadata={"help": "Passes over the triplets (RAPL code: 50 or 100)."})
    batch_size: int = field(default=10, metadata={"help": "Triplets per step (RAPL code: 10)."})
    val_frac: float = field(
        default=0.2, metadata={"help": "Held-out triplets for best-checkpoint selection (RAPL: 0.2-0.3)."}
    )

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"`encoder` must be one of {ENCODERS}. Got {self.encoder!r}.")
        if self.cost not in COSTS:
            raise ValueError(f"`cost` must be one of {COSTS}. Got {self.cost!r}.")
        if self.demo_reduce not in DEMO_REDUCTIONS:
            raise ValueError(f"`demo_reduce` must be one of {DEMO_REDUCTIONS}. Got {self.demo_reduce!r}.")
        if self.loss_form not in TRIPLET_FORMS:
            raise ValueError(f"`loss_form` must be one of {TRIPLET_FORMS}. Got {self.loss_form!r}.")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {REDUCTIONS}. Got {self.reduction!r}.")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not 0 <= self.val_frac < 1:
            raise ValueError(f"val_frac must be in [0, 1), got {self.val_frac}")
        self.cnn_channels = tuple(self.cnn_channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cnn_channels"] = list(self.cnn_channels)
        return d
