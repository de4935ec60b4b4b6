"""One optimizer step of each training strategy, on the same components, data rows, batch, dtype and seed.

=============  ===========================================================================================
strategy       what one step does
=============  ===========================================================================================
``official``   SalesforceAIResearch/DiffusionDPO ``train.py`` @ 5233e75 (SD1.5 branch of the training loop):
               full fine-tuning, a second full frozen U-Net as reference called separately under no_grad,
               winner and loser batched (2B) for both, VAE encode + text encode every step, AdamW on 859.5 M
               params, ``clip_grad_norm_``.
``diffusers``  huggingface/diffusers ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``
               @ 58eb52c: LoRA r=8 on to_q/k/v/out.0, reference = the same U-Net after ``disable_adapters()``
               under no_grad, winner+loser batched, VAE encode (chunks of 8) + text encode every step.
``ours``       ``diffalign.training.PreferenceTrainer.training_step``, the step ``train()`` calls (dataset item ->
               ``collate_pairs`` -> ``inputs`` (latents and condition, with the latent/text cache) -> ``noise`` ->
               ``errors`` -> objective -> backward -> finite check -> clip -> step). LoRA r=8, reference =
               adapters disabled under no_grad, one policy call on the 2B batch. A step over pairs never seen
               is a cache miss (first epoch); over seen pairs a hit (epoch 2+).
=============  ===========================================================================================

The two baselines are re-implementations of the scripts' loop bodies (quoted line for line where it matters:
noise/timestep sharing, which calls sit under no_grad, the loss), not the scripts themselves: the scripts need
a download, wandb and xformers. ``/work/shared/research/baseline-cpu.md`` ran the real scripts on CPU; its per-step
times are the cross-check for these re-implementations. Data: all three read pixels through
``diffalign.data.PreferencePairs`` (same decode, center crop, no flip), so only the strategies differ.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from diffalign.data import PairTransform, PreferencePairs, collate_pairs

BETA = 5000.0  # official convention (the diffusers example's 2500 without the 1/2 is the same logit)
LORA_RANK = 8
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
STRATEGIES = ("official", "diffusers", "ours")


def _accelerator():
    from accelerate import Accelerator

    # mixed_precision "no": every strategy runs fp32 (the CPU baselines in research/baseline-cpu.md did too).
    return Accelerator(mixed_precision="no")


def _pairs(world) -> PreferencePairs:
    transform = PairTransform(world.resolution, center_crop=True, random_flip=False)
    return PreferencePairs(str(world.data_dir), transform=transform, max_samples=world.num_pairs, seed=0)


def _tokenize(tokenizer, captions):
    return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


class _Baseline:
    """Shared data path of the two script re-implementations: decoded pixels ``[winners; losers]`` + token ids."""

    name = "baseline"

    def __init__(self, world, components, device="cpu"):
        self.world, self.c, self.device = world, components, torch.device(device)
        self.pairs = _pairs(world)
        self.generator = torch.Generator().manual_seed(0)
        self.acc = _accelerator()

    def batch(self, indices):
        items = [self.pairs[i] for i in indices]
        # The scripts stack winner and loser on the channel dim and ``torch.cat(x.chunk(2, dim=1))`` them back to
        # (2B, 3, R, R), winners first; the result is this concatenation.
        pixels = torch.cat([torch.stack([x["pixels_w"] for x in items]), torch.stack([x["pixels_l"] for x in items])])
        ids = _tokenize(self.c.tokenizer, [x["caption"] for x in items])
        return pixels.to(self.device), ids.to(self.device)


class OfficialStep(_Baseline):
    """Full fine-tuning + a second frozen U-Net (SalesforceAIResearch/DiffusionDPO ``train.py``, SD1.5 path).

    ``optimizer="sgd"`` is a measurement aid, not the official recipe: a stateless SGD instead of AdamW, for a
    machine where the 6.4 GiB of AdamW state at SD1.5 size does not fit; :func:`bench.jobs.job_optimizer_step`
    times ``AdamW.step`` and ``SGD.step`` on the same parameters so the official step time can be rebuilt.
    """

    name = "official"

    def __init__(self, world, components, device="cpu", optimizer: str = "adamw"):
        super().__init__(world, components, device)
        c = self.c
        c.vae.requires_grad_(False).to(self.device)
        c.text_encoder.requires_grad_(False).to(self.device)
        # train.py loads ``ref_unet`` with a second ``from_pretrained`` of the same weights; a deep copy is the same.
        self.ref_unet = copy.deepcopy(c.unet).requires_grad_(False).to(self.device)
        unet = c.unet.requires_grad_(True).to(self.device).train()
        if optimizer == "adamw":  # train.py: torch.optim.AdamW unless --use_adafactor / --use_8bit_adam
            optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-8, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        else:
            optimizer = torch.optim.SGD(unet.parameters(), lr=1e-8)
        self.unet, self.optimizer = self.acc.prepare(unet, optimizer)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler("constant_with_warmup", self.optimizer, num_warmup_steps=0)

    def step(self, indices) -> float:
        c, acc = self.c, self.acc
        pixels, ids = self.batch(indices)
        with acc.accumulate(self.unet):
            with torch.no_grad():
                latents = c.vae.encode(pixels).latent_dist.sample() * c.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (bsz,),
                                      device=latents.device).long()
            timesteps = timesteps.chunk(2)[0].repeat(2)  # same t and noise for winner and loser
            noise = noise.chunk(2)[0].repeat(2, 1, 1, 1)
            noisy_latents = c.noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = c.text_encoder(ids)[0]  # train.py: outside no_grad (frozen weights)
            encoder_hidden_states = encoder_hidden_states.repeat(2, 1, 1)
            target = noise
            model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states).sample
            model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
            model_losses_w, model_losses_l = model_losses.chunk(2)
            raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
            model_diff = model_losses_w - model_losses_l
            with torch.no_grad():
                ref_pred = self.ref_unet(noisy_latents, timesteps, encoder_hidden_states).sample.detach()
                ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
                ref_losses_w, ref_losses_l = ref_losses.chunk(2)
                ref_diff = ref_losses_w - ref_losses_l
                raw_ref_loss = ref_losses.mean()
            inside_term = -0.5 * BETA * (model_diff - ref_diff)
            implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
            loss = -1 * F.logsigmoid(inside_term).mean()
            # logging the script does every step (each .item() is a sync on GPU)
            _ = (acc.gather(loss.repeat(1)).mean().item(), raw_model_loss.item(), raw_ref_loss.item(),
                 implicit_acc.item())
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.unet.parameters(), 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return loss.item()


class DiffusersStep(_Baseline):
    """LoRA + reference by ``disable_adapters()`` (diffusers ``train_diffusion_dpo.py``).

    ``unet``: pass an already LoRA-injected U-Net to share it with :class:`OursStep` (interleaved timing in one
    process); by default the components' U-Net gets its own adapter.
    """

    name = "diffusers"
    vae_encode_batch_size = 8  # the script's default

    def __init__(self, world, components, device="cpu", unet=None):
        super().__init__(world, components, device)
        c = self.c
        c.vae.requires_grad_(False).to(self.device)
        c.text_encoder.requires_grad_(False).to(self.device)
        if unet is None:
            from peft import LoraConfig

            unet = c.unet.requires_grad_(False).to(self.device)
            unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                        target_modules=LORA_TARGETS))
        self.params = [p for p in unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.unet, self.optimizer = self.acc.prepare(unet, optimizer)
        self.unet.train()
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler("constant", self.optimizer)

    def step(self, indices) -> float:
        c, acc = self.c, self.acc
        pixels, ids = self.batch(indices)
        with acc.accumulate(self.unet):
            feed = pixels
            latents = []
            for i in range(0, feed.shape[0], self.vae_encode_batch_size):  # frozen VAE, no no_grad in the script
                latents.append(c.vae.encode(feed[i: i + self.vae_encode_batch_size]).latent_dist.sample())
            latents = torch.cat(latents, dim=0) * c.vae.config.scaling_factor
            noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
            bsz = latents.shape[0] // 2
            timesteps = torch.randint(0, c.noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device,
                                      dtype=torch.long).repeat(2)
            noisy_model_input = c.noise_scheduler.add_noise(latents, noise, timesteps)
            with torch.no_grad():  # encode_prompt is decorated @torch.no_grad()
                encoder_hidden_states = c.text_encoder(ids, attention_mask=None)[0]
            encoder_hidden_states = encoder_hidden_states.repeat(2, 1, 1)
            model_pred = self.unet(noisy_model_input, timesteps, encoder_hidden_states).sample
            target = noise
            model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
            model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
            model_losses_w, model_losses_l = model_losses.chunk(2)
            raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
            model_diff = model_losses_w - model_losses_l
            acc.unwrap_model(self.unet).disable_adapters()
            with torch.no_grad():
                ref_preds = self.unet(noisy_model_input, timesteps, encoder_hidden_states).sample.detach()
                ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
                ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
                ref_losses_w, ref_losses_l = ref_loss.chunk(2)
                ref_diff = ref_losses_w - ref_losses_l
                raw_ref_loss = ref_loss.mean()
            acc.unwrap_model(self.unet).enable_adapters()
            logits = ref_diff - model_diff
            loss = -1 * F.logsigmoid(BETA / 2 * logits).mean()  # the script's beta_dpo=2500 = 5000/2 here
            implicit_acc = (logits > 0).sum().float() / logits.size(0)
            implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        _ = (raw_model_loss.item(), raw_ref_loss.item(), implicit_acc.item())  # the script's per-step logs
        return loss.item()


def ours_config(world, output_dir: Path, cache_dir: Path | None, **model_overrides) -> dict:
    """The ``diffalign train`` config of the ours strategy (what a user's YAML would hold)."""
    return {
        "model": {"family": "sd15", "lora": {"rank": LORA_RANK}, **model_overrides},
        "dataset": {"source": str(world.data_dir), "resolution": world.resolution, "center_crop": True,
                    "random_flip": False, "max_samples": world.num_pairs,
                    "cache_dir": None if cache_dir is None else str(cache_dir)},
        "objective": {"name": "dpo", "beta": BETA},
        "output_dir": str(output_dir),
        "max_steps": 10_000,
        "batch_size": world.batch_pairs,
        "mixed_precision": "no",
        "report_to": None,
        "checkpoint_every": None,
        "optimizer": {"learning_rate": 1e-5, "warmup_steps": 0},
    }


class OursStep:
    """diffalign's real step: :class:`~diffalign.training.PreferenceTrainer` set up on the world's components.

    ``cache_dir``: where the latent/text cache lives (``None``: no cache, every step encodes).
    """

    name = "ours"

    def __init__(self, world, components, output_dir: Path, cache_dir: Path | None, device="cpu",
                 **model_overrides):
        from diffalign.training.config import parse_config
        from diffalign.training.trainer import PreferenceTrainer

        if torch.device(device).type != "cpu":
            components.unet.to(device)  # the trainer moves every component to accelerator.device itself
        cfg = parse_config(ours_config(world, output_dir, cache_dir, **model_overrides))
        self.trainer = PreferenceTrainer(cfg, components).setup(overwrite=True)
        self.seen: set[int] = set()
        self.autocast: torch.dtype | None = None  # the bf16-autocast ablation sets torch.bfloat16

    @property
    def unet(self):
        return self.trainer.unet

    def step(self, indices) -> float:
        """:meth:`PreferenceTrainer.training_step` on one batch (loss, backward, clip, optimizer step), then the
        learning-rate step ``train()`` takes after it; no logging or checkpoint I/O. The bf16 ablation runs the
        whole step under ``torch.autocast``."""
        tr = self.trainer
        batch = collate_pairs([tr.dataset[i] for i in indices])  # DataLoader(num_workers=0) does exactly this
        with torch.autocast(tr.accelerator.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            out = tr.training_step(batch)
        tr.window, tr.bad_window = [], False
        tr.lr_scheduler.step()
        self.seen.update(indices)
        return out.loss.item()
