"""Perplexity and bits per byte on held-out text, with a sliding window.

Texts longer than the context are scored in windows of `seq_len` tokens that
advance by `stride`: every token is predicted exactly once, from at least
`seq_len - stride` tokens of context (except at the start of the text).
Bits per byte divides the total negative log-likelihood by the UTF-8 bytes of
the text, so models with different tokenizers can be compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..precision import autocast


@dataclass
class PerplexityResult:
    loss: float  # mean negative log-likelihood per token, nats
    perplexity: float
    bits_per_byte: float
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the texts scored
    texts: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def sliding_windows(n: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Windows over a sequence of n ids in which ids[1:] are the targets.

    Yields (begin, end, first): the window's inputs are ids[begin:end], its targets
    ids[begin+1:end+1], and only targets with index >= `first` are scored, so each
    target is scored once, by the first window that reaches it.
    """
    if n < 2:
        return
    next_target = 1
    begin = 0
    while True:
        end = min(begin + seq_len, n - 1)
        yield begin, end, next_target
        next_target = end + 1
        if end >= n - 1:
            return
        begin += stride


def _score_windows(ids: list[int], seq_len: int, stride: int) -> Iterator[tuple[list[int], list[int], int]]:
    for begin, end, first in sliding_windows(len(ids), seq_len, stride):
        inputs = ids[begin:end]
        targets = ids[begin + 1 : end + 1]
        skip = first - (begin + 1)  # targets before this were scored already
        yield inputs, targets, skip


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    texts: Iterable[str],
    *,
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    dtype_policy: str = "fp32",
    prefix_id: int | None = None,
) -> PerplexityResult:
    """Perplexity and bits per byte of `model` on `texts`.

    Args:
        seq_len: window length in tokens (default: the model's context).
        stride: how far each window advances (default: seq_len // 2); smaller
            strides give each token more context and cost more compute.
        prefix_id: token put before each text so its first token is predicted
            too (default: the tokenizer's bos if it adds one, else eos, which is
            the document separator lmsmith pretrains with).
    """
    cfg = model.config
    seq_len = min(seq_len or cfg.max_seq_len, cfg.max_seq_len)
    stride = stride or max(1, seq_len // 2)
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    if prefix_id is None:
        prefix_id = tokenizer.bos_id if getattr(tokenizer, "add_bos", False) else tokenizer.eos_id
    device = next(model.parameters()).device

    total_nll, total_tokens, total_bytes, n_texts = 0.0, 0, 0, 0
    pending: list[tuple[list[int], list[int], int]] = []

    def flush() -> None:
        nonlocal total_nll, total_tokens
        width = max(len(p[0]) for p in pending)
        inp = torch.zeros(len(pending), width, dtype=torch.long)
        tgt = torch.full((len(pending), width), -100, dtype=torch.long)
        for row, (inputs, targets, skip) in enumerate(pending):
            inp[row, : len(inputs)] = torch.tensor(inputs)
            tgt[row, skip : len(targets)] = torch.tensor(targets[skip:])
        inp, tgt = inp.to(device), tgt.to(device)
        # Right padding needs no mask: causal attention never lets real tokens see it.
        with autocast(dtype_policy, device):
            logits = model(inp)
        nll = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((tgt != -100).sum())
        pending.clear()

    model.eval()
    for text in texts:
        n_texts += 1
        total_bytes += len(text.encode("utf-8"))
        ids = ([prefix_id] if prefix_id is not None else []) + tokenizer.encode(text)
        for window in _score_windows(ids, seq_len, stride):
            pending.append(window)
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    if total_tokens == 0:
        raise ValueError("nothing to score: the texts are empty")
    loss = total_nll / total_tokens
    return PerplexityResult(
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=total_nll / math.log(2) / max(total_bytes, 1),
        tokens=total_tokens,
        bytes=total_bytes,
        texts=n_texts,
    )
