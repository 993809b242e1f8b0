"""Quantized inference: a linear layer whose weight stays packed in memory.

`QuantLinear` keeps its weight as the bytes of a block format (uint8 buffer of
GGUF Q8_0 or Q4_K blocks) or as int8 with one float scale per output row, and
dequantizes it inside `forward`, in chunks of output rows, in torch (vectorised
bit operations, so it runs wherever torch runs). Nothing dequantized is cached:
resident memory is the packed size (Q4_K: 4.5 bits per weight) plus one chunk.

`apply_quantization(model, scheme)` swaps the `nn.Linear` modules of a built
model for `QuantLinear` ones (principle 1: the model itself knows nothing of
this). The embedding stays a float table (a lookup, not a matmul); a tied LM
head stays tied to it, an untied one is quantized with at least 8 bits because
the output projection is the most sensitive matrix (llama.cpp does the same).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LmsmithError
from .blocks import QType, quantize, type_info

# Formats QuantLinear can hold, by the name `apply_quantization` takes.
QUANT_LINEAR_SCHEMES = ("int8", "q8_0", "q4_k")

# Weights dequantized per chunk in forward: bounds the temporary (4M fp32 weights = 16 MB).
_CHUNK_WEIGHTS = 1 << 22


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: `(q int8 (out, in), scale float32 (out,))` with w ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, q = 0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _f16(data: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 stored at byte `start` of every block (n, type_size), as float32 (n, 1)."""
    return data[:, start:start + 2].contiguous().view(torch.float16).float()


def dequantize_q8_0_torch(data: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks (n, 34) uint8 -> float32 (n, 32)."""
    return _f16(data, 0) * data[:, 2:34].contiguous().view(torch.int8).float()


def dequantize_q4_k_torch(data: torch.Tensor) -> torch.Tensor:
    """Q4_K super-blocks (n, 144) uint8 -> float32 (n, 256), the same values as `dequantize(..., Q4_K)`."""
    n = data.shape[0]
    d, dmin = _f16(data, 0), _f16(data, 2)
    s = data[:, 4:16]
    # 8 sub-blocks, each with a 6-bit scale and a 6-bit min packed into 12 bytes (ggml get_scale_min_k4)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], dim=1).float()
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1).float()
    qs = data[:, 16:144].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).float()  # chunk c: sub-blocks 2c, 2c+1
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(n, 256)


_TORCH_DEQUANT = {QType.Q8_0: dequantize_q8_0_torch, QType.Q4_K: dequantize_q4_k_torch}


class QuantLinear(nn.Module):
    """`y = x W^T + b` with W held packed (int8 + row scales, Q8_0 or Q4_K) and dequantized per forward.

    Build with `QuantLinear.from_linear(linear, fmt)`; `fmt` is "int8", "q8_0" or "q4_k".
    Buffers: `qweight` (int8 (out, in) or uint8 (out, row_bytes)), `weight_scale` (int8 only), `bias`.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, qweight: torch.Tensor,
                 weight_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        if fmt not in QUANT_LINEAR_SCHEMES:
            raise LmsmithError(f"unknown QuantLinear format {fmt!r}; known: {', '.join(QUANT_LINEAR_SCHEMES)}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.qtype = None if fmt == "int8" else QType[fmt.upper()]
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale)
        # bias stays a parameter: fine-tuning code may still want to train it
        self.bias = nn.Parameter(bias.detach().float(), requires_grad=False) if bias is not None else None
        self._rows_per_chunk = max(1, _CHUNK_WEIGHTS // max(in_features, 1))

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str) -> QuantLinear:
        """Quantize an `nn.Linear`'s weight into a new QuantLinear (the Linear is left untouched)."""
        w = linear.weight.detach()
        bias = linear.bias.detach() if linear.bias is not None else None
        if fmt == "int8":
            q, scale = quantize_int8(w)
            return cls(linear.in_features, linear.out_features, fmt, q.to(w.device), scale.to(w.device), bias)
        qt = QType[fmt.upper()]
        if linear.in_features % type_info(qt).block_size:
            raise LmsmithError(f"{fmt} needs rows that are a multiple of {type_info(qt).block_size} weights, "
                               f"got {linear.in_features}")
        packed = torch.from_numpy(quantize(w.float().cpu().numpy(), qt)).to(w.device)
        return cls(linear.in_features, linear.out_features, fmt, packed, None, bias)

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows start:end of the weight, dequantized to `dtype` (end - start, in_features)."""
        if self.fmt == "int8":
            return (self.qweight[start:end].to(dtype) * self.weight_scale[start:end, None].to(dtype))
        info = type_info(self.qtype)
        blocks = self.qweight[start:end].reshape(-1, info.type_size)
        return _TORCH_DEQUANT[self.qtype](blocks).reshape(end - start, self.in_features).to(dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight as a float tensor (out, in) (for tests and export; forward never builds it)."""
        return self.dequantize_rows(0, self.out_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        step = self._rows_per_chunk
        if step >= self.out_features:
            if self.fmt == "int8":  # the scale commutes with the matmul: scale the outputs, not the weights
                y = F.linear(x, self.qweight.to(dtype)) * self.weight_scale.to(dtype)
            else:
                y = F.linear(x, self.dequantize_rows(0, self.out_features, dtype))
        else:
            y = torch.cat([F.linear(x, self.dequantize_rows(s, min(s + step, self.out_features), dtype))
                           for s in range(0, self.out_features, step)], dim=-1)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, " \
               f"bias={self.bias is not None}"


def _pick_format(scheme: str, in_features: int, head: bool) -> str:
    if head and scheme == "q4_k":
        scheme = "q8_0"  # the output projection gets more bits (llama.cpp: Q6_K)
    if scheme in ("q4_k", "q8_0"):
        if in_features % type_info(QType[scheme.upper()]).block_size == 0:
            return scheme
        # llama.cpp-style fallback to a smaller block, then to per-row int8 which fits any row
        return "q8_0" if in_features % 32 == 0 else "int8"
    return scheme


@torch.no_grad()
def apply_quantization(model: nn.Module, scheme: str, *, quantize_head: bool = True) -> dict[str, str]:
    """Replace the model's linear layers by packed `QuantLinear`s, in place.

    Args:
        model: a lmsmith Transformer (any float dtype, CPU or GPU).
        scheme: "int8" (per-row symmetric), "q8_0" or "q4_k" (GGUF blocks; rows that do
            not fit fall back to q8_0, then int8).
        quantize_head: also quantize an untied LM head (8-bit at least); a tied head
            always stays the (float) embedding.

    Returns:
        `{module name: format}` for every module replaced.
    """
    key = str(scheme).lower()
    if key == "q4_k_m":
        key = "q4_k"
    if key not in QUANT_LINEAR_SCHEMES:
        raise LmsmithError(f"unknown packed-inference scheme {scheme!r}; known: {', '.join(QUANT_LINEAR_SCHEMES)}")
    tied = bool(getattr(getattr(model, "config", None), "tie_embeddings", False))
    done: dict[str, str] = {}
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        head = name == "lm_head"
        if head and (tied or not quantize_head):
            continue
        fmt = _pick_format(key, linear.in_features, head)
        model.set_submodule(name, QuantLinear.from_linear(linear, fmt))
        done[name] = fmt
    return done


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied tensors counted once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.data_ptr()) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def packed_from_numpy(data: np.ndarray) -> torch.Tensor:
    """A uint8 torch tensor sharing memory with GGUF bytes (helper for loaders)."""
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))
