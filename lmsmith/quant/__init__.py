"""Quantization: GGUF block formats and llama.cpp's per-tensor type mixes.

- `quantize(x, qtype)` / `dequantize(data, qtype, shape)`: float32 `(rows, cols)`
  to the exact bytes a GGUF file stores, and back (blocks.py, kquants.py).
- `tensor_types(scheme, tensors, n_layers)` / `plan_mix(...)`: the type of every
  tensor for Q4_K_M, Q3_K_M, ... as llama.cpp chooses it (mixes.py).
- `export_gguf` / `open_gguf`: GGUF files llama.cpp runs, and reading them back (gguf.py; `lmsmith.load` loads them).
- `save_int8` / `open_int8`: int8 per-channel weight-only directories (int8.py).
- `QuantLinear` / `apply_quantization`: packed quantized inference in torch (linear.py).
- `quality_table`: bits per weight, size and perplexity per scheme (report.py).

gguf.py, int8.py and report.py are imported on first use (they pull in optional packages).
"""

from .blocks import QType, TypeInfo, as_qtype, dequantize, fallback_type, quantize, type_info
from .linear import QuantLinear, apply_quantization, resident_bytes
from .mixes import MixPlan, plan_mix, scheme_names, tensor_types

_LAZY = {
    "export_gguf": "gguf", "open_gguf": "gguf", "read_gguf": "gguf",
    "save_int8": "int8", "open_int8": "int8", "is_int8_dir": "int8",
    "quality_table": "report", "format_table": "report",
}


def __getattr__(name: str):
    # gguf.py needs the optional `gguf` package: import it only when asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MixPlan",
    "QuantLinear",
    "apply_quantization",
    "export_gguf",
    "format_table",
    "is_int8_dir",
    "open_gguf",
    "open_int8",
    "quality_table",
    "read_gguf",
    "resident_bytes",
    "save_int8",
    "QType",
    "TypeInfo",
    "as_qtype",
    "dequantize",
    "fallback_type",
    "plan_mix",
    "quantize",
    "scheme_names",
    "tensor_types",
    "type_info",
]
