"""Parameter and memory arithmetic (pure functions of a `ModelConfig`).

Used by `lmsmith info` and by recipes that refuse jobs that cannot fit. Sizes
are in bytes; `human_bytes` prints decimal units (1 GB = 10^9 bytes), the
convention of model file sizes on Hugging Face and llama.cpp.
"""

from __future__ import annotations

import os
from typing import Any

from .config import ModelConfig

# Bits per weight of each storage format, scales included.
WEIGHT_FORMATS: dict[str, float] = {
    "fp32": 32.0,
    "bf16": 16.0,
    "int8": 8.5,  # GGUF Q8_0: blocks of 32 int8 weights + one fp16 scale = 34 bytes / 32
    "4-bit": 4.5,  # GGUF Q4_K: blocks of 256 = 144 bytes (4-bit weights + 6-bit scales/mins + fp16 d/dmin)
}
WEIGHT_FORMAT_NOTES = {
    "int8": "Q8_0, 8.5 bits/weight incl. fp16 scale per 32 weights",
    "4-bit": "Q4_K, 4.5 bits/weight incl. scales; Q4_K_M files run ~5-10% larger (some tensors in Q6_K)",
}

# Full training with AdamW under mixed precision, per parameter:
# fp32 master weights 4 + fp32 grads 4 + Adam first and second moments 4 + 4.
TRAIN_BYTES_PER_PARAM = {"weights (fp32 master)": 4, "gradients (fp32)": 4, "AdamW m + v (fp32)": 8}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts: total, embedding (input table + untied LM head), non-embedding."""
    total = cfg.num_params(embedding=True)
    non_embedding = cfg.num_params(embedding=False)
    return {"total": total, "embedding": total - non_embedding, "non_embedding": non_embedding}


def weight_bytes(n_params: int, bits_per_weight: float) -> int:
    """Bytes to store n_params weights at bits_per_weight."""
    return int(round(n_params * bits_per_weight / 8))


def weight_memory(cfg: ModelConfig) -> dict[str, int]:
    """Bytes of the weights in each of `WEIGHT_FORMATS`."""
    n = cfg.num_params()
    return {name: weight_bytes(n, bits) for name, bits in WEIGHT_FORMATS.items()}


def training_bytes(cfg: ModelConfig) -> int:
    """Bytes of weights + grads + AdamW state for full mixed-precision training (activations extra)."""
    return cfg.num_params() * sum(TRAIN_BYTES_PER_PARAM.values())


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """K and V for every layer for one token: 2 * layers * kv_heads * head_dim * bytes (bf16 = 2)."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * bytes_per_element


def available_memory_bytes() -> int | None:
    """Memory a new allocation can use now (Linux MemAvailable), else physical RAM, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def human_count(n: float) -> str:
    """134515008 -> '134.5M', 8030261248 -> '8.03B'."""
    if abs(n) >= 1e12:
        return f"{n / 1e12:.2f}T"
    if abs(n) >= 1e9:
        return f"{n / 1e9:.2f}B"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f}M"
    if abs(n) >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(int(n))


def model_report(cfg: ModelConfig) -> dict[str, Any]:
    """Everything `lmsmith info` prints, as plain JSON-able numbers."""
    arch_names = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
    return {
        "architecture": arch_names.get(cfg.arch, cfg.arch),
        "shape": {
            "layers": cfg.n_layers, "dim": cfg.dim, "heads": cfg.n_heads, "kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "hidden_dim": cfg.hidden_dim, "vocab_size": cfg.vocab_size,
            "context": cfg.max_seq_len, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
            "tied_embeddings": cfg.tie_embeddings, "qkv_bias": cfg.qkv_bias,
        },
        "params": param_counts(cfg),
        "weights_bytes": weight_memory(cfg),
        "weights_bits_per_weight": dict(WEIGHT_FORMATS),
        "training_bytes": training_bytes(cfg),
        "training_bytes_per_param": sum(TRAIN_BYTES_PER_PARAM.values()),
        "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(cfg, 2),
        "kv_cache_bytes_full_context_bf16": kv_cache_bytes_per_token(cfg, 2) * cfg.max_seq_len,
    }
