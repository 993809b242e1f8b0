"""Loss parallelism: the cross-entropy of logits split by vocabulary over the tensor-parallel ranks.

Under `--tp` the LM head is split by vocabulary columns, so each rank computes the logits of its
V/tp tokens only. Gathering them (what a plain head does) costs each rank the whole (N, V) logits
and an all-gather of them; here each rank keeps its slice and three all-reduces of N numbers each
(the row max, the row sum of exponentials, the target's logit) give every rank the exact loss
(Megatron's vocab-parallel cross-entropy). The gradient, softmax - onehot, is then local too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def vocab_sharded(logits) -> tuple[torch.Tensor, object]:
    """(this rank's logits (..., V_local), a cross_entropy for them) of a DTensor sharded on its last dim.

    The returned `cross_entropy(rows (N, V_local), targets (N,) global ids, reduction="sum"|"none")`
    has F.cross_entropy's meaning for the whole vocabulary.
    """
    mesh = logits.device_mesh
    vocab = logits.shape[-1]
    chunk = -(-vocab // mesh.size())  # DTensor's Shard: torch.chunk sizes, the last ranks may hold less
    start = mesh.get_local_rank() * chunk
    group = mesh.get_group()

    def cross_entropy(rows: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        losses = _VocabParallelCrossEntropy.apply(rows.float(), targets, start, group)
        return losses.sum() if reduction == "sum" else losses

    return logits.to_local(), cross_entropy


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row losses (N,) of local logits (N, V_local) that hold global columns [start, start + V_local)."""

    @staticmethod
    def forward(ctx, logits, targets, start, group):
        n, width = logits.shape
        m = logits.amax(dim=-1) if width else logits.new_full((n,), float("-inf"))
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = (logits - m[:, None]).exp_()  # (N, V_local)
        s = e.sum(dim=-1)
        dist.all_reduce(s, group=group)
        local = targets - start
        mine = (local >= 0) & (local < width)  # rows whose target column this rank holds
        local = local.clamp(0, max(width - 1, 0))
        target_logit = torch.where(mine, logits.gather(1, local[:, None]).squeeze(1), 0.0) if width else m * 0
        dist.all_reduce(target_logit, group=group)
        ctx.save_for_backward(e.div_(s[:, None]), local, mine)  # the softmax over the whole vocabulary
        return s.log() + m - target_logit

    @staticmethod
    def backward(ctx, grad):
        p, local, mine = ctx.saved_tensors
        rows = torch.arange(p.shape[0], device=p.device)[mine]
        p[rows, local[mine]] -= 1.0  # d loss / d logits = softmax - onehot (the onehot where this rank holds it)
        return p.mul_(grad[:, None]), None, None, None
