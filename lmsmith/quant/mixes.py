"""Per-tensor type mixes: which GGUF type each tensor of a llama model gets.

A scheme such as Q4_K_M is not one type: llama.cpp (`llama_tensor_get_type` in
src/llama-quant.cpp) gives the tensors the model is most sensitive to more bits
- the output projection, some of the value projections and of the FFN down
projections - and the rest the scheme's base type. This module reproduces those
choices for dense llama-architecture models with GGUF tensor names
(`token_embd.weight`, `blk.N.attn_q.weight`, ..., `output.weight`), then applies
llama.cpp's fallback for rows that are not a whole number of blocks.

Shapes are given in torch/numpy order; the last dimension is the row length
(GGUF's ne[0]) that must divide into blocks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import LmsmithError
from .blocks import QType, fallback_type, type_info

# scheme -> the type every quantizable tensor starts from (llama_ftype_get_default_type)
_BASE = {
    "f32": QType.F32,
    "f16": QType.F16,
    "bf16": QType.BF16,
    "q8_0": QType.Q8_0,
    "q6_k": QType.Q6_K,
    "q5_k_m": QType.Q5_K,
    "q4_k_m": QType.Q4_K,
    "q4_0": QType.Q4_0,
    "q3_k_m": QType.Q3_K,
}

_LAYER = re.compile(r"^blk\.(\d+)\.")


def scheme_names() -> list[str]:
    """The mix names `tensor_types` accepts (case-insensitive), highest precision first."""
    return list(_BASE)


@dataclass(frozen=True)
class MixPlan:
    """The outcome of choosing types for a model.

    `types` maps every tensor name to its type; `fallbacks` maps the tensors
    whose rows did not fit the chosen type's block to `(wanted, used)`.
    """

    scheme: str
    types: dict[str, QType]
    fallbacks: dict[str, tuple[QType, QType]] = field(default_factory=dict)


def _use_more_bits(i: int, n: int) -> bool:
    # the first and last eighth of the layers, and every third one in between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for cat in ("attn_v", "attn_k", "attn_q", "attn_output"):
        if name.endswith(f".{cat}.weight"):
            return cat
    for cat in ("ffn_up", "ffn_gate", "ffn_down"):
        if f".{cat}" in name:
            return cat
    return "other"


def _is_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    # llama.cpp quantizes only 2-D+ tensors whose name ends in "weight", never norms
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _mixed_type(
    scheme: str, base: QType, cat: str, layer: int, n_layers: int, cols: int, tied: bool, is_70b: bool
) -> QType:
    """llama_tensor_get_type_impl for the schemes lmsmith offers (dense llama models)."""
    if cat == "output" or (tied and cat == "token_embd"):
        # the output projection (or the embedding standing in for it) is the most
        # sensitive tensor: Q6_K unless the scheme is Q8_0 already
        if cols % type_info(base).block_size:
            return QType.Q8_0
        return base if base == QType.Q8_0 else QType.Q6_K
    if cat == "attn_v":
        new = base
        if scheme == "q3_k_m":
            new = QType.Q5_K if layer < 2 else QType.Q4_K
        elif scheme in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layers):
            new = QType.Q6_K
        if is_70b and new in (QType.Q3_K, QType.Q4_K):
            # 8 query heads share each KV head: attn_v is 8x smaller than attn_q,
            # so more bits there cost almost nothing
            new = QType.Q5_K
        return new
    if cat == "ffn_down":
        if scheme == "q3_k_m":
            return QType.Q5_K if layer < n_layers // 16 else QType.Q4_K
        if scheme in ("q4_k_m", "q5_k_m") and _use_more_bits(layer, n_layers):
            return QType.Q6_K
        return base
    if cat == "attn_output" and scheme == "q3_k_m":
        return QType.Q4_K
    return base


def plan_mix(
    scheme: str,
    tensors: Mapping[str, tuple[int, ...]] | Iterable[tuple[str, tuple[int, ...]]],
    n_layers: int,
    *,
    n_head: int | None = None,
    n_head_kv: int | None = None,
) -> MixPlan:
    """Choose the GGUF type of every tensor for `scheme`, as llama.cpp's quantizer does.

    Args:
        scheme: one of `scheme_names()` (case-insensitive, e.g. "Q4_K_M").
        tensors: GGUF tensor names with their shapes (torch order, row length last),
            as a mapping or `(name, shape)` pairs.
        n_layers: number of transformer blocks (the `n` of the "use more bits" rule).
        n_head, n_head_kv: attention heads; only used for llama.cpp's 70B rule
            (80 layers with grouped KV heads: attn_v gets Q5_K instead of Q3_K/Q4_K).

    Returns:
        A `MixPlan`: 1-D tensors and norms stay F32; with no `output.weight`
        (tied embeddings) `token_embd.weight` gets the output's type; rows that
        do not fit the chosen type fall back (see `blocks.fallback_type`) and
        are listed in `fallbacks`.
    """
    key = str(scheme).lower()
    if key not in _BASE:
        raise LmsmithError(f"unknown quantization scheme {scheme!r}; known schemes: {', '.join(_BASE)}")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise LmsmithError(f"n_layers must be a positive integer, got {n_layers!r}")
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    base = _BASE[key]
    tied = not any(name == "output.weight" for name, _ in items)
    is_70b = n_layers == 80 and n_head is not None and n_head_kv is not None and n_head != n_head_kv

    types: dict[str, QType] = {}
    fallbacks: dict[str, tuple[QType, QType]] = {}
    for name, shape in items:
        shape = tuple(int(s) for s in shape)
        if not _is_quantizable(name, shape):
            types[name] = QType.F32
            continue
        if base in (QType.F32, QType.F16, QType.BF16):
            # float schemes: every matrix in that float type, no per-tensor mix
            types[name] = base
            continue
        cat = _category(name)
        layer = -1
        if cat in ("attn_v", "ffn_down"):
            m = _LAYER.match(name)
            if m is None or int(m.group(1)) >= n_layers:
                raise LmsmithError(f"tensor {name!r}: expected a 'blk.N.' prefix with N < n_layers={n_layers}")
            layer = int(m.group(1))
        wanted = _mixed_type(key, base, cat, layer, n_layers, shape[-1], tied, is_70b)
        used = fallback_type(wanted, shape[-1])
        if used != wanted:
            fallbacks[name] = (wanted, used)
        types[name] = used
    return MixPlan(scheme=key, types=types, fallbacks=fallbacks)


def tensor_types(
    scheme: str,
    tensors: Mapping[str, tuple[int, ...]] | Iterable[tuple[str, tuple[int, ...]]],
    n_layers: int,
    **kwargs,
) -> dict[str, QType]:
    """`{tensor name: QType}` for `scheme`; see `plan_mix` (which also reports fallbacks)."""
    return plan_mix(scheme, tensors, n_layers, **kwargs).types
