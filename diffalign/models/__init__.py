"""Models: loading SD-family components, text conditioning, denoiser wrappers, references, LoRA."""

from .denoiser import (
    AdapterDisabledReference,
    FrozenCopyReference,
    UNetCondition,
    UNetDenoiser,
    adapters_disabled,
)
from .loading import DEFAULT_IDS, Components, ModelNotFoundError, load_components, set_attention_backend
from .lora import (
    LORA_WEIGHT_NAME,
    LoRAMismatchError,
    add_lora,
    check_lora_matches,
    load_lora_into,
    load_lora_into_pipeline,
    save_lora,
)

__all__ = [
    "DEFAULT_IDS",
    "LORA_WEIGHT_NAME",
    "AdapterDisabledReference",
    "Components",
    "FrozenCopyReference",
    "LoRAMismatchError",
    "ModelNotFoundError",
    "UNetCondition",
    "UNetDenoiser",
    "adapters_disabled",
    "add_lora",
    "check_lora_matches",
    "load_components",
    "load_lora_into",
    "load_lora_into_pipeline",
    "save_lora",
    "set_attention_backend",
]
