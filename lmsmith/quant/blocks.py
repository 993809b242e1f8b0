"""GGUF tensor types: their identity, sizes, and row-wise quantize/dequantize.

`QType` carries ggml's numeric type ids (the values `gguf.GGMLQuantizationType`
uses, so the two compare equal), `type_info` their block geometry, and
`quantize(x, qtype)` / `dequantize(data, qtype, shape)` turn a float32
`(rows, cols)` matrix into the exact bytes a GGUF file stores for that tensor
and back. A row is a whole number of blocks; `fallback_type` says which type
llama.cpp uses when it is not.

The 32-weight formats (Q8_0, Q4_0, Q5_0, Q5_1) live here and follow ggml's
reference quantizers (the ones that make deterministic model files); the
256-weight K-quants live in `kquants.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from ..errors import LmsmithError
from . import kquants


class QType(IntEnum):
    """ggml tensor types lmsmith can write; values are ggml's (== gguf.GGMLQuantizationType)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    BF16 = 30


@dataclass(frozen=True)
class TypeInfo:
    """Block geometry of a tensor type: `block_size` weights take `type_size` bytes."""

    qtype: QType
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight, scales included (e.g. 4.5 for Q4_K)."""
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of `cols` weights (cols must be a multiple of block_size)."""
        return cols // self.block_size * self.type_size


_INFO = {
    QType.F32: TypeInfo(QType.F32, 1, 4),
    QType.F16: TypeInfo(QType.F16, 1, 2),
    QType.BF16: TypeInfo(QType.BF16, 1, 2),
    QType.Q8_0: TypeInfo(QType.Q8_0, 32, 34),  # f16 d, int8 q[32]
    QType.Q4_0: TypeInfo(QType.Q4_0, 32, 18),  # f16 d, 16 bytes of nibbles
    QType.Q5_0: TypeInfo(QType.Q5_0, 32, 22),  # f16 d, u32 high bits, 16 bytes of nibbles
    QType.Q5_1: TypeInfo(QType.Q5_1, 32, 24),  # f16 d, f16 m, u32 high bits, nibbles
    QType.Q3_K: TypeInfo(QType.Q3_K, 256, 110),  # hmask[32], qs[64], scales[12], f16 d
    QType.Q4_K: TypeInfo(QType.Q4_K, 256, 144),  # f16 d, f16 dmin, scales[12], qs[128]
    QType.Q5_K: TypeInfo(QType.Q5_K, 256, 176),  # f16 d, f16 dmin, scales[12], qh[32], qs[128]
    QType.Q6_K: TypeInfo(QType.Q6_K, 256, 210),  # ql[128], qh[64], int8 scales[16], f16 d
}


def as_qtype(qtype: QType | int | str) -> QType:
    """Normalise a type given as QType, ggml id (e.g. a gguf.GGMLQuantizationType) or name ("q4_k")."""
    try:
        if isinstance(qtype, str):
            return QType[qtype.upper()]
        return QType(int(qtype))
    except (KeyError, ValueError):
        known = ", ".join(t.name for t in QType)
        raise LmsmithError(f"unsupported tensor type {qtype!r}; lmsmith writes: {known}") from None


def type_info(qtype: QType | int | str) -> TypeInfo:
    """Block size, bytes per block and bits per weight of a type."""
    return _INFO[as_qtype(qtype)]


# llama.cpp's tensor_type_fallback: a 256-block type on a row that is not a
# multiple of 256 drops to a 32-block type of similar cost; if the row is not a
# multiple of 32 either, F16.
_FALLBACK = {
    QType.Q3_K: QType.Q4_0,
    QType.Q4_K: QType.Q5_0,
    QType.Q5_K: QType.Q5_1,
    QType.Q6_K: QType.Q8_0,
}


def fallback_type(qtype: QType | int | str, cols: int) -> QType:
    """The type a row of `cols` weights really gets when `qtype` was wanted.

    `qtype` itself when `cols` is a multiple of its block size; otherwise
    llama.cpp's fallback (Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0),
    and F16 when even that does not fit. llama.cpp refuses a Q8_0/Q4_0 target
    on such a row; lmsmith writes F16 instead.
    """
    qt = as_qtype(qtype)
    if cols % _INFO[qt].block_size == 0:
        return qt
    alt = _FALLBACK.get(qt, QType.F16)
    return alt if cols % _INFO[alt].block_size == 0 else QType.F16


# --------------------------------------------------------------------------
# 32-weight formats, byte for byte what ggml's quantize_row_*_ref writes


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return kquants._f16_bytes(v)


def _signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """Per block, the weight of largest magnitude with its sign (first one on ties), `(n, 1)`."""
    idx = np.abs(blocks).argmax(axis=1)[:, None]
    return np.take_along_axis(blocks, idx, axis=1)


def _inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    # d = amax/127, q = round-half-away(x/d): every weight keeps 8 bits of the block's range
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    v = blocks * _inv(d)
    # C roundf (halves away from zero), computed without forming |v| + 0.5, which
    # can itself round up for |v| just below one half
    a = np.abs(v)
    fl = np.floor(a)
    q = np.sign(v) * (fl + np.floor(2 * (a - fl)))
    return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


def _dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    d = kquants._read_f16(data, 0)
    return data[:, 2:34].view(np.int8).astype(np.float32) * d


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Pack 32 values: byte j = q[j] low 4 bits | q[j+16] low 4 bits << 4."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of 32 values as a little-endian u32 (4 bytes): bit j is weight j."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _unnibble(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    # the signed extreme maps to -8 (the range [-8, 7] has one more negative level)
    d = _signed_absmax(blocks) / np.float32(-8)
    q = np.trunc(blocks * _inv(d) + np.float32(8.5)).clip(0, 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _nibbles(q)], axis=1)


def _dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    d = kquants._read_f16(data, 0)
    q = _unnibble(data[:, 2:18]).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def _quantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    d = _signed_absmax(blocks) / np.float32(-16)
    q = np.trunc(blocks * _inv(d) + np.float32(16.5)).clip(0, 31).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _high_bits(q), _nibbles(q)], axis=1)


def _q5_values(data: np.ndarray, qh_at: int) -> np.ndarray:
    qh = np.unpackbits(data[:, qh_at : qh_at + 4], axis=1, bitorder="little")
    return _unnibble(data[:, qh_at + 4 : qh_at + 20]) | (qh << 4)


def _dequantize_q5_0(data: np.ndarray) -> np.ndarray:
    d = kquants._read_f16(data, 0)
    q = _q5_values(data, 2).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def _quantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    # min/max with an offset: x = d*q + m, q in [0, 31]
    mx = blocks.max(axis=1, keepdims=True)
    mn = blocks.min(axis=1, keepdims=True)
    d = (mx - mn) / np.float32(31)
    q = np.trunc((blocks - mn) * _inv(d) + np.float32(0.5)).clip(0, 31).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), _high_bits(q), _nibbles(q)], axis=1)


def _dequantize_q5_1(data: np.ndarray) -> np.ndarray:
    d = kquants._read_f16(data, 0)
    m = kquants._read_f16(data, 2)
    return d * _q5_values(data, 4).astype(np.float32) + m


# --------------------------------------------------------------------------
# float types: one "block" per weight


def _quantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.astype("<f4").view(np.uint8)


def _quantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.astype("<f2").view(np.uint8)  # IEEE round-to-nearest-even; overflow -> inf


def _quantize_bf16(blocks: np.ndarray) -> np.ndarray:
    # ggml_compute_fp32_to_bf16: round to nearest even on the upper 16 bits (inputs are finite)
    n = blocks.astype("<f4").view(np.uint32).astype(np.uint64)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.astype("<u2").view(np.uint8)


def _dequantize_f32(data: np.ndarray) -> np.ndarray:
    return data.view("<f4").astype(np.float32)


def _dequantize_f16(data: np.ndarray) -> np.ndarray:
    return data.view("<f2").astype(np.float32)


def _dequantize_bf16(data: np.ndarray) -> np.ndarray:
    return (data.view("<u2").astype(np.uint32) << 16).view(np.float32)


_CODECS = {
    QType.F32: (_quantize_f32, _dequantize_f32),
    QType.F16: (_quantize_f16, _dequantize_f16),
    QType.BF16: (_quantize_bf16, _dequantize_bf16),
    QType.Q8_0: (_quantize_q8_0, _dequantize_q8_0),
    QType.Q4_0: (_quantize_q4_0, _dequantize_q4_0),
    QType.Q5_0: (_quantize_q5_0, _dequantize_q5_0),
    QType.Q5_1: (_quantize_q5_1, _dequantize_q5_1),
    QType.Q3_K: (kquants.quantize_q3_k, kquants.dequantize_q3_k),
    QType.Q4_K: (kquants.quantize_q4_k, kquants.dequantize_q4_k),
    QType.Q5_K: (kquants.quantize_q5_k, kquants.dequantize_q5_k),
    QType.Q6_K: (kquants.quantize_q6_k, kquants.dequantize_q6_k),
}

# weights per call of a block codec: bounds the temporaries of the K-quant
# searches (a few arrays of this many float32/float64) while keeping numpy's
# per-call overhead small
_CHUNK_WEIGHTS = 1 << 18


def _check_rows(shape: tuple[int, ...], info: TypeInfo, what: str) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 1:
        raise LmsmithError(f"{what} needs a 2-D (rows, cols) shape, got {tuple(shape)}")
    rows, cols = int(shape[0]), int(shape[1])
    if cols % info.block_size:
        alt = fallback_type(info.qtype, cols)
        raise LmsmithError(
            f"cannot store {info.qtype.name} rows of {cols} weights: the row length must be a multiple "
            f"of {info.block_size}; use {alt.name} for this tensor (see lmsmith.quant.fallback_type)"
        )
    return rows, cols


# The block types whose scale searches take an importance vector (llama.cpp's imatrix).
CALIBRATED_TYPES = (QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)


def quantize(x: np.ndarray, qtype: QType | int | str, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize a float matrix to GGUF bytes.

    Args:
        x: `(rows, cols)` weights (any float dtype; computed in float32). `cols`
            is the GGUF row length (ne[0]) and must be a multiple of the
            type's block size (see `fallback_type`).
        qtype: target type (QType, ggml id or name).
        importance: `(cols,)` non-negative weight of each input column (the mean squared
            activation it sees: an importance matrix, `quant.imatrix`). The K-quants then search
            their scales to minimise the importance-weighted error, as llama.cpp does with
            `--imatrix`; other types ignore it. The bytes keep the same format.

    Returns:
        uint8 `(rows, type_info(qtype).row_bytes(cols))`: the tensor's data as
        a GGUF file stores it; `gguf.quants.dequantize` reads it.
    """
    info = type_info(qtype)
    x = np.asarray(x)
    rows, cols = _check_rows(x.shape, info, f"quantize to {info.qtype.name}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise LmsmithError(f"cannot quantize to {info.qtype.name}: the tensor contains NaN or inf values")
    encode = _CODECS[info.qtype][0]
    blocks = x.reshape(-1, info.block_size)
    qw = None
    if importance is not None and info.qtype in CALIBRATED_TYPES:
        importance = np.asarray(importance, dtype=np.float32).reshape(-1)
        if importance.shape != (cols,) or not np.isfinite(importance).all() or (importance < 0).any():
            raise LmsmithError(f"importance must hold {cols} finite non-negative values (one per column), "
                               f"got shape {importance.shape}")
        qw = np.broadcast_to(importance, (rows, cols)).reshape(-1, info.block_size)
    per_chunk = max(1, _CHUNK_WEIGHTS // info.block_size)
    out = np.empty((blocks.shape[0], info.type_size), np.uint8)
    for start in range(0, blocks.shape[0], per_chunk):
        chunk = blocks[start : start + per_chunk]
        out[start : start + per_chunk] = encode(chunk) if qw is None else encode(chunk, qw[start : start + per_chunk])
    return out.reshape(rows, info.row_bytes(cols))


def dequantize(data: np.ndarray, qtype: QType | int | str, shape: tuple[int, int]) -> np.ndarray:
    """GGUF bytes of a `shape = (rows, cols)` tensor back to float32 `(rows, cols)`.

    Gives the same float32 values, bit for bit, as `gguf.quants.dequantize`.
    """
    info = type_info(qtype)
    rows, cols = _check_rows(tuple(shape), info, f"dequantize {info.qtype.name}")
    data = np.ascontiguousarray(np.asarray(data)).view(np.uint8)
    n_blocks = rows * cols // info.block_size
    if data.size != n_blocks * info.type_size:
        raise LmsmithError(
            f"{info.qtype.name} data for shape {(rows, cols)} must be {n_blocks * info.type_size} bytes, "
            f"got {data.size}"
        )
    decode = _CODECS[info.qtype][1]
    blocks = data.reshape(n_blocks, info.type_size)
    per_chunk = max(1, _CHUNK_WEIGHTS // info.block_size)
    out = np.empty((n_blocks, info.block_size), np.float32)
    for start in range(0, n_blocks, per_chunk):
        out[start : start + per_chunk] = decode(blocks[start : start + per_chunk])
    return out.reshape(rows, cols)
