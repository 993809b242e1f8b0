"""Error-compensating quantization (GPTQ-style) that still writes the standard GGUF block formats.

GPTQ rounds a weight matrix's columns in order and, after each, moves the rounding error onto the
columns not yet rounded, in the proportions that keep the layer's *output* on the calibration data
closest: with H = sum over tokens of x x^T (the inputs' second moments) and U the upper Cholesky
factor of H^-1, rounding column j with error e_j changes the later columns by -e_j / U_jj * U_j,>j.

Here the unit of rounding is one block span of columns (256 for K-quants, 32 for the others):
every span is quantized by lmsmith's own block quantizer (`blocks.quantize`, calibrated with the
importance if given), so the bytes are exactly the file format llama.cpp reads; the span's error is
then carried to the later spans (W[:, >s] -= (E U_ss^-1) U_s,>s). Inside a span the block
quantizer's own scale search does the work, so this is GPTQ's update between blocks, not within
them (the block's scales are chosen from all its columns at once).
"""

from __future__ import annotations

import numpy as np
import torch

from .blocks import dequantize, quantize, type_info


def inverse_cholesky(h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, float64 (cols, cols).

    Columns that never saw a non-zero input (diag 0) get a unit diagonal: their weights do not
    matter to the output and take no error.
    """
    h = torch.from_numpy(np.array(h, dtype=np.float64))
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    lower = torch.linalg.cholesky(h)
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True).numpy()


def gptq_quantize(w: np.ndarray, qtype, hessian: np.ndarray, importance: np.ndarray | None = None,
                  damp: float = 0.01) -> np.ndarray:
    """GGUF bytes of `w (rows, cols)` in `qtype`, rounded span by span with error compensation.

    Args:
        w: the weights, rows of `cols` (a multiple of the type's block size).
        qtype: the GGUF block type.
        hessian: `(cols, cols)` sum of x x^T over the calibration inputs of this matrix.
        importance: optional `(cols,)` for the K-quant scale searches (diag H / tokens).
        damp: dampening, a fraction of the mean diagonal (GPTQ's 1%).

    Returns:
        uint8 `(rows, row_bytes)`: the same layout `blocks.quantize` returns.
    """
    info = type_info(qtype)
    span = info.block_size
    rows, cols = w.shape
    u = inverse_cholesky(hessian, damp)
    work = np.array(w, dtype=np.float64)
    out = []
    for s in range(0, cols, span):
        e = slice(s, s + span)
        imp = None if importance is None else importance[e]
        data = quantize(work[:, e].astype(np.float32), qtype, imp)
        out.append(data)
        if s + span < cols:
            err = work[:, e] - dequantize(data, qtype, (rows, span))
            # E U_ss^-1, with U_ss upper triangular: solve X U_ss = E
            scaled = np.linalg.solve(u[e, e].T, err.T).T
            work[:, s + span:] -= scaled @ u[e, s + span:]
    return np.concatenate(out, axis=1)
