"""LoRA adapters on the U-Net via peft, and their export in the format ``pipeline.load_lora_weights(dir)``
reads.

A LoRA layer computes :math:`W x + \\tfrac{α}{r} B A x` with :math:`A ∈ R^{r×d}`, :math:`B ∈ R^{d'×r}`;
``B = 0`` at init (``init="gaussian"`` draws A, zeros B), so the adapted U-Net equals the base U-Net at step 0
and the Diffusion-DPO loss starts at ln 2. The export writes ``pytorch_lora_weights.safetensors`` with
peft-format keys (``unet.<module>.lora_A/lora_B.weight``, what diffusers' own loader produces) and the peft
config as adapter metadata, so α ≠ r loads with the right scale. The keys are deliberately not passed through
diffusers' ``convert_state_dict_to_diffusers``: it rewrites only attention projections to the legacy
``lora.down/up`` names, and a file that mixes both spellings (any target beyond ``to_q/k/v/out.0``, e.g.
``proj_in`` or ``ff.net.2``) makes ``load_lora_weights`` skip the legacy-named layers with only a warning.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


def add_lora(unet, rank: int = 8, alpha: float | None = None, target_modules=DEFAULT_TARGET_MODULES,
             dropout: float = 0.0, init: str | bool = "gaussian") -> None:
    """Add a trainable adapter named ``default`` and freeze everything else. Trainable params are kept in
    fp32."""
    from peft import LoraConfig

    config = LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=dropout,
        init_lora_weights=init, target_modules=list(target_modules),
    )
    unet.requires_grad_(False)
    unet.add_adapter(config)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """peft-format adapter weights (``...lora_A.weight``), fp32, on CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_lora(unet, output_dir: str | os.PathLike, sdxl: bool = False) -> Path:
    """Write ``output_dir/pytorch_lora_weights.safetensors`` (diffusers keys + adapter metadata)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    layers = lora_state_dict(unet)  # peft keys, one spelling for every layer (see the module docstring)
    metadata = unet.peft_config["default"].to_dict()
    pipeline_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    # Write to a temporary name then rename, so a crash never leaves a half-written adapter under the real
    # name.
    tmp_name = LORA_WEIGHT_NAME + ".partial.safetensors"
    pipeline_cls.save_lora_weights(
        save_directory=str(output_dir), unet_lora_layers=layers, weight_name=tmp_name,
        unet_lora_adapter_metadata=metadata, safe_serialization=True,
    )
    os.replace(output_dir / tmp_name, output_dir / LORA_WEIGHT_NAME)
    return output_dir / LORA_WEIGHT_NAME


def load_lora_into(unet, lora_dir: str | os.PathLike) -> None:
    """Load an exported adapter back into a U-Net (as adapter ``default``), e.g. to continue from it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    state, _ = StableDiffusionPipeline.lora_state_dict(str(lora_dir), weight_name=LORA_WEIGHT_NAME,
                                                       return_lora_metadata=False)
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    unet_state = convert_unet_state_dict_to_peft(unet_state)
    if not getattr(unet, "peft_config", None):
        import json

        from safetensors import safe_open

        with safe_open(str(Path(lora_dir) / LORA_WEIGHT_NAME), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        meta = {k[len("unet."):]: v for k, v in meta.items() if k.startswith("unet.")}
        unet.add_adapter(LoraConfig(**meta))
    result = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    if result.unexpected_keys:
        raise ValueError(f"LoRA file does not match this U-Net: unexpected keys "
                         f"{result.unexpected_keys[:3]} ...")


class LoRAMismatchError(ValueError):
    """A LoRA file whose layers or shapes do not exist in this U-Net (trained for another base model)."""


def check_lora_matches(unet, lora_path: str | os.PathLike) -> None:
    """Raise :class:`LoRAMismatchError` unless every adapted U-Net layer in the file exists in ``unet`` with
    the right shape. (diffusers only warns about unexpected keys and loads the rest, silently half-applying
    it.)"""
    from safetensors import safe_open

    path = Path(lora_path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {str(path)!r}")
    modules = dict(unet.named_modules())
    problems: dict[str, str] = {}  # layer -> first problem
    total = 0
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        for key in keys:
            down = any(s in key for s in (".lora.down.", ".lora_A."))
            if not key.startswith("unet.") or not (down or any(s in key for s in (".lora.up.", ".lora_B."))):
                continue
            total += down
            name = key[len("unet."):].split(".lora")[0]
            shape = f.get_slice(key).get_shape()  # down: (r, in_features); up: (out_features, r)
            module = modules.get(name)
            if module is None:
                problems.setdefault(name, "no such layer")
            elif down and getattr(module, "in_features", shape[-1]) != shape[-1]:
                problems.setdefault(name, f"in_features {module.in_features}, file has {shape[-1]}")
            elif not down and getattr(module, "out_features", shape[0]) != shape[0]:
                problems.setdefault(name, f"out_features {module.out_features}, file has {shape[0]}")
    if not total:
        raise LoRAMismatchError(f"LoRA {str(path)!r} holds no U-Net LoRA layers (keys like "
                                f"'unet.<layer>.lora_A.weight'; it has e.g. {keys[:1]})")
    if problems:
        raise LoRAMismatchError(
            f"LoRA {str(path)!r} does not match this U-Net: "
            f"{len(problems)} of {total} adapted layers differ, "
            "e.g. {} ({}); was it trained for another base model?".format(*next(iter(problems.items())))
        )


def load_lora_into_pipeline(pipe, lora_path: str | os.PathLike) -> None:
    """``pipe.load_lora_weights(lora_path)`` after :func:`check_lora_matches`, without diffusers' "No LoRA
    keys associated to CLIPTextModel" warning (diffalign's adapters hold U-Net layers only, so it is always
    printed)."""
    from diffusers.utils import logging as diffusers_logging

    check_lora_matches(pipe.unet, lora_path)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(str(lora_path))
    finally:
        diffusers_logging.set_verbosity(level)
