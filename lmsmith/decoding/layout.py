"""Fast CPU decoding: weights stored column-major and read by all cores at once.

Decoding a token is a chain of matrix-vector products y = W x, each reading a
whole weight matrix W (out, in) from memory, so its speed is the speed at which
the matmul kernel streams W. Two things hold MKL back on CPU, measured on this
project's 2-core machine (bench/generate_speed.py):

- PyTorch stores W row-major, so `F.linear` asks for x @ W^T with a transposed
  operand; that kernel streams ~16 GB/s. Stored column-major (a (out, in) view of
  a contiguous (in, out) tensor) the same call is x @ W_t, ~22 GB/s.
- A matrix-vector product runs on one core whatever the thread count. Splitting
  the input dimension into one slice per thread turns it into a batched matmul
  (B = threads) that MKL does spread over the cores, then a sum of the partial
  results: ~36 GB/s, near what a plain read of memory reaches.

Both hold for fp32 weights only: MKL's bf16 and fp16 matrix-vector kernels are
fastest on the row-major default (column-major is 1.3x slower in bf16 and 30x
in fp16), so half-precision weights are left alone.

`use_decode_layout(model)` does both for every fp32 `nn.Linear` of at least `MIN_WEIGHTS`
weights (smaller ones are faster as they are): the values, shapes,
names and `state_dict()` stay exactly the same (the checkpoint writer makes each
tensor contiguous), so anything that reads the model still works. The split
path only runs without autograd, on CPU, for a few rows at a time (decoding);
prefill and training take the ordinary `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows (batch x new tokens) up to which the split matmul beats F.linear; prefill is far above it.
SPLIT_MAX_ROWS = 16
# Smaller matrices (under 1 MB of fp32) stay as they are: they sit in the caches, the product is not bound
# by reading them, and the split costs more than it saves (192 x 512: 8.2 us plain, 11.3 us split;
# 512 x 512 is even; 768 x 2304: 101 against 70 us; AVX512-BF16 EPYC, 2 threads).
MIN_WEIGHTS = 1 << 18


def is_column_major(w: torch.Tensor) -> bool:
    return w.dim() == 2 and w.stride() == (1, w.shape[0])


class DecodeLinear(nn.Linear):
    """An `nn.Linear` whose few-row products on CPU split the input dimension across threads.

    y = sum_s x[:, slice_s] @ W_t[slice_s, :] (+ bias), the slices one batched matmul; equal to
    F.linear up to float rounding of the summation order.
    """

    splits: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // self.in_features
        if (self.splits > 1 and rows <= SPLIT_MAX_ROWS and x.is_cpu and not torch.is_grad_enabled()
                and x.dtype == w.dtype and not torch.is_autocast_enabled("cpu") and is_column_major(w)):
            s = self.splits
            parts = torch.bmm(x.reshape(rows, s, -1).transpose(0, 1), w.t().view(s, -1, self.out_features))
            y = parts.sum(0)  # (rows, out)
            if self.bias is not None:
                y += self.bias
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)


def _splits(in_features: int, threads: int) -> int:
    s = threads
    while s > 1 and in_features % s:
        s -= 1
    return s


@torch.no_grad()
def use_decode_layout(model: nn.Module, threads: int | None = None, min_weights: int = MIN_WEIGHTS) -> nn.Module:
    """Make every CPU fp32 `nn.Linear` of `model` a column-major `DecodeLinear`, in place; returns `model`.

    One matrix is copied at a time, so the extra memory is the largest single matrix.
    Call it on a model used for inference, after attaching any adapter (the generate,
    chat, probs and eval verbs do); the model then trains as before, only decoding is faster.

    Args:
        threads: slices per matmul; default `torch.get_num_threads()`.
        min_weights: matrices with fewer weights are left as they are (see `MIN_WEIGHTS`).
    """
    threads = threads or torch.get_num_threads()
    seen: set[int] = set()
    for module in model.modules():
        if type(module) not in (nn.Linear, DecodeLinear):
            continue
        w = module.weight
        if w.device.type != "cpu" or w.dtype != torch.float32 or w.numel() < min_weights:  # see above
            continue
        if id(w) not in seen and not is_column_major(w):
            # A tied LM head shares this tensor with the embedding, whose row lookups work on any layout.
            w.data = w.data.t().contiguous().t()
        seen.add(id(w))
        module.__class__ = DecodeLinear  # same object, parameters and hooks; only forward changes
        module.splits = _splits(module.in_features, threads)
    return model
