"""Quantized inference: linear layers (and the embedding) whose weights stay packed in memory.

`QuantLinear` keeps its weight as the bytes of a GGUF block type (Q8_0, Q4_0, Q5_0, Q5_1, Q3_K,
Q4_K, Q5_K, Q6_K: the types llama.cpp's mixes use) or as int8 with one float scale per output
row. Its product never builds the whole float weight:

- few rows (decode, up to `KERNEL_ROWS` tokens) on CPU: the C++ kernels of kernels.py. By default
  they round the activations to int8 and multiply blocks in integers, as llama.cpp does (about
  0.6% relative error per product); with `exact = True` (`set_exact(model)`) they multiply float
  activations with the dequantized weights;
- more rows (prefill), or no kernels: the weight is dequantized in chunks of output rows
  (`_CHUNK_WEIGHTS` at a time) and multiplied with torch's matmul, which is compute-bound there.

Exact mode and the many-rows path use exactly lmsmith's dequantized values, so logits equal
dequantize-then-matmul up to float rounding. Resident memory is the packed size (Q4_K: 4.5 bits
per weight) plus one chunk.
`QuantEmbedding` is the packed token table: a lookup dequantizes only the rows it reads, and a
tied head is a `QuantLinear` over the same bytes.

`apply_quantization(model, scheme)` swaps the `nn.Linear` modules of a built model for
`QuantLinear` ones (principle 1: the model itself knows nothing of this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LmsmithError
from . import kernels
from .blocks import QType, quantize, type_info
from .dequant_torch import DEQUANTIZE

# Formats a packed layer can hold: int8 with row scales, and the GGUF block types.
PACKED_FORMATS = tuple(kernels.TYPE_CODES)
QUANT_LINEAR_SCHEMES = ("int8", "q8_0", "q4_k", "q4_k_m", "q3_k_m")  # what apply_quantization takes

# Weights dequantized per chunk on the many-rows path: bounds the temporary (4M fp32 weights = 16 MB).
_CHUNK_WEIGHTS = 1 << 22
# Up to this many rows the kernels' product beats dequantize + BLAS (measured on AVX2, bench/quant_decode_speed.py).
KERNEL_ROWS = 32


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: `(q int8 (out, in), scale float32 (out,))` with w ~= q * scale[:, None]."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, q = 0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


class _Packed(nn.Module):
    """Rows of packed weights: `qweight` (int8 (rows, cols), or uint8 (rows, row bytes)), `weight_scale` (int8)."""

    def _init_packed(self, rows: int, cols: int, fmt: str, qweight: torch.Tensor, weight_scale: torch.Tensor | None):
        if fmt not in PACKED_FORMATS:
            raise LmsmithError(f"unknown packed format {fmt!r}; known: {', '.join(PACKED_FORMATS)}")
        self.fmt, self.rows, self.cols = fmt, rows, cols
        self.qtype = None if fmt == "int8" else QType[fmt.upper()]
        if self.qtype is not None and cols % type_info(self.qtype).block_size:
            raise LmsmithError(f"{fmt} needs rows that are a multiple of {type_info(self.qtype).block_size} "
                               f"weights, got {cols}")
        row_bytes = cols if fmt == "int8" else type_info(self.qtype).row_bytes(cols)
        if qweight.numel() != rows * row_bytes:
            raise LmsmithError(f"{fmt} weight of {rows} x {cols} needs {rows * row_bytes} bytes, got {qweight.numel()}")
        if qweight.shape != (rows, row_bytes):  # else keep the very tensor given: a tied head shares it
            qweight = qweight.reshape(rows, row_bytes)
        self.register_buffer("qweight", qweight)
        scale = weight_scale.float().contiguous() if weight_scale is not None else None
        self.register_buffer("weight_scale", scale)

    def _kernels(self, device: torch.device):
        return kernels.library() if device.type == "cpu" else None

    def _decode(self, q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """Packed rows q (n, row bytes) (and their int8 scales) -> float32 (n, cols): the kernels on CPU,
        else torch."""
        n = q.shape[0]
        if self._kernels(q.device) is not None:
            return kernels.dequantize(self.fmt, q.contiguous(), scale, n, self.cols)
        if self.fmt == "int8":
            return q.float() * scale[:, None]
        return DEQUANTIZE[self.qtype](q.reshape(-1, type_info(self.qtype).type_size)).reshape(n, self.cols)

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows start:end of the weight, dequantized to `dtype` (end - start, cols)."""
        scale = self.weight_scale[start:end] if self.weight_scale is not None else None
        return self._decode(self.qweight[start:end], scale).to(dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight as a float tensor (rows, cols) (for tests and export; forward never builds it)."""
        return self.dequantize_rows(0, self.rows, dtype)


class QuantLinear(_Packed):
    """`y = x W^T + b` with W held packed (int8 + row scales, or a GGUF block type).

    Build with `QuantLinear.from_linear(linear, fmt)` or from bytes a file holds:
    `QuantLinear(in_features, out_features, fmt, qweight, weight_scale=None, bias=None)`.
    `exact` (default False): float activations in the few-row product (see the module docstring).
    """

    exact = False

    def __init__(self, in_features: int, out_features: int, fmt: str, qweight: torch.Tensor,
                 weight_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        self._init_packed(out_features, in_features, fmt, qweight, weight_scale)
        self.in_features, self.out_features = in_features, out_features
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features), in x's dtype (or autocast's)."""
        dtype = _compute_dtype(x)
        if x.is_cpu and x.numel() <= KERNEL_ROWS * self.in_features and kernels.library() is not None:
            y = self._product()(x, self.exact)  # the decode path: few rows, the kernels
            y = y if dtype == torch.float32 else y.to(dtype)
        else:
            x2 = x.reshape(-1, self.in_features)
            x2, step = x2.to(dtype), self._rows_per_chunk
            y = torch.cat([F.linear(x2, self.dequantize_rows(s, min(s + step, self.out_features), dtype))
                           for s in range(0, self.out_features, step)], dim=-1)
            y = y.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y

    def _product(self) -> kernels.Product:
        """The kernel call for this weight, rebuilt if the buffer moved (`.to()`, `load_state_dict`)."""
        p, buffers = self.__dict__.get("_bound"), self._buffers  # plain dict lookups: this runs every call
        if p is None or p.qweight is not buffers["qweight"] or p.scales is not buffers["weight_scale"]:
            p = self._bound = kernels.Product(self.fmt, self.qweight, self.weight_scale, self.out_features,
                                              self.in_features)
        return p

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, " \
               f"bias={self.bias is not None}"


class QuantEmbedding(_Packed):
    """A token table held packed: `forward(ids (B, T)) -> (B, T, dim)` dequantizes only the rows looked up.

    `dtype` is the dtype of the rows it returns (the model's float dtype).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str, qweight: torch.Tensor,
                 weight_scale: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self._init_packed(num_embeddings, embedding_dim, fmt, qweight, weight_scale)
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        scale = self.weight_scale.index_select(0, flat) if self.weight_scale is not None else None
        rows = self._decode(self.qweight.index_select(0, flat), scale)
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}"


def _pick_format(scheme: str, in_features: int, head: bool) -> str:
    """One type for every layer ("q8_0", "q4_k"), the head with 8 bits at least; rows that do not
    fit fall back to q8_0, then to per-row int8, which fits any row."""
    if head and scheme == "q4_k":
        scheme = "q8_0"  # the output projection gets more bits (llama.cpp: Q6_K)
    if scheme in ("q4_k", "q8_0"):
        if in_features % type_info(QType[scheme.upper()]).block_size == 0:
            return scheme
        return "q8_0" if in_features % 32 == 0 else "int8"
    return scheme


def _mix_formats(model: nn.Module, scheme: str) -> dict[str, str]:
    """`{module name: format}` as llama.cpp's mix `scheme` types each tensor (mixes.py), the embedding included."""
    from .gguf import gguf_name
    from .mixes import tensor_types

    mats = {name: m.weight.shape for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    if getattr(model.config, "tie_embeddings", False):
        mats.pop("lm_head", None)
    types = tensor_types(scheme, {gguf_name(f"{n}.weight"): tuple(s) for n, s in mats.items()}, model.config.n_layers)
    formats = {}
    for name in mats:
        t = types[gguf_name(f"{name}.weight")]
        formats[name] = t.name.lower() if t.name.lower() in PACKED_FORMATS else "int8"  # an F16 fallback row
    return formats


@torch.no_grad()
def apply_quantization(model: nn.Module, scheme: str, *, quantize_head: bool = True) -> dict[str, str]:
    """Replace the model's linear layers (and, for a mix, its embedding) by packed modules, in place.

    Args:
        model: a lmsmith Transformer (any float dtype, CPU or GPU).
        scheme: "int8" (per-row symmetric); "q8_0" or "q4_k" (one GGUF type for every layer, the
            head 8 bits; rows that do not fit fall back to q8_0, then int8); or a llama.cpp mix,
            "q4_k_m" / "q3_k_m", which types every tensor as `lmsmith quantize` does (Q6_K head,
            some value/down projections with more bits) and packs the embedding too, so the model
            holds the same bytes as the GGUF file.
        quantize_head: also quantize an untied LM head (not for mixes, which always do);
            a tied head follows the embedding (float, or packed by a mix).

    Returns:
        `{module name: format}` for every module replaced.
    """
    key = str(scheme).lower()
    if key not in QUANT_LINEAR_SCHEMES:
        raise LmsmithError(f"unknown packed-inference scheme {scheme!r}; known: {', '.join(QUANT_LINEAR_SCHEMES)}")
    tied = bool(getattr(getattr(model, "config", None), "tie_embeddings", False))
    if key in ("q4_k_m", "q3_k_m"):
        done = _mix_formats(model, key)
    else:
        done = {name: _pick_format(key, m.in_features, name == "lm_head") for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and not (name == "lm_head" and (tied or not quantize_head))}
    for name, fmt in done.items():
        module = model.get_submodule(name)
        if isinstance(module, nn.Embedding):
            packed = QuantLinear.from_linear(_as_linear(module), fmt)
            model.set_submodule(name, QuantEmbedding(module.num_embeddings, module.embedding_dim, fmt,
                                                     packed.qweight, packed.weight_scale, module.weight.dtype))
            if tied:  # the head reads the same bytes
                model.lm_head = QuantLinear(module.embedding_dim, module.num_embeddings, fmt, packed.qweight,
                                            packed.weight_scale)
        else:
            model.set_submodule(name, QuantLinear.from_linear(module, fmt))
    return done


def _as_linear(emb: nn.Embedding) -> nn.Linear:
    lin = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device="meta")
    lin.weight = emb.weight
    return lin


def has_packed_weights(model: nn.Module) -> bool:
    """Whether any layer of `model` keeps packed (quantized) weights."""
    return any(isinstance(m, _Packed) for m in model.modules())


def set_exact(model: nn.Module, exact: bool = True) -> nn.Module:
    """Make every `QuantLinear` of `model` multiply float activations (exact) or int8 ones (fast); returns `model`."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.exact = exact
    return model


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
