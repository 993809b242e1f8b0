"""What every benchmark prints about the machine its figures came from (the README names the CPU)."""

from __future__ import annotations

import os


def cpu_description() -> str:
    """'AMD EPYC, 2 cores, AVX512-BF16' (or 'AVX2 only'): bf16 matmuls are ~4x fp32 on the first kind."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        return f"{name}, {os.cpu_count()} cores, {'AVX512-BF16' if 'avx512_bf16' in text else 'AVX2 only'}"
    except (OSError, StopIteration):
        return "unknown"
