"""The packed-matmul kernels (kernels.cpp): built once per machine with the system's C++ compiler.

PyTorch has no kernel that reads GGUF blocks (its int4/int8 weight-only kernels take one scale
per group or per row, and are fast only with bf16 activations), so lmsmith carries one small C++
file: for every output row it unpacks 256 weights at a time in registers or L1, so no dequantized
weight is ever written to memory. Two products (`Product`): by default, on AVX2, activations are
rounded to int8 and blocks multiply in integers, as llama.cpp does (~0.6% relative error); the
exact one multiplies float32 activations with exactly lmsmith's dequantized values (results
differ from dequantize-then-matmul only in the order of float additions).

The library is compiled on first use (`c++ -O3 -march=native -fopenmp`, about 5 seconds) into
`$LMSMITH_CACHE_DIR` (default `~/.cache/lmsmith`; the temporary folder if that is read-only),
keyed by the source, the compiler and the CPU, and written atomically, so concurrent processes
never load a half-written file. It links no torch symbols and reuses the OpenMP runtime torch has
loaded (same soname), so its threads do not compete with torch's. Without a compiler (or with
`LMSMITH_KERNELS=0`) `library()` is None and `QuantLinear` dequantizes in torch instead, with
one warning.

`python -m lmsmith.quant.kernels` builds the library and prints where it is.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from .blocks import QType, type_info

SOURCE = Path(__file__).with_name("kernels.cpp")
INT8_ROWS = 100  # the type code of int8 weights with one scale per row (kernels.cpp's kInt8Rows)
TYPE_CODES = {"int8": INT8_ROWS, **{q.name.lower(): int(q) for q in (
    QType.Q8_0, QType.Q4_0, QType.Q5_0, QType.Q5_1, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)}}
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC"]

_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    """Where built kernels live: $LMSMITH_CACHE_DIR, else $XDG_CACHE_HOME/lmsmith, else ~/.cache/lmsmith."""
    if os.environ.get("LMSMITH_CACHE_DIR"):
        return Path(os.environ["LMSMITH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmsmith"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_key() -> str:
    """The CPU's feature flags (-march=native builds for them), or the machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _build(cxx: str, out: Path) -> None:
    """Compile kernels.cpp to `out` atomically (OpenMP if the compiler has it, else single-threaded)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        err = ""
        for extra in (["-fopenmp"], []):
            r = subprocess.run([cxx, *FLAGS, *extra, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if r.returncode == 0:
                os.replace(tmp, out)
                return
            err = r.stderr.strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"{cxx} failed: {err[0]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.lmsmith_packed_matmul, lib.lmsmith_packed_matmul_int8):
        fn.argtypes, fn.restype = [ctypes.c_int, ptr, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int], ctypes.c_int
    lib.lmsmith_dequantize_rows.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.lmsmith_dequantize_rows.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None (one warning) if it cannot be built."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("LMSMITH_KERNELS", "1") == "0":
        return None
    cxx = _compiler()
    if cxx is None:
        warnings.warn("no C++ compiler found (set CXX): packed quantized layers dequantize in torch, several "
                      "times slower; install g++ or clang++ for the packed-matmul kernels", stacklevel=2)
        return None
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, " ".join(FLAGS), _cpu_key()]).encode())
    name = f"kernels-{key.hexdigest()[:16]}.so"
    user = os.getuid() if hasattr(os, "getuid") else 0
    try:
        for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"lmsmith-{user}"):
            path = folder / name
            if path.exists():
                break
            print(f"lmsmith: building the packed-matmul kernels (once per machine) into {folder}",
                  file=sys.stderr, flush=True)
            try:
                _build(cxx, path)
                break
            except PermissionError:  # a read-only home: build in the temporary folder instead
                continue
        _lib = _load(path)
    except (OSError, RuntimeError) as e:
        warnings.warn(f"could not build lmsmith's packed-matmul kernels ({e}); packed quantized layers "
                      "dequantize in torch instead, several times slower", stacklevel=2)
        _lib = None
    return _lib


def _check(fmt: str, qweight: torch.Tensor, scales: torch.Tensor | None, n: int, k: int) -> int:
    """The type code, after checking that qweight holds exactly n rows of k weights of `fmt`."""
    code = TYPE_CODES[fmt]
    row = k if fmt == "int8" else type_info(QType[fmt.upper()]).row_bytes(k)
    if qweight.dtype not in (torch.uint8, torch.int8) or not qweight.is_contiguous() or \
            qweight.numel() != n * row or qweight.device.type != "cpu":
        raise ValueError(f"packed weight must be a contiguous CPU byte tensor of {n} x {row} bytes, "
                         f"got {qweight.dtype} {tuple(qweight.shape)} on {qweight.device}")
    if (scales is None) != (fmt != "int8") or (scales is not None and (
            scales.dtype != torch.float32 or scales.numel() != n or not scales.is_contiguous())):
        raise ValueError("int8 weights need float32 scales, one per row; block formats take none")
    return code


class Product:
    """`x (M, K) @ W.T -> (M, n)` float32 for one packed weight, checked once (`library()` must exist).

    By default x is rounded to int8 (one scale per 256 values for K-quants, per 32 for Q8_0 / int8)
    and blocks multiply in integers, as llama.cpp does: about 2.5x faster on AVX2, with a relative
    error of about 0.6% per product. `exact=True` (and types or CPUs without that path: Q4_0, Q5_0,
    Q5_1, no AVX2) multiplies float32 x with the dequantized weights: equal to dequantize-then-matmul
    up to float rounding. Holds references to the weight, so the pointers stay valid.
    """

    def __init__(self, fmt: str, qweight: torch.Tensor, scales: torch.Tensor | None, n: int, k: int):
        self.code, self.n, self.k = _check(fmt, qweight, scales, n, k), n, k
        self.fmt, self.qweight, self.scales = fmt, qweight, scales
        self.ptrs = (qweight.data_ptr(), scales.data_ptr() if scales is not None else None)

    def __call__(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """x (..., K) -> (..., n) float32 (this runs once per layer and token: kept lean)."""
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        k = x.shape[-1]
        if k != self.k:
            raise ValueError(f"input has {k} features, the weight {self.k}")
        y = torch.empty(*x.shape[:-1], self.n, dtype=torch.float32)
        m = x.numel() // k
        args = (self.code, *self.ptrs, self.n, k, x.data_ptr(), m, y.data_ptr(), torch.get_num_threads())
        if (exact or _lib.lmsmith_packed_matmul_int8(*args)) and _lib.lmsmith_packed_matmul(*args):
            raise ValueError(f"{self.fmt} rows of {k} weights are not whole blocks")
        return y


def dequantize(fmt: str, qweight: torch.Tensor, scales: torch.Tensor | None, n: int, k: int) -> torch.Tensor:
    """The `n` packed rows as float32 `(n, k)` (`library()` must exist)."""
    code = _check(fmt, qweight, scales, n, k)
    out = torch.empty(n, k, dtype=torch.float32)
    rc = _lib.lmsmith_dequantize_rows(code, qweight.data_ptr(), scales.data_ptr() if scales is not None else None,
                                      n, k, out.data_ptr(), torch.get_num_threads())
    if rc:
        raise ValueError(f"{fmt} rows of {k} weights are not whole blocks")
    return out


if __name__ == "__main__":
    lib = library()
    print(f"packed-matmul kernels: {lib._name if lib else 'not available (see the warning above)'}")
