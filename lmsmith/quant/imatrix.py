"""Importance matrices: how much each input column of each weight matrix matters, measured on text.

The importance of column j of a linear layer is the mean of x_j^2 over the calibration tokens
(x: the layer's input), as llama.cpp's `llama-imatrix` measures it: a weight that multiplies
large activations contributes more to the output, so its rounding error costs more. The K-quant
scale searches take these values as weights (`blocks.quantize(..., importance=)`).

- `collect(model, token_chunks)`: run the model (no gradients) and accumulate per layer.
- `save(stats, path)` / `load(path)`: llama.cpp's imatrix files. `save` writes the GGUF format
  llama.cpp writes since 2025 (`<tensor>.in_sum2`, `<tensor>.counts`, `general.type = imatrix`);
  `load` reads that and the legacy `.dat` format, every length checked against the file size.

Names are GGUF tensor names (`blk.0.attn_q.weight`), so files move between lmsmith and llama.cpp.
A tied head is recorded under `token_embd.weight`, as llama.cpp's graph names that matmul.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LmsmithError
from ..fileio import atomic_path, check_regular_file


@dataclass
class Stats:
    """Sum of squared inputs per column `(cols,)` float64 and the number of token rows seen;
    with `collect(..., hessians=True)` also the full second moments `hessian = sum x x^T` (GPTQ)."""

    sum2: np.ndarray
    count: int
    hessian: np.ndarray | None = None

    @property
    def importance(self) -> np.ndarray:
        """Mean squared activation per column (float32): what the quantizer weights by. Computed from
        the float32 sums a file stores, so a saved and reloaded matrix quantizes identically."""
        return self.sum2.astype(np.float32) / np.float32(max(self.count, 1))


def _gguf_names(model: nn.Module) -> dict[str, str]:
    """{module name: GGUF weight name} for every linear layer the head included."""
    from .gguf import gguf_name
    from .linear import QuantLinear

    tied = getattr(model.config, "tie_embeddings", False)
    names = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, QuantLinear)):
            names[name] = "token_embd.weight" if name == "lm_head" and tied else gguf_name(f"{name}.weight")
    return names


@torch.no_grad()
def collect(model: nn.Module, token_chunks: Iterable[list[int]], progress=None,
            hessians: bool = False) -> dict[str, Stats]:
    """Importance statistics of every linear layer of `model` over `token_chunks` (lists of ids,
    each run as one sequence from position 0, as llama-imatrix runs its chunks).

    Returns `{GGUF tensor name: Stats}`. `progress(n_tokens)` is called after each chunk.
    `hessians`: also accumulate `sum x x^T` per matrix, float64 (cols x cols each: for GPTQ;
    memory grows with the square of the widths).
    """
    names = _gguf_names(model)
    stats: dict[str, Stats] = {}
    # q/k/v (and gate/up) read the same input tensor: its sums are computed once. The cache holds
    # the tensor itself, so its memory cannot be reused by another input while it is compared.
    last: list = [None, None, None]  # input, sum of squares, x^T x

    def moments(inp: torch.Tensor):
        if last[0] is not inp:
            x = inp.detach().float().reshape(-1, inp.shape[-1])
            h = (x.double().T @ x.double()).numpy() if hessians else None
            last[:] = [inp, (x * x).sum(dim=0).double().numpy(), h]
        return last[1], last[2]

    def hook(module, args, name=None):
        sum2, h = moments(args[0])
        s = stats.get(name)
        if s is None:
            s = stats[name] = Stats(np.zeros(sum2.shape[0], np.float64), 0)
        s.sum2 += sum2
        s.count += args[0].numel() // args[0].shape[-1]
        if h is not None:
            s.hessian = h.copy() if s.hessian is None else s.hessian + h

    handles = [model.get_submodule(m).register_forward_pre_hook(lambda mod, a, n=g: hook(mod, a, n))
               for m, g in names.items()]
    was_training = model.training
    model.eval()
    try:
        for chunk in token_chunks:
            model(torch.tensor([chunk], device=next(model.parameters()).device))
            if progress:
                progress(len(chunk))
    finally:
        for h in handles:
            h.remove()
        last.clear()
        model.train(was_training)
    if not stats:
        raise LmsmithError("no calibration tokens reached the model; give more calibration text")
    return stats


def save(stats: dict[str, Stats], path: str | os.PathLike, *, datasets: list[str] | None = None,
         chunk_size: int = 0, chunk_count: int = 0) -> Path:
    """Write `stats` as a llama.cpp imatrix GGUF file (atomically); llama-quantize --imatrix reads it."""
    from .gguf import _gguf

    gguf = _gguf()
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="imatrix")
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", list(datasets or []))
        w.add_uint32("imatrix.chunk_count", int(chunk_count))
        w.add_uint32("imatrix.chunk_size", int(chunk_size))
        for name in sorted(stats):
            s = stats[name]
            w.add_tensor(f"{name}.in_sum2", s.sum2.astype(np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[float(s.count)]], np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """`{GGUF tensor name: importance (cols,) float32}` from a llama.cpp imatrix file (GGUF or legacy .dat)."""
    path = Path(path)
    check_regular_file(path, "imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)


def _load_gguf(path: Path) -> dict[str, np.ndarray]:
    from .gguf import read_gguf

    reader = read_gguf(path)
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = np.asarray(t.data, np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = np.asarray(t.data, np.float32).reshape(-1)
    if not sums or set(sums) != set(counts):
        raise LmsmithError(f"{path}: not an imatrix file (needs <tensor>.in_sum2 and <tensor>.counts pairs)")
    out = {}
    for name, s in sums.items():
        c = counts[name]
        if c.size != 1:
            raise LmsmithError(f"{path}: {name} has {c.size} counts; lmsmith's models are dense (one matrix each)")
        out[name] = s / np.float32(max(float(c[0]), 1.0))
    return out


def _load_legacy(path: Path) -> dict[str, np.ndarray]:
    """The .dat format: int32 n; per entry int32 name length, name, int32 ncall, int32 nval, float32[nval]."""
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise LmsmithError(f"{path}: truncated or corrupt imatrix file ({what} at byte {pos} runs past the "
                               f"end, {len(data)} bytes)")
        pos += n
        return data[pos - n:pos]

    (n_entries,) = struct.unpack("<i", take(4, "entry count"))
    if n_entries < 1:
        raise LmsmithError(f"{path}: an imatrix file with {n_entries} entries")
    out = {}
    for i in range(n_entries):
        (length,) = struct.unpack("<i", take(4, f"entry {i} name length"))
        name = take(length, f"entry {i} name").decode("utf-8", "replace")
        ncall, nval = struct.unpack("<ii", take(8, f"entry {i} counts"))
        values = np.frombuffer(take(4 * nval, f"entry {i} values"), np.float32)
        out[name] = (values / max(ncall, 1)).astype(np.float32)
    return out


def for_tensor(imatrix: dict[str, np.ndarray] | None, name: str, cols: int, path: str = "imatrix") -> np.ndarray | None:
    """The importance vector of GGUF tensor `name` (None if the imatrix has none), checked to hold `cols` values."""
    if imatrix is None or name not in imatrix:
        return None
    v = imatrix[name]
    if v.shape != (cols,):
        raise LmsmithError(f"{path}: {name} has {v.size} importance values but the tensor's rows are {cols} long; "
                           "the imatrix was measured on another model")
    return v
