"""Throughput and error of lmsmith's GGUF block quantizers on one 4096x4096 matrix.

    python bench/quantize_blocks.py [--rows 4096] [--cols 4096]

For every type: quantize and dequantize speed in MB/s of float32 input, relative
RMSE on Gaussian weights, and, where the `gguf` package has a quantizer for the
type, its speed and whether its bytes equal ours. The K-quants have no quantizer
in `gguf`, so for them the table shows a plain min/max quantizer's RMSE (same
sub-block sizes, unquantized scales) as the bar the scale search must clear.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lmsmith.quant import QType, dequantize, quantize, type_info

TYPES = [QType.Q8_0, QType.Q6_K, QType.Q5_K, QType.Q5_1, QType.Q5_0, QType.Q4_K, QType.Q4_0, QType.Q3_K]


def _rel_rmse(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - x) ** 2, dtype=np.float64) / np.mean(x.astype(np.float64) ** 2)))


def _minmax(x: np.ndarray, qt: QType) -> np.ndarray:
    if qt in (QType.Q4_K, QType.Q5_K):
        nmax = 15 if qt == QType.Q4_K else 31
        b = x.reshape(-1, 32)
        mn, mx = np.minimum(b.min(1, keepdims=True), 0), b.max(1, keepdims=True)
        d = (mx - mn) / nmax
        return (np.clip(np.rint((b - mn) / d), 0, nmax) * d + mn).reshape(x.shape)
    nmax = 4 if qt == QType.Q3_K else 32
    b = x.reshape(-1, 16)
    d = np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1) / -nmax
    return (np.clip(np.rint(b / d), -nmax, nmax - 1) * d).reshape(x.shape)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)
    mb = x.nbytes / 1e6
    try:
        import gguf
        from gguf import quants as gq
    except ImportError:
        gguf = gq = None

    print(f"{args.rows}x{args.cols} float32 ({mb:.0f} MB), Gaussian weights")
    head = f"{'type':6} {'bpw':>7} {'quant MB/s':>11} {'dequant MB/s':>13} {'rel RMSE':>9}  {'reference':>30}"
    print(head)
    print("-" * len(head))
    for qt in TYPES:
        data, tq = _timed(lambda qt=qt: quantize(x, qt))
        y, td = _timed(lambda qt=qt, data=data: dequantize(data, qt, x.shape))
        ref = ""
        if gq is not None and qt.name in ("Q8_0", "Q4_0", "Q5_0", "Q5_1"):
            g, tg = _timed(lambda qt=qt: gq.quantize(x, gguf.GGMLQuantizationType[qt.name]))
            same = np.array_equal(g.view(np.uint8).reshape(data.shape), data)
            ref = f"gguf {mb / tg:7.1f} MB/s, bytes {'equal' if same else 'DIFFER'}"
        elif qt.name.endswith("_K"):
            ref = f"plain min/max RMSE {_rel_rmse(_minmax(x, qt), x):.3%}"
        print(
            f"{qt.name:6} {type_info(qt).bits_per_weight:7.4f} {mb / tq:11.1f} {mb / td:13.1f} "
            f"{_rel_rmse(y, x):9.3%}  {ref:>30}"
        )


if __name__ == "__main__":
    main()
