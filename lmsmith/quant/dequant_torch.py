"""Dequantization of GGUF blocks in torch: the fallback of packed layers where the C++ kernels do not run
(a GPU, or a machine without a compiler). Same values as `blocks.dequantize` (tested type by type).

Each function maps `(n, type_size)` uint8 blocks to float32 `(n, block_size)` with vectorised bit
operations, so it runs on any device torch runs on.
"""

from __future__ import annotations

import torch

from .blocks import QType


def _f16(data: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 stored at byte `start` of every block (n, type_size), as float32 (n, 1)."""
    return data[:, start:start + 2].contiguous().view(torch.float16).float()


def _shifts(*values: int, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def q8_0(data: torch.Tensor) -> torch.Tensor:
    """Q8_0 (n, 34): f16 d, int8 q[32]."""
    return _f16(data, 0) * data[:, 2:34].contiguous().view(torch.int8).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes per block -> 32 values: weight j in the low nibble of byte j, weight j + 16 in the high."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _fifth_bits(data: torch.Tensor, at: int) -> torch.Tensor:
    """A little-endian u32 at byte `at` -> (n, 32) bits, bit j for weight j."""
    bits = data[:, at:at + 4, None] >> torch.arange(8, dtype=torch.uint8, device=data.device)
    return (bits & 1).reshape(-1, 32)


def q4_0(data: torch.Tensor) -> torch.Tensor:
    """Q4_0 (n, 18): f16 d, nibbles; d * (q - 8)."""
    return _f16(data, 0) * (_nibbles(data[:, 2:18]).float() - 8)


def q5_0(data: torch.Tensor) -> torch.Tensor:
    """Q5_0 (n, 22): f16 d, u32 fifth bits, nibbles; d * (q - 16)."""
    q = _nibbles(data[:, 6:22]) | (_fifth_bits(data, 2) << 4)
    return _f16(data, 0) * (q.float() - 16)


def q5_1(data: torch.Tensor) -> torch.Tensor:
    """Q5_1 (n, 24): f16 d, f16 m, u32 fifth bits, nibbles; d * q + m."""
    q = _nibbles(data[:, 8:24]) | (_fifth_bits(data, 4) << 4)
    return _f16(data, 0) * q.float() + _f16(data, 2)


def _scale_min_k4(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K header -> per-sub-block scale and min (n, 8, 1), float32 (ggml get_scale_min_k4)."""
    s = data[:, 4:16]
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], dim=1).float()
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1).float()
    return (_f16(data, 0) * sc)[:, :, None], (_f16(data, 2) * mn)[:, :, None]


def q4_k(data: torch.Tensor) -> torch.Tensor:
    """Q4_K (n, 144): 32-byte chunk c of qs holds sub-block 2c (low nibbles) and 2c + 1 (high)."""
    n = data.shape[0]
    d, m = _scale_min_k4(data)
    qs = data[:, 16:144].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).float()
    return (d * q - m).reshape(n, 256)


def q5_k(data: torch.Tensor) -> torch.Tensor:
    """Q5_K (n, 176): as Q4_K, plus qh[32] whose bit s is the fifth bit of sub-block s."""
    n = data.shape[0]
    d, m = _scale_min_k4(data)
    qh = data[:, 16:48].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=data.device).reshape(1, 8, 1)
    qs = data[:, 48:176].reshape(n, 4, 1, 32)
    low = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)
    return (d * (low | ((qh & 1) << 4)).float() - m).reshape(n, 256)


def q6_k(data: torch.Tensor) -> torch.Tensor:
    """Q6_K (n, 210): ql[128], qh[64], int8 scales[16], f16 d; d * scale * (q - 32)."""
    n = data.shape[0]
    sc = data[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(data, 208) * sc).reshape(n, 16, 1)
    ql = data[:, 0:128].reshape(n, 2, 1, 64) >> _shifts(0, 4, device=data.device).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(n, 2, 4, 32)
    qh = data[:, 128:192].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=data.device).reshape(1, 1, 4, 1)
    q = (ql | ((qh & 0x03) << 4)).reshape(n, 16, 16).float() - 32
    return (d * q).reshape(n, 256)


def q3_k(data: torch.Tensor) -> torch.Tensor:
    """Q3_K (n, 110): hmask[32], qs[64], scales[12], f16 d; d * (scale - 32) * q, q in [-4, 3]."""
    n, dev = data.shape[0], data.device
    s = data[:, 96:108]
    low = (s[:, 0:8].reshape(n, 1, 8) >> _shifts(0, 4, device=dev).reshape(1, 2, 1)).reshape(n, 16)
    high = (s[:, 8:12].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6, device=dev).reshape(1, 4, 1)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).float() - 32
    d = (_f16(data, 108) * sc).reshape(n, 16, 1)
    ql = (data[:, 32:96].reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=dev).reshape(1, 1, 4, 1)) & 0x03
    qh = (data[:, 0:32].reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=dev).reshape(1, 8, 1)) & 1
    q = ql.reshape(n, 16, 16).float() - 4 * (1 - qh.reshape(n, 16, 16).float())
    return (d * q).reshape(n, 256)


DEQUANTIZE = {QType.Q8_0: q8_0, QType.Q4_0: q4_0, QType.Q5_0: q5_0, QType.Q5_1: q5_1,
              QType.Q3_K: q3_k, QType.Q4_K: q4_k, QType.Q5_K: q5_k, QType.Q6_K: q6_k}
