"""The one dtype/device policy.

`auto` means bf16 autocast where the hardware runs bf16 matmuls fast (CUDA with
bf16 support; CPUs with AVX512-BF16 or AMX), else fp32. Weights stay in fp32
under autocast (master weights); `bf16` casts the weights themselves.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .errors import LmsmithError

POLICIES = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "f32": torch.float32,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "f16": torch.float16}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_fast(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'float16' / torch.float32 ... -> torch.dtype (None stays None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise LmsmithError(f"unknown dtype {name!r}; choose one of: fp32, bf16, fp16")
    return DTYPES[name]


def autocast_dtype(policy: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype a policy means on this device, or None for plain fp32 compute."""
    if policy not in POLICIES:
        raise LmsmithError(f"unknown dtype policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    if policy == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else None
    if policy == "fp32":
        return None
    return DTYPES[policy]


def inference_dtype(policy: str, device: torch.device | str) -> torch.dtype:
    """The dtype the inference verbs (generate, chat, serve) hold the weights in for a policy.

    Decoding reads every weight once per step, so half-precision weights halve the bytes per token,
    and where bf16 matmuls are native they are also faster to multiply: `auto` is bf16 there, fp32
    elsewhere (on AVX2-only CPUs torch's bf16 matmuls are several times slower than fp32).
    """
    if policy not in POLICIES:
        raise LmsmithError(f"unknown dtype policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    if policy == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return DTYPES[policy]


def autocast(policy: str, device: torch.device | str):
    """Context manager applying the policy's autocast (a no-op for fp32)."""
    dtype = autocast_dtype(policy, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def describe_policy(policy: str, device: torch.device | str = "cpu") -> str:
    """One line saying what a policy computes in here and why (it decides a ~5x difference on CPUs)."""
    device = torch.device(device)
    dtype = autocast_dtype(policy, device)
    if policy == "auto":
        if dtype is not None:
            why = "the GPU supports bf16" if device.type == "cuda" else "this CPU has native bf16 (AVX512-BF16/AMX)"
            return f"precision auto: bf16 autocast ({why})"
        why = "this GPU has no bf16" if device.type == "cuda" else "this CPU has no native bf16 (AVX512-BF16/AMX)"
        return f"precision auto: fp32 ({why}; bf16 would be slower here)"
    return f"precision {policy}: " + ("fp32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast")
