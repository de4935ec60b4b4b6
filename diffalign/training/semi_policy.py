"""The SePPO recipe: winners from the data, losers sampled on-policy by a reference checkpoint from a pool.

Per step: draw a reference snapshot from the pool (``uniform`` / ``initial`` / ``latest``), sample x_r for the
batch prompts with it (no grad, DDIM + CFG for U-Nets, flow-ODE Euler steps for SD3/FLUX): that is the :meth:`~SemiPolicyTrainer.inputs` step; the rest is the
shared recipe: one policy call on ``[x_w; x_r]`` and one no-grad call of the snapshot on the same inputs; the SePPO objective applies the anchor-based flipper. A snapshot of the trainable
weights joins the pool every ``snapshot_every`` steps (the initial one is always kept, then the latest K-1); the
pool is saved in every checkpoint, so ``--resume`` continues with the same references. LoRA only: a snapshot is
the adapter weights (kB-MB), and the reference call swaps them in and back out.
"""

from __future__ import annotations

import torch

from ..models.denoiser import make_denoiser
from ..models.text import build_condition, sdxl_time_ids
from ..sampling import sample_latents
from .trainer import PreferenceTrainer


class _Reparametrized:
    """``module`` called with the parameters named in ``state`` replaced (``torch.func.functional_call``, no grad):
    the module's own parameters are never touched, so the policy's autograd graph stays valid. Other attributes
    (``config``, …) are the module's."""

    def __init__(self, module: torch.nn.Module):
        self._module = module
        self.state: dict[str, torch.Tensor] | None = None

    def __call__(self, *args, **kwargs):
        from torch.func import functional_call

        with torch.no_grad():
            return functional_call(self._module, self.state, args, kwargs)

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


class SnapshotReference:
    """The policy network run with a snapshot of its trainable weights (``state``), through the family's denoiser
    (U-Net, SD3 or FLUX transformer)."""

    def __init__(self, family: str, module: torch.nn.Module, guidance_scale: float):
        self._weights = _Reparametrized(module)
        self._denoiser = make_denoiser(family, self._weights, guidance_scale)

    @property
    def state(self) -> dict[str, torch.Tensor] | None:
        return self._weights.state

    @state.setter
    def state(self, value: dict[str, torch.Tensor]):
        self._weights.state = value

    def __call__(self, x_t, t, cond):
        return self._denoiser(x_t, t, cond)


class SemiPolicyTrainer(PreferenceTrainer):
    def setup(self, resume: bool = False, overwrite: bool = False):
        if self.config.model.lora is None:
            from .config import ConfigError

            raise ConfigError("model.lora: SePPO keeps a pool of reference checkpoints and needs LoRA (set model.lora)")
        self.pool: list[tuple[int, dict[str, torch.Tensor]]] = []
        super().setup(resume=resume, overwrite=overwrite)
        if not self.pool:
            self.pool.append((self.step, self._snapshot()))
        return self

    def build_reference(self, unet):
        """A previous checkpoint of the LoRA (drawn from the pool each step), run on the same U-Net."""
        return SnapshotReference(self.components.family, unet, self.config.model.flux_guidance)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: v.detach().clone().cpu() for n, v in self.trainable_state().items()}

    def pick_reference(self) -> dict[str, torch.Tensor]:
        strategy = self.config.objective.params.reference_strategy
        if strategy == "initial":
            return self.pool[0][1]
        if strategy == "latest":
            return self.pool[-1][1]
        i = int(torch.randint(len(self.pool), (1,), generator=self.generator))
        return self.pool[i][1]

    def after_step(self):
        p = self.config.objective.params
        if self.step % p.snapshot_every == 0:
            self.pool.append((self.step, self._snapshot()))
            if len(self.pool) > p.max_snapshots:
                del self.pool[1]  # keep the initial checkpoint, drop the oldest of the others

    def inputs(self, batch: dict):
        """``[x_w; x_r]`` (2B, C, h, w): the data's winners, and as losers samples of a reference snapshot from the
        pool for the same prompts (no grad, the family's sampler with CFG under the real prompts:
        :func:`diffalign.sampling.sample_latents`). The condition is the shared
        :meth:`condition` (prompt dropout included); the reference errors use the same snapshot."""
        p, c = self.config.objective.params, self.components
        b = batch["size"]
        x_w = self.encode_latents(batch)[:b]  # (B, C, h, w): the data's winners only
        text = self.encode_text(list(batch["captions"]))
        empty = self.encode_text([""] * b)
        time_ids = None
        if c.is_sdxl:
            r = self.config.dataset.resolution
            time_ids = sdxl_time_ids(batch["original_sizes"], batch["crops_top_left"], (r, r))
        cond, uncond = build_condition(text, time_ids), build_condition(empty, time_ids)
        self.reference.state = {k: v.to(self.accelerator.device) for k, v in self.pick_reference().items()}
        x_r = sample_latents(self.reference, c.noise_scheduler, cond, None if c.family == "flux" else uncond,
                             tuple(x_w.shape),
                             num_inference_steps=p.sampling_steps, guidance_scale=p.guidance_scale,
                             generator=self.generator, device=x_w.device, dtype=self.weight_dtype)
        return torch.cat([x_w, x_r.to(x_w.dtype)]), self.condition(batch)

    def checkpoint_extras(self):
        tensors, meta = super().checkpoint_extras()
        tensors.update({f"pool.{i}.{n}": v for i, (_, s) in enumerate(self.pool) for n, v in s.items()})
        return tensors, {**meta, "pool_steps": [step for step, _ in self.pool]}

    def restore_extras(self, tensors, meta):
        super().restore_extras(tensors, meta)
        self.pool = []
        for i, step in enumerate(meta["pool_steps"]):
            prefix = f"pool.{i}."
            self.pool.append((step, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}))
