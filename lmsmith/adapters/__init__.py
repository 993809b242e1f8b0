"""Parameter-efficient adapters on a frozen model: LoRA and prompt tuning, in peft's formats.

    from lmsmith.adapters import LoraConfig, apply_lora, save_lora, load_adapter
    params = apply_lora(model, LoraConfig(r=8))          # train(..., trainable_params=params)
    model = load_adapter(model, "adapter/", tokenizer)   # either kind, by adapter_config.json
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LmsmithError
from .lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_lora,
    lora_disabled,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    lora_stats,
    lora_summary,
    merge_lora,
    read_adapter_config,
    save_lora,
)
from .prompt_tuning import (
    PromptTunedModel,
    PromptTuningConfig,
    apply_prompt_tuning,
    load_prompt_tuning,
    save_prompt_tuning,
)

SUPPORTED_TYPES = ("LORA", "PROMPT_TUNING", "PREFIX_TUNING")

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "LoraConfig", "LoraLinear", "PromptTunedModel",
           "PromptTuningConfig", "SUPPORTED_TYPES", "adapter_type", "apply_lora", "apply_prompt_tuning",
           "load_adapter", "load_lora", "load_prompt_tuning", "lora_disabled", "lora_modules", "lora_parameters",
           "lora_state_dict", "lora_stats", "lora_summary", "merge_lora", "save_lora", "save_prompt_tuning",
           "trainable_parameters"]


def adapter_type(path) -> str:
    """"LORA", "PROMPT_TUNING" or "PREFIX_TUNING" from `path`/adapter_config.json; LmsmithError otherwise."""
    cfg = read_adapter_config(path)
    kind = cfg.get("peft_type")
    if kind not in SUPPORTED_TYPES:
        raise LmsmithError(f"{Path(path) / ADAPTER_CONFIG_NAME}: peft_type {kind!r} is not supported; "
                           f"lmsmith loads {', '.join(SUPPORTED_TYPES)} adapters")
    return kind


def load_adapter(model, path, tokenizer=None):
    """Apply the adapter saved at `path` (by lmsmith or peft) to `model`.

    Returns:
        LORA: the same model, with LoRA layers loaded; PROMPT_TUNING or PREFIX_TUNING: a PromptTunedModel
        wrapping it. Use the returned object either way. `tokenizer` is accepted for
        symmetry with `apply_prompt_tuning` (loading never needs it).
    """
    if path is None:
        return model
    if adapter_type(path) == "LORA":
        load_lora(model, path)
        return model
    return load_prompt_tuning(model, path)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """Parameters with requires_grad, each once (tied weights deduplicated), in model order."""
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
