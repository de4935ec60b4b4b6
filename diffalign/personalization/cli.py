"""Generation with users: ``diffalign generate`` for PPD models (few-shot users, interpolation between users).

    diffalign personalize --model BASE --lora RUN_DIR --user-examples me.jsonl --prompt "..." --out DIR
    diffalign personalize --model BASE --lora RUN_DIR --user-mix big:0.3,small:0.7 --prompt "..." --out DIR
    diffalign personalize --model BASE --lora RUN_DIR --user-mix a.jsonl:0.5,b.jsonl:0.5 --mix-space prediction ...

``RUN_DIR`` is a PPD run's ``output_dir``: ``user_branch.safetensors`` (+ ``pytorch_lora_weights.safetensors`` when
the run trained a LoRA, + ``user_embeddings.safetensors``). A user is named by an examples file (``.json``/``.jsonl``
of ``{"prompt", "chosen", "rejected"}`` image paths; encoded by the run's user encoder: an unseen user served from a
few examples) or by a training user's id (its cached features).

Mixing users ``{(a_i, u_i)}``:

* ``embedding`` (default): one U-Net call with ``u = Σ_i a_i u_i`` on the user tokens.
* ``prediction``: ``ε = Σ_i a_i ε_θ(x_t, c, u_i)``, one U-Net call per user per step.

The user tokens go to both halves of the classifier-free-guidance batch by default (the personalised model is the
model for both terms, as a DPO model is); ``--user-cond-only`` puts them on the conditional half only, which scales
the user's effect by the guidance scale. Without any user the output is the base model's (+ LoRA's) exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from ..generation_cli import MIX_SPACES, add_generation_args, add_user_args, read_prompts, write_images
from ..inference import load_pipeline
from .io import USER_EMBEDDINGS_NAME, load_user_branch, load_user_embeddings, user_tokens
from .user_encoder import build_user_encoder, load_examples


# ---------------------------------------------------------------- users -> tokens
def parse_mix(spec: str) -> list[tuple[str, float]]:
    """``"a:0.3,b:0.7"`` -> ``[("a", 0.3), ("b", 0.7)]``; a name without weight gets 1. The last ``:`` splits, so
    names may hold colons (paths)."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, weight = part.rpartition(":")
        if not sep:
            name, weight = part, "1"
        try:
            out.append((name, float(weight)))
        except ValueError:
            raise ValueError(f"--user-mix: bad weight {weight!r} in {part!r} (expected NAME:WEIGHT)") from None
    if not out:
        raise ValueError(f"--user-mix: no users in {spec!r}")
    return out


class UserResolver:
    """Names -> user tokens (1, N_u, D_u): an examples file is encoded with the run's encoder (loaded on first
    use), a training user id is looked up in ``user_embeddings.safetensors`` (features averaged over its K sets)."""

    def __init__(self, unet, spec, run_dir, device=None):
        self.unet, self.spec, self.run_dir, self.device = unet, spec, Path(run_dir), device
        self._encoder = None
        self._table = None

    def features_from_examples(self, path) -> torch.Tensor:
        if self._encoder is None:
            self._encoder = build_user_encoder(self.spec.encoder, device=self.device)
        return self._encoder.encode(load_examples(path))  # (N_f, D_f)

    def known_users(self) -> dict[str, torch.Tensor]:
        if self._table is None:
            path = self.run_dir / USER_EMBEDDINGS_NAME
            self._table = load_user_embeddings(path)[0] if path.exists() else {}
        return self._table

    def tokens(self, name: str) -> torch.Tensor:
        if Path(name).suffix in (".json", ".jsonl") and Path(name).is_file():
            return user_tokens(self.unet, self.features_from_examples(name))  # (1, N_u, D_u)
        table = self.known_users()
        if name not in table:
            known = ", ".join(sorted(table)[:10])
            raise ValueError(f"user {name!r} is neither an examples file (.json/.jsonl) nor a training user of "
                             f"{self.run_dir} (known: {known}{', ...' if len(table) > 10 else ''})")
        # mean of the K few-shot sets' features, then project: the projection scales the result to unit norm, so the
        # tokens keep the scale of a single set's (averaging tokens instead would shrink them where sets disagree)
        return user_tokens(self.unet, table[name].mean(0))  # (K, N_f, D_f) -> (1, N_u, D_u)


def mix_tokens(mixture: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """Embedding-space interpolation ``Σ_i a_i u_i`` of (1, N_u, D_u) tokens."""
    return sum(a * u for a, u in mixture)


# ---------------------------------------------------------------- sampling with users
def _cfg_tokens(tokens: torch.Tensor | None, cond_only: bool, guided: bool, batch: int):
    """Tokens for a pipeline batch of ``batch`` prompts: broadcast (1, ...) to both CFG halves, or zeros on the
    unconditional half (zero tokens = branch off) for ``cond_only``."""
    if tokens is None or not (cond_only and guided):
        return tokens
    u = tokens.expand(batch, -1, -1)
    return torch.cat([torch.zeros_like(u), u])  # pipelines stack [uncond; cond]


@contextmanager
def prediction_mixture(unet, mixture: list[tuple[float, torch.Tensor | None]]):
    """Inside the block, ``unet(...)`` returns ``Σ_i a_i unet(..., user_tokens=u_i)`` (``u_i = None``: no user).

    Works with any diffusers pipeline (it only swaps ``unet.forward``). One U-Net call per user per step.
    """
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    had_own = "forward" in unet.__dict__
    original = unet.forward

    def forward(sample, timestep, encoder_hidden_states=None, *args, cross_attention_kwargs=None, return_dict=True,
                **kwargs):
        total = None
        for a, tokens in mixture:
            cak = {k: v for k, v in (cross_attention_kwargs or {}).items() if k != "user_tokens"}
            if tokens is not None:
                cak["user_tokens"] = tokens
            eps = original(sample, timestep, encoder_hidden_states, *args, cross_attention_kwargs=cak or None,
                           return_dict=False, **kwargs)[0]
            total = a * eps if total is None else total + a * eps
        return UNet2DConditionOutput(sample=total) if return_dict else (total,)

    unet.forward = forward
    try:
        yield unet
    finally:
        if had_own:
            unet.forward = original
        else:
            del unet.forward


def serve_users(pipe, mixture: list[tuple[float, torch.Tensor]] | None, *, space: str = "embedding",
                cond_only: bool = False, user_scale: float | None = None):
    """The :func:`diffalign.inference.generate` hook that serves the users ``mixture`` (``[(a_i, tokens_i (1, N_u,
    D_u))]``; None: no user, the base model's (+ LoRA's) images) mixed in ``space`` (``embedding`` or ``prediction``,
    module doc). Images keep inference's seed rule: image i from its own ``torch.Generator("cpu").manual_seed(seed_i)``.
    """
    if space not in MIX_SPACES:
        raise ValueError(f"space must be one of {MIX_SPACES}, got {space!r}")
    extra = {} if user_scale is None else {"user_scale": user_scale}

    @contextmanager
    def hook(call):
        n, guided = len(call["prompt"]), call.get("guidance_scale", 7.5) > 1.0
        if mixture is None:
            yield {}
        elif space == "embedding":
            yield {"cross_attention_kwargs": {"user_tokens": _cfg_tokens(mix_tokens(mixture), cond_only, guided, n),
                                              **extra}}
        else:
            with prediction_mixture(pipe.unet, [(a, _cfg_tokens(u, cond_only, guided, n)) for a, u in mixture]):
                yield {"cross_attention_kwargs": extra or None}

    return hook


def load_personalized_pipeline(model: str, run_dir: str, *, branch_dir: str | None = None, device=None,
                               dtype: str = "float32"):
    """The base pipeline + the run's LoRA (when it has one) + its user branch
    (:func:`diffalign.inference.load_pipeline`). Returns ``(pipe, spec)``."""
    from ..models.lora import LORA_WEIGHT_NAME

    lora = run_dir if run_dir and (Path(run_dir) / LORA_WEIGHT_NAME).is_file() else None
    pipe = load_pipeline(model, lora, device, dtype)
    spec = load_user_branch(pipe.unet, branch_dir or run_dir)
    return pipe, spec


# ---------------------------------------------------------------- command line
EPILOG = """examples:
  diffalign personalize --model stable-diffusion-v1-5/stable-diffusion-v1-5 --lora runs/sd15-ppd \\
      --user-examples me.jsonl --prompt "a cat in a garden" --out out/me
  diffalign personalize --model assets/toy-sd-ppd --lora runs/ppd-toy/run --user-mix big:0.3,small:0.7 \\
      --prompt "a red circle on a blue background" --out out/mix --guidance 5 --steps 20
"""


def main(argv: list[str]) -> int:
    from ..models.loading import ModelNotFoundError

    p = argparse.ArgumentParser(prog="diffalign personalize", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model: hub id or local diffusers folder")
    p.add_argument("--lora", required=True, help="the PPD run's output_dir (user branch, LoRA if trained)")
    add_user_args(p)
    add_generation_args(p)
    args = p.parse_args(argv)
    prompts = read_prompts(args)
    if not prompts:
        return 2
    try:
        pipe, spec = load_personalized_pipeline(args.model, args.lora, branch_dir=args.branch, device=args.device,
                                                dtype=args.dtype)
        resolver = UserResolver(pipe.unet, spec, args.branch or args.lora, device=pipe.device)
        if args.user_mix:
            names = parse_mix(args.user_mix)
        elif args.user_examples or args.user:
            names = [(args.user_examples or args.user, 1.0)]
        else:
            names = []
        mixture = [(a, resolver.tokens(name)) for name, a in names] or None
    except (ModelNotFoundError, OSError, ValueError) as err:
        print(f"diffalign: error: {err}", file=sys.stderr)
        return 2
    write_images(args, prompts, pipe, serve_users(pipe, mixture, space=args.mix_space, cond_only=args.user_cond_only,
                                                  user_scale=args.user_scale))
    out = Path(args.out)
    (out / "users.json").write_text(json.dumps({"users": [{"name": n, "weight": a} for n, a in names],
                                                "mix_space": args.mix_space, "cond_only": args.user_cond_only,
                                                "user_scale": args.user_scale}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
