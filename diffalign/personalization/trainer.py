"""The PPD recipe: Diffusion-DPO where the policy sees the labelling user's embedding and the reference does
not.

Setup, on top of :class:`~diffalign.training.trainer.PreferenceTrainer`:

1. **User branch.** Decoupled cross-attention processors on every text cross-attention plus the feature->token
   projection (:func:`diffalign.personalization.io.attach_user_branch`). With ``model.lora: null`` the base
   U-Net is frozen and only the branch trains (the paper's setting; *not* full fine-tuning); with
   ``model.lora`` set the LoRA trains too.
2. **Users.** The dataset's ``user_column`` (Pick-a-Pic v2: ``user_id``) groups pairs by user. For each user,
   ``example_sets`` few-shot sets of ``num_examples`` of their pairs are drawn (seeded) and encoded once by
   the frozen user encoder; the features are cached in ``output_dir/user_embeddings.safetensors`` and reused
   on resume. The encoder is freed afterwards.
3. **Reference.** The base model without the user branch: the same U-Net called without user tokens (and with
   LoRA adapters disabled when a LoRA trains), so no copy of the U-Net is kept.

Each step: batches mix users (pairs are shuffled as usual); each pair's tokens ``u = P(f_user)`` are zeroed
with probability ``user_dropout`` (0.1 with a LoRA, 0 for branch-only training); the policy runs on
``[winners; losers]`` with ``cross_attention_kwargs={"user_tokens": [u; u]}``, the reference without; the
objective is Diffusion-DPO on those errors (:mod:`.objective`).

>>> cfg = load_config("configs/sd15_ppd.yaml")            # doctest: +SKIP
>>> trainer = PersonalizedTrainer(cfg).setup(); trainer.train(); trainer.cleanup()   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import UnreadableImage, decode_image
from ..models import AdapterDisabledReference, UNetCondition, UNetDenoiser, save_lora
from ..training.config import ConfigError
from ..training.trainer import PreferenceTrainer
from .attention import USER_KWARGS
from .io import (
    USER_EMBEDDINGS_NAME,
    UserBranchSpec,
    attach_user_branch,
    branch_parameters,
    load_user_embeddings,
    save_user_branch,
    save_user_embeddings,
)
from .user_encoder import PreferenceExample, build_user_encoder, encoder_feature_shape


def without_user(cond: UNetCondition) -> UNetCondition:
    """``cond`` with the user kwargs removed from ``cross_attention_kwargs``."""
    extra = dict(cond.extra)
    kwargs = {k: v for k, v in (extra.pop("cross_attention_kwargs", None) or {}).items()
              if k not in USER_KWARGS}
    if kwargs:
        extra["cross_attention_kwargs"] = kwargs
    return UNetCondition(cond.encoder_hidden_states, cond.added_cond_kwargs, extra)


class UserFreeReference:
    """PPD's reference: the wrapped denoiser called without user tokens, i.e. the base model (branch off)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, x_t, t, cond):
        return self.inner(x_t, t, without_user(cond))


class PersonalizedTrainer(PreferenceTrainer):
    """PPD (Dang et al., CVPR 2025, https://arxiv.org/abs/2501.06655): user-conditioned Diffusion-DPO."""

    # ------------------------------------------------------------------ setup
    def setup(self, resume: bool = False, overwrite: bool = False) -> PersonalizedTrainer:
        self.user_dropout = self._user_dropout()
        super().setup(resume=resume, overwrite=overwrite)
        self.unet_inner = self.accelerator.unwrap_model(self.unet)
        self._dropped = 0.0
        self._build_users()
        n_branch = sum(p.numel() for p in branch_parameters(self.unet_inner))
        self.accelerator.print(
            f"diffalign: PPD user branch: {n_branch:,} params "
            f"({'with LoRA' if self.config.model.lora else 'base frozen'}),"
            f" {len(self.support)} users, {len(self.user_features)} with features "
            f"{tuple(self.branch_spec.feature_shape)} -> {self.branch_spec.num_tokens} tokens x "
            f"{self.branch_spec.token_dim}")
        return self

    def _user_dropout(self) -> float:
        """``objective.user_dropout``, resolved: null is 0.1 with a LoRA and 0 for branch-only training, where
        a dropped pair (policy = reference: loss ln 2, no gradient) would only dilute the batch mean."""
        p = self.config.objective.params.user_dropout
        if self.config.model.lora is None:
            if p:
                raise ConfigError(
                    f"objective.user_dropout: {p} with model.lora null: only the user branch trains, so a "
                    "dropped pair has policy = reference (loss ln 2, zero gradient); set it to 0 (or null) "
                    "or add a LoRA")
            return 0.0
        return 0.1 if p is None else p

    def configure_model(self, unet) -> None:
        """The base stays frozen (``model.lora: null``, the paper's setting) or gets a LoRA; then the user branch is
        attached and trains."""
        p = self.config.objective.params
        if self.config.model.lora is None:
            unet.requires_grad_(False).to(self.accelerator.device)  # branch only: not full fine-tuning
            if self.weight_dtype != torch.float32:
                unet.to(dtype=self.weight_dtype)
        else:
            super().configure_model(unet)
        cross_dim = unet.config.cross_attention_dim
        cross_dim = cross_dim[0] if isinstance(cross_dim, (list, tuple)) else cross_dim
        self.branch_spec = UserBranchSpec(encoder_feature_shape(p.encoder), p.num_tokens,
                                          p.token_dim or cross_dim, p.scale, p.init, p.encoder)
        attach_user_branch(unet, self.branch_spec)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """LoRA parameters (if any), then the user branch's."""
        branch = branch_parameters(self.components.unet)
        ids = {id(q) for q in branch}
        return [q for q in super().trainable_parameters() if id(q) not in ids] + branch

    def build_reference(self, unet):
        """The base model without the branch: the same U-Net called without user tokens (LoRA adapters disabled
        when a LoRA trains); never a copy."""
        inner = AdapterDisabledReference(unet) if self.config.model.lora is not None else UNetDenoiser(unet)
        return UserFreeReference(inner)

    # ------------------------------------------------------------------ users
    def _cache_meta(self) -> dict:
        p, d = self.config.objective.params, self.config.dataset
        return {"encoder": dataclasses.asdict(p.encoder), "num_examples": p.num_examples,
                "example_sets": p.example_sets, "seed": self.config.seed, "dataset": str(d.source),
                "split": d.split, "max_samples": d.max_samples, "keep_ties": d.keep_ties,
                "user_column": p.user_column, "num_pairs": len(self.dataset)}

    def _build_users(self):
        p, acc, ds = self.config.objective.params, self.accelerator, self.dataset
        columns = list(ds.ds.column_names)
        if p.user_column not in columns:
            raise ConfigError(f"objective.user_column: the dataset has no column {p.user_column!r} "
                              f"(columns: {', '.join(sorted(columns))})")
        self.user_of = [str(u) for u in ds.ds[p.user_column]]  # dataset index -> user id
        groups: dict[str, list[int]] = {}
        for i, u in enumerate(self.user_of):
            groups.setdefault(u, []).append(i)
        rng = np.random.default_rng(self.config.seed)
        self.support = {  # user -> K few-shot sets of dataset indices
            u: [sorted(int(i) for i in rng.choice(idx, size=min(p.num_examples, len(idx)), replace=False))
                for _ in range(p.example_sets)]
            for u, idx in sorted(groups.items())
        }
        meta = self._cache_meta()
        path = self.output_dir / USER_EMBEDDINGS_NAME
        cached = None
        if path.exists():
            feats, old = load_user_embeddings(path)
            cached = feats if old == meta else None
        if cached is None:
            if acc.is_main_process:
                save_user_embeddings(self._encode_users(), self.output_dir, meta)
            acc.wait_for_everyone()
            cached, _ = load_user_embeddings(path)
        self.user_features = cached
        # per-dimension feature scale of the projection, from every training user's sets (deterministic)
        if cached:
            self.unet_inner.user_projection.fit_feature_scale(
                torch.cat([f for _, f in sorted(cached.items())]))

    def _example(self, index: int) -> PreferenceExample | None:
        try:
            raw_w, raw_l = self.dataset.raw_images(index)
            base = self.dataset.base_dir
            return PreferenceExample(self.dataset.caption(index), decode_image(raw_w, base),
                                     decode_image(raw_l, base))
        except UnreadableImage:
            return None

    def _encode_users(self) -> dict[str, torch.Tensor]:
        """Encode every user's few-shot sets; users whose examples are all unreadable get no features (always
        trained with the branch off)."""
        p = self.config.objective.params
        encoder = build_user_encoder(p.encoder, device=self.accelerator.device)
        users = list(self.support)
        out: dict[str, list[torch.Tensor]] = {}
        chunk = 16
        for start in tqdm(range(0, len(users), chunk), desc="encode users",
                          disable=not self.accelerator.is_local_main_process):
            lists, owners = [], []
            for u in users[start:start + chunk]:
                for index_set in self.support[u]:
                    examples = [e for e in (self._example(i) for i in index_set) if e is not None]
                    if examples:
                        lists.append(examples)
                        owners.append(u)
            if lists:
                feats = encoder.encode_users(lists)  # (S, N_f, D_f)
                for u, f in zip(owners, feats):
                    out.setdefault(u, []).append(f)
        del encoder
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {u: torch.stack(f) for u, f in out.items()}  # (K', N_f, D_f)

    def batch_user_tokens(self, batch: dict) -> torch.Tensor:
        """Tokens (B, N_u, D_u) of each pair's user: one of the user's K cached feature sets, projected, and
        zeroed with probability ``user_dropout`` (or when the user has no readable examples)."""
        spec = self.branch_spec
        indices = batch["indices"].tolist()
        b = len(indices)
        feats = torch.zeros((b, *spec.feature_shape))
        has = torch.zeros(b, dtype=torch.bool)
        for j, i in enumerate(indices):
            f = self.user_features.get(self.user_of[i])
            if f is not None:
                k = int(torch.randint(f.shape[0], (1,), generator=self.generator))
                feats[j], has[j] = f[k], True
        keep = has & (torch.rand(b, generator=self.generator) >= self.user_dropout)
        device = self.accelerator.device
        tokens = self.unet_inner.user_projection(feats.to(device))  # (B, N_u, D_u)
        self._dropped = 1.0 - keep.float().mean().item()
        return tokens * keep.to(device, tokens.dtype)[:, None, None]  # zero tokens: the branch adds exactly 0

    # ------------------------------------------------------------------ one step
    def condition(self, batch: dict) -> UNetCondition:
        cond = super().condition(batch)  # (2B) text condition, [winners; losers]
        tokens = self.batch_user_tokens(batch)  # (B, N_u, D_u)
        kwargs = {**cond.extra.get("cross_attention_kwargs", {}), "user_tokens": torch.cat([tokens, tokens])}
        cond.extra = {**cond.extra, "cross_attention_kwargs": kwargs}  # winner and loser: the same user
        return cond

    def compute_loss(self, batch: dict):
        out = super().compute_loss(batch)
        out.metrics["users/dropped"] = self._dropped
        return out

    # ------------------------------------------------------------------ outputs
    def export(self) -> None:
        """The LoRA (if one trained) and the user branch; no U-Net is written for branch-only training."""
        unet = self.accelerator.unwrap_model(self.unet)
        if self.config.model.lora is not None:
            save_lora(unet, self.output_dir, sdxl=self.components.is_sdxl)
        save_user_branch(unet, self.output_dir, self.branch_spec)
