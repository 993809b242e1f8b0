"""Quantization: GGUF block formats and llama.cpp's per-tensor type mixes.

- `quantize(x, qtype)` / `dequantize(data, qtype, shape)`: float32 `(rows, cols)`
  to the exact bytes a GGUF file stores, and back (blocks.py, kquants.py).
- `tensor_types(scheme, tensors, n_layers)` / `plan_mix(...)`: the type of every
  tensor for Q4_K_M, Q3_K_M, ... as llama.cpp chooses it (mixes.py).
"""

from .blocks import QType, TypeInfo, as_qtype, dequantize, fallback_type, quantize, type_info
from .mixes import MixPlan, plan_mix, scheme_names, tensor_types

__all__ = [
    "MixPlan",
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
