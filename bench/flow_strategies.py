"""One optimizer step of each flow-transformer (SD3/SD3.5) preference strategy the bench compares (issue 20).

``flow_grpo``
    yifan123/flow_grpo ``scripts/train_sd3_dpo.py`` @ ac4c86e (Flow-DPO), its training loop body (L880-974)
    fed from an offline preference pair: VAE encode of winner and loser and the three text encoders
    (``compute_text_embeddings``, L124-131, max_sequence_length=128) every step; two LoRA adapters on one
    transformer, ``learner`` (trained) and ``ref`` (frozen), r=32, α=64 on ``attn.to_q/k/v/out.0,
    attn.add_q/k/v_proj, attn.to_add_out`` (L387-411); the policy pass after ``set_adapter("learner")``, the
    reference pass after ``set_adapter("ref")`` under no_grad (L904-923); shared ε and logit-normal σ per pair
    (L884-903); ``-logsigmoid(-0.5 β Δ)``, β=100 (L924-939); ten logged means per step (L940-950,
    ``wandb.log`` at L966-970); clip, AdamW, EMA of the learner every 8 steps (L952-974).
``flow_grpo_body``
    the same loop body on latents and text embeddings computed once per batch: what the online script trains
    on (its sampler hands it latents and embeddings, L598-655), and the analogue of our cached step.
    Interleaved timing only (its memory is ``flow_grpo``'s).
``ours``
    ``diffalign.training.PreferenceTrainer.training_step`` on the same components: LoRA r=32, α=64 on the same
    targets (diffalign's sd3 default), reference = adapters disabled, winner + loser in one 2B call, same β,
    logit-normal σ, shared ε. ``ours_first_epoch``: a batch never seen (cache miss: VAE + text encoders run,
    the latent/text cache fills); ``ours_cached``: a batch seen before (cache hit, the steady state from
    epoch 2).

The online script's latents come from its own sampler and its embeddings from the sampling phase; a preference
dataset of image pairs (what diffalign trains on, and what the issue asks to compare on) needs the VAE encode
and the text encoders inside the step: the re-implementation does them there, with the script's own calls (the
SD3 DreamBooth-LoRA latents ``(z - shift) · scale``, flow_grpo's ``encode_prompt``). All strategies read
pixels through ``diffalign.data.PreferencePairs`` (same decode and crop), in fp32.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from diffalign.data import collate_pairs

BETA = 100.0  # config/dpo.py: config.train.beta = 100
LORA_RANK, LORA_ALPHA = 32, 64  # train_sd3_dpo.py L399-404
LORA_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]  # L389-398
T5_MAX_LENGTH = 128  # compute_text_embeddings(..., max_sequence_length=128), L598-604
FLOW_STRATEGIES = ("flow_grpo", "flow_grpo_body", "ours_first_epoch", "ours_cached")


# ------------------------------------------------------------------ flow_grpo's prompt encoding
def _encode_prompt_with_clip(text_encoder, tokenizer, prompt, device):
    """flow_grpo/diffusers_patch/train_dreambooth_lora_sd3.py L59-95 (num_images_per_prompt=1). The script's
    ``max_length=77``, capped at the tokenizer's length for the tiny test world (16 positions)."""
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=min(77, tokenizer.model_max_length),
        truncation=True,
        return_tensors="pt",
    ).input_ids
    out = text_encoder(ids.to(device), output_hidden_states=True)
    pooled = out[0]
    embeds = out.hidden_states[-2].to(dtype=text_encoder.dtype, device=device)
    return embeds, pooled


def _encode_prompt_with_t5(text_encoder, tokenizer, max_sequence_length, prompt, device):
    """Same file, L19-56."""
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(device))[0].to(dtype=text_encoder.dtype, device=device)


def encode_prompt(text_encoders, tokenizers, prompt, max_sequence_length, device):
    """Same file, L98-144: CLIP-L ‖ CLIP-G penultimate states padded to the T5 width, then T5; pooled
    CLIP-L ‖ G."""
    clip, pooled = [], []
    for tokenizer, text_encoder in zip(tokenizers[:2], text_encoders[:2]):
        e, p = _encode_prompt_with_clip(text_encoder, tokenizer, prompt, device)
        clip.append(e)
        pooled.append(p)
    clip_embeds, pooled_embeds = torch.cat(clip, dim=-1), torch.cat(pooled, dim=-1)
    t5 = _encode_prompt_with_t5(text_encoders[-1], tokenizers[-1], max_sequence_length, prompt, device)
    clip_embeds = F.pad(clip_embeds, (0, t5.shape[-1] - clip_embeds.shape[-1]))
    return torch.cat([clip_embeds, t5], dim=-2), pooled_embeds


def compute_text_embeddings(prompt, text_encoders, tokenizers, max_sequence_length, device):
    """train_sd3_dpo.py L124-131."""
    with torch.no_grad():
        prompt_embeds, pooled_prompt_embeds = encode_prompt(
            text_encoders, tokenizers, prompt, max_sequence_length, device
        )
    return prompt_embeds.to(device), pooled_prompt_embeds.to(device)


def get_sigmas(noise_scheduler, timesteps, device, n_dim=4, dtype=torch.float32):
    """train_sd3_dpo.py L179-188."""
    sigmas = noise_scheduler.sigmas.to(device=device, dtype=dtype)
    schedule_timesteps = noise_scheduler.timesteps.to(device)
    timesteps = timesteps.to(device)
    step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    sigma = sigmas[step_indices].flatten()
    while len(sigma.shape) < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma


class _EMA:
    """flow_grpo/ema.py ``EMAModuleWrapper`` (decay 0.9, update_step_interval 8: train_sd3_dpo.py L422), the
    parts the training loop calls."""

    def __init__(self, parameters, decay=0.9, update_step_interval=8, device=None):
        self.ema_parameters = [p.clone().detach().to(device) for p in parameters]
        self.decay, self.update_step_interval = decay, update_step_interval

    @torch.no_grad()
    def step(self, parameters, optimization_step):
        one_minus_decay = 1 - min((1 + optimization_step) / (10 + optimization_step), self.decay)
        if (optimization_step + 1) % self.update_step_interval == 0:
            for ema_parameter, parameter in zip(self.ema_parameters, list(parameters), strict=True):
                if parameter.requires_grad:
                    ema_parameter.add_(one_minus_decay * (parameter - ema_parameter))


def _pairs(world):
    from diffalign.data import PairTransform, PreferencePairs

    transform = PairTransform(world.resolution, center_crop=True, random_flip=False)
    return PreferencePairs(str(world.data_dir), transform=transform, max_samples=world.num_pairs, seed=0)


class FlowGrpoStep:
    """flow_grpo's Flow-DPO step. ``transformer``: the (LoRA-free) transformer to put the two adapters on
    (default: the components'); the VAE and text encoders are the components', frozen."""

    name = "flow_grpo"

    def __init__(self, world, components, device="cpu", transformer=None):
        from accelerate import Accelerator
        from peft import LoraConfig, get_peft_model

        self.world, self.c, self.device = world, components, torch.device(device)
        self.pairs = _pairs(world)
        c = self.c
        self.acc = Accelerator(mixed_precision="no")  # the bench runs every strategy fp32 (script: fp16)
        # L351-354, L380-385: frozen VAE (fp32) and text encoders, transformer on the device
        self.text_encoders = [c.text_encoder, c.text_encoder_2, c.text_encoder_3]
        self.tokenizers = [c.tokenizer, c.tokenizer_2, c.tokenizer_3]
        for m in (c.vae, *self.text_encoders):
            m.requires_grad_(False).to(self.device)
        transformer = (transformer if transformer is not None else c.transformer).to(self.device)
        transformer.requires_grad_(False)  # L355: requires_grad_(not use_lora)
        lora = LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=LORA_TARGETS
        )  # L399-404
        transformer = get_peft_model(transformer, lora, adapter_name="learner")  # L410
        transformer = get_peft_model(transformer, lora, adapter_name="ref")  # L411
        self.peft_transformer = transformer  # ``pipeline.transformer``
        self.params = [p for n, p in transformer.named_parameters() if "learner" in n]  # L415-419
        assert all(p.requires_grad for p in self.params)
        self.ema = _EMA(self.params, decay=0.9, update_step_interval=8, device=self.device)  # L422
        optimizer = torch.optim.AdamW(
            self.params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8
        )  # L442-448 with config/base.py's values
        self.transformer, self.optimizer = self.acc.prepare(transformer, optimizer)  # L534
        # L535: FlowMatchEulerDiscreteScheduler.from_pretrained(subfolder="scheduler")
        self.noise_scheduler = copy.deepcopy(c.noise_scheduler)
        self.peft_transformer.set_adapter("learner")  # L846
        self.transformer.train()  # L860
        self.global_step = 0
        self.max_grad_norm = 1.0  # config/base.py
        self.precomputed: dict[tuple, tuple] = {}
        # 128 (the script's); the tiny test world's T5 has 16 positions: the components' length there
        self.t5_length = min(T5_MAX_LENGTH, c.t5_max_length)

    def inputs(self, indices):
        """Latents ``[winners; losers]`` (2B, 16, h, w) and per-image prompt embeddings, as the script's
        ``samples`` hold them: one embedding per image, winner and loser sharing their prompt."""
        c = self.c
        items = [self.pairs[i] for i in indices]
        pixels = torch.cat(
            [torch.stack([x["pixels_w"] for x in items]), torch.stack([x["pixels_l"] for x in items])]
        ).to(self.device)
        prompts = [x["caption"] for x in items]
        with torch.no_grad():  # the SD3 LoRA scripts' latents: (z - shift_factor) * scaling_factor
            latents = c.vae.encode(pixels).latent_dist.sample()
            latents = (latents - c.vae.config.shift_factor) * c.vae.config.scaling_factor
        prompt_embeds, pooled_prompt_embeds = compute_text_embeddings(
            prompts,
            self.text_encoders,
            self.tokenizers,
            max_sequence_length=self.t5_length,
            device=self.device,
        )
        return latents, prompt_embeds.repeat(2, 1, 1), pooled_prompt_embeds.repeat(2, 1)

    def step(self, indices, precomputed: bool = False) -> float:
        """One step. ``precomputed``: latents and embeddings computed once per batch (``flow_grpo_body``)."""
        acc, transformer, noise_scheduler = self.acc, self.transformer, self.noise_scheduler
        key = tuple(indices)
        if precomputed:
            if key not in self.precomputed:
                self.precomputed[key] = self.inputs(indices)
            latents, embeds, pooled_embeds = self.precomputed[key]
        else:
            latents, embeds, pooled_embeds = self.inputs(indices)
        info = {}
        with acc.accumulate(transformer):  # L880-958
            model_input = latents
            bsz = model_input.shape[0] // 2
            noise = torch.randn_like(model_input)
            noise = torch.cat([noise[:bsz], noise[:bsz]], dim=0)  # chosen and rejected share the noise
            from diffusers.training_utils import compute_density_for_timestep_sampling

            u = compute_density_for_timestep_sampling(
                weighting_scheme="logit_normal", batch_size=bsz, logit_mean=0, logit_std=1, mode_scale=1.29
            )
            indices_t = (u * noise_scheduler.config.num_train_timesteps).long()
            timesteps = noise_scheduler.timesteps[indices_t].to(device=model_input.device)
            timesteps = torch.cat([timesteps, timesteps], dim=0)
            sigmas = get_sigmas(
                noise_scheduler, timesteps, self.device, n_dim=model_input.ndim, dtype=model_input.dtype
            )
            noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
            self.peft_transformer.set_adapter("learner")
            model_pred = transformer(
                hidden_states=noisy_model_input,
                timestep=timesteps,
                encoder_hidden_states=embeds,
                pooled_projections=pooled_embeds,
                return_dict=False,
            )[0]
            with torch.no_grad():
                self.peft_transformer.set_adapter("ref")
                model_pred_ref = transformer(
                    hidden_states=noisy_model_input,
                    timestep=timesteps,
                    encoder_hidden_states=embeds,
                    pooled_projections=pooled_embeds,
                    return_dict=False,
                )[0]
                model_pred_ref = model_pred_ref.detach()
                self.peft_transformer.set_adapter("learner")
            target = noise - model_input
            theta_mse = ((model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
            ref_mse = (
                ((model_pred_ref.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)
            )
            model_w_err, model_l_err = theta_mse[:bsz], theta_mse[bsz:]
            ref_w_err, ref_l_err = ref_mse[:bsz], ref_mse[bsz:]
            w_diff = model_w_err - ref_w_err
            l_diff = model_l_err - ref_l_err
            w_l_diff = w_diff - l_diff
            inside_term = -0.5 * BETA * w_l_diff
            loss = torch.mean(-F.logsigmoid(inside_term))
            for k, v in (
                ("loss", loss),
                ("model_w_err", model_w_err),
                ("model_l_err", model_l_err),
                ("ref_w_err", ref_w_err),
                ("ref_l_err", ref_l_err),
                ("w_diff", w_diff),
                ("l_diff", l_diff),
                ("w_l_diff", w_l_diff),
                ("inside_term", inside_term),
            ):
                info[k] = [torch.mean(v)]
            implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
            info["implicit_acc"] = [torch.mean(implicit_acc)]
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(transformer.parameters(), self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad()
        if acc.sync_gradients:  # L961-974: the means, reduced, go to wandb.log (a host sync per value)
            info = {k: torch.mean(torch.stack(v)) for k, v in info.items()}
            info = acc.reduce(info, reduction="mean")
            _ = {k: v.item() for k, v in info.items()}
            self.global_step += 1
            self.ema.step(self.params, self.global_step)
        return loss.item()

    def learner_state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]


def ours_flow_config(world, output_dir: Path, cache_dir: Path | None) -> dict:
    """The ``diffalign train`` config of the ours strategy on the flow world (a user's YAML)."""
    return {
        "model": {"family": "sd3", "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA}},
        "dataset": {
            "source": str(world.data_dir),
            "resolution": world.resolution,
            "center_crop": True,
            "random_flip": False,
            "max_samples": world.num_pairs,
            "cache_dir": None if cache_dir is None else str(cache_dir),
        },
        "objective": {"name": "dpo", "beta": BETA},
        "flow": {"timestep_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0},
        "output_dir": str(output_dir),
        "max_steps": 10_000,
        "batch_size": world.batch_pairs,
        "mixed_precision": "no",
        "report_to": None,
        "checkpoint_every": None,
        "optimizer": {"learning_rate": 3e-4, "weight_decay": 1e-4, "warmup_steps": 0, "max_grad_norm": 1.0},
    }


class OursFlowStep:
    """diffalign's step on the flow world: :class:`~diffalign.training.PreferenceTrainer` on the components
    (as ``bench.strategies.OursStep``, with the sd3 config)."""

    name = "ours"

    def __init__(self, world, components, output_dir: Path, cache_dir: Path | None, device="cpu"):
        from diffalign.training.config import parse_config
        from diffalign.training.trainer import PreferenceTrainer

        if torch.device(device).type != "cpu":
            components.transformer.to(device)
        cfg = parse_config(ours_flow_config(world, output_dir, cache_dir))
        self.trainer = PreferenceTrainer(cfg, components).setup(overwrite=True)
        self.seen: set[int] = set()

    @property
    def unet(self):
        return self.trainer.unet

    def step(self, indices) -> float:
        """:meth:`PreferenceTrainer.training_step` on one batch, then the learning-rate step."""
        tr = self.trainer
        batch = collate_pairs([tr.dataset[i] for i in indices])
        out = tr.training_step(batch)
        tr.window, tr.bad_window = [], False
        tr.lr_scheduler.step()
        self.seen.update(indices)
        return out.loss.item()

    def lora_state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.trainer.trainable_parameters()]


def copy_transformer(transformer):
    """A deep copy of a (LoRA-free) SD3 transformer sharing the frozen positional-embedding buffer (0.9 GiB
    at SD3.5-M's pos_embed_max_size 384, never written): the interleaved job holds two transformers."""
    pos = getattr(getattr(transformer, "pos_embed", None), "pos_embed", None)
    return copy.deepcopy(transformer, memo={} if pos is None else {id(pos): pos})
