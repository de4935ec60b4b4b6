"""LoRA adapters on the U-Net (or the SD3/FLUX transformer) via peft, and their export in the format
``pipeline.load_lora_weights(dir)`` reads.

A LoRA layer computes :math:`W x + \\tfrac{α}{r} B A x` with :math:`A ∈ R^{r×d}`, :math:`B ∈ R^{d'×r}`;
``B = 0`` at init (``init="gaussian"`` draws A, zeros B), so the adapted U-Net equals the base U-Net at step 0
and the Diffusion-DPO loss starts at ln 2. The export writes ``pytorch_lora_weights.safetensors`` with
peft-format keys (``unet.<module>.lora_A/lora_B.weight``, what diffusers' own loader produces) and the peft
config as adapter metadata, so α ≠ r loads with the right scale. The keys are deliberately not passed through
diffusers' ``convert_state_dict_to_diffusers``: it rewrites only attention projections to the legacy
``lora.down/up`` names, and a file that mixes both spellings (any target beyond ``to_q/k/v/out.0``, e.g.
``proj_in`` or ``ff.net.2``) makes ``load_lora_weights`` skip the legacy-named layers with only a warning.

SD3/FLUX: the adapter sits on the transformer's joint attention, image stream and context (text) stream
(:data:`FLOW_TARGET_MODULES`, the diffusers SD3/FLUX LoRA scripts' list), and the file holds
``transformer.<module>.lora_A/lora_B.weight`` written by ``StableDiffusion3Pipeline``/``FluxPipeline
.save_lora_weights``, as those scripts write it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
# train_dreambooth_lora_sd3.py / _flux.py defaults (FLUX's also adds ff.net.0.proj, ff.net.2, ff_context.*):
# image stream q/k/v/out and context stream q/k/v/out of every joint block's ``attn`` (FLUX single blocks:
# q/k/v; SD3.5-Medium's ``attn2`` is left alone, as there).
FLOW_TARGET_MODULES = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                       "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out")
FLOW_TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def default_target_modules(family: str) -> tuple[str, ...]:
    """LoRA targets: :data:`FLOW_TARGET_MODULES` for sd3/flux, else :data:`DEFAULT_TARGET_MODULES`."""
    return FLOW_TARGET_MODULES if family in ("sd3", "flux") else DEFAULT_TARGET_MODULES


def flow_family(module) -> str | None:
    """``sd3`` / ``flux`` when ``module`` (maybe DDP/compile-wrapped) is an SD3/FLUX transformer, else
    None."""
    while hasattr(module, "module") or hasattr(module, "_orig_mod"):
        module = getattr(module, "module", None) or module._orig_mod
    return FLOW_TRANSFORMERS.get(type(module).__name__)


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
    """Write ``output_dir/pytorch_lora_weights.safetensors`` (diffusers keys + adapter metadata). ``unet`` may
    be an SD3/FLUX transformer: then the file is the ``StableDiffusion3Pipeline``/``FluxPipeline`` one."""
    from diffusers import (
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    layers = lora_state_dict(unet)  # peft keys, one spelling for every layer (see the module docstring)
    metadata = unet.peft_config["default"].to_dict()
    # Write to a temporary name then rename, so a crash never leaves a half-written adapter under the real
    # name.
    tmp_name = LORA_WEIGHT_NAME + ".partial.safetensors"
    family = flow_family(unet)
    if family is not None:
        (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline).save_lora_weights(
            save_directory=str(output_dir), transformer_lora_layers=layers, weight_name=tmp_name,
            transformer_lora_adapter_metadata=metadata, safe_serialization=True,
        )
        os.replace(output_dir / tmp_name, output_dir / LORA_WEIGHT_NAME)
        return output_dir / LORA_WEIGHT_NAME
    pipeline_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipeline_cls.save_lora_weights(
        save_directory=str(output_dir), unet_lora_layers=layers, weight_name=tmp_name,
        unet_lora_adapter_metadata=metadata, safe_serialization=True,
    )
    os.replace(output_dir / tmp_name, output_dir / LORA_WEIGHT_NAME)
    return output_dir / LORA_WEIGHT_NAME


def load_lora_into(unet, lora_dir: str | os.PathLike) -> None:
    """Load an exported adapter back into a U-Net or SD3/FLUX transformer (as adapter ``default``), e.g. to
    continue from it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    prefix = "unet." if flow_family(unet) is None else "transformer."
    if prefix == "unet.":
        state, _ = StableDiffusionPipeline.lora_state_dict(str(lora_dir), weight_name=LORA_WEIGHT_NAME,
                                                           return_lora_metadata=False)
    else:  # the file holds peft keys already (``transformer.<module>.lora_A.weight``)
        from safetensors.torch import load_file

        state = load_file(str(Path(lora_dir) / LORA_WEIGHT_NAME))
    unet_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    unet_state = convert_unet_state_dict_to_peft(unet_state)
    if not getattr(unet, "peft_config", None):
        import json

        from safetensors import safe_open

        with safe_open(str(Path(lora_dir) / LORA_WEIGHT_NAME), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        meta = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
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
    it.) ``unet`` may be an SD3/FLUX transformer (``transformer.``-prefixed keys)."""
    from safetensors import safe_open

    prefix, what = ("unet", "U-Net") if flow_family(unet) is None else ("transformer", "transformer")
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
            up = any(s in key for s in (".lora.up.", ".lora_B."))
            if not key.startswith(f"{prefix}.") or not (down or up):
                continue
            total += down
            name = key[len(prefix) + 1:].split(".lora")[0]
            shape = f.get_slice(key).get_shape()  # down: (r, in_features); up: (out_features, r)
            module = modules.get(name)
            if module is None:
                problems.setdefault(name, "no such layer")
            elif down and getattr(module, "in_features", shape[-1]) != shape[-1]:
                problems.setdefault(name, f"in_features {module.in_features}, file has {shape[-1]}")
            elif not down and getattr(module, "out_features", shape[0]) != shape[0]:
                problems.setdefault(name, f"out_features {module.out_features}, file has {shape[0]}")
    if not total:
        raise LoRAMismatchError(f"LoRA {str(path)!r} holds no {what} LoRA layers (keys like "
                                f"'{prefix}.<layer>.lora_A.weight'; it has e.g. {keys[:1]})")
    if problems:
        raise LoRAMismatchError(
            f"LoRA {str(path)!r} does not match this {what}: "
            f"{len(problems)} of {total} adapted layers differ, "
            "e.g. {} ({}); was it trained for another base model?".format(*next(iter(problems.items())))
        )


def load_lora_into_pipeline(pipe, lora_path: str | os.PathLike) -> None:
    """``pipe.load_lora_weights(lora_path)`` after :func:`check_lora_matches`, without diffusers' "No LoRA
    keys associated to CLIPTextModel" warning (diffalign's adapters hold U-Net layers only, so it is always
    printed). SD3/FLUX pipelines: the file is checked against ``pipe.transformer`` and only that notice (one
    per text encoder, printed for every transformer-only LoRA) is dropped; any other warning still shows."""
    from diffusers.utils import logging as diffusers_logging

    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        check_lora_matches(pipe.transformer, lora_path)
        with _text_encoder_notice_dropped():
            pipe.load_lora_weights(str(lora_path))
        return
    check_lora_matches(pipe.unet, lora_path)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(str(lora_path))
    finally:
        diffusers_logging.set_verbosity(level)


@contextmanager
def _text_encoder_notice_dropped():
    """Drop diffusers' "No LoRA keys associated to <text encoder> found with the prefix='text_encoder...'"
    warning: SD3/FLUX ``load_lora_weights`` loads into every text encoder unconditionally and prints it for
    each one when the file (as every transformer-only LoRA) holds none of its keys."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("No LoRA keys associated to") and "prefix='text_encoder" in msg)

    logger = logging.getLogger("diffusers.loaders.lora_base")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
