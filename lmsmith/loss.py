"""Next-token losses computed from hidden states, below the model (so `forward(labels=...)` can use them).

The model's `forward(input_ids, labels=labels)` returns the loss itself, so every objective goes through
`forward`: wrappers that only intercept `forward` (DDP, FSDP2's root all-gather, pipeline stages)
see the whole computation. `labels[b, t]` is the target of position t, already shifted; -100 marks
positions without a loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def target_loss(h: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                weight: torch.Tensor | None = None, reduction: str = "sum",
                cross_entropy: Callable[..., torch.Tensor] = F.cross_entropy) -> torch.Tensor:
    """Cross-entropy of the LM head's logits against `labels`, only on positions with a target.

    Args:
        h: (B, T, D) final hidden states; labels: (B, T) targets, -100 where ignored; or an object with
            `loss(h, head, weight) -> scalar` (distillation's `DistillTargets`), which then computes the loss.
        head: maps (N, D) hidden states to (N, V) logits (the model's LM head, or a wrapper's).
        weight: the head's plain (V, D) matrix when it has one: the loss is then fused and chunked
            (`linear_cross_entropy`), so the (N, V) logits never exist at once.
        reduction: "sum" -> a scalar, the summed loss; "none" -> (B, T) per-token losses, 0 where ignored.
        cross_entropy: F.cross_entropy's signature; tensor parallelism gives one for logits split by
            vocabulary (`distributed.loss_parallel`).

    Only rows with a target go through the head (SFT prompts cost no head matmul); the softmax is fp32.
    """
    if not isinstance(labels, torch.Tensor):  # a loss target that computes itself from the hidden states
        if reduction != "sum":
            raise ValueError(f"{type(labels).__name__} gives a summed loss only, not reduction={reduction!r}")
        return labels.loss(h, head, weight)
    keep = labels != IGNORE_INDEX  # (B, T)
    hk, targets = h[keep], labels[keep]  # (N, D), (N,)
    if reduction == "sum":
        if weight is not None:
            return linear_cross_entropy(hk, weight, targets)
        return cross_entropy(head(hk).float(), targets, reduction="sum")
    if reduction != "none":
        raise ValueError(f"reduction {reduction!r}: choose 'sum' or 'none'")
    per_token = cross_entropy(head(hk).float(), targets, reduction="none")  # (N,)
    out = torch.zeros(labels.shape, dtype=per_token.dtype, device=per_token.device)
    return out.masked_scatter(keep, per_token)


def plain_head_weight(head) -> torch.Tensor | None:
    """The (V, D) weight of a bias-free `nn.Linear` head held as a plain tensor (fusable), else None
    (LoRA, quantized or tensor-parallel heads go through their own forward)."""
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    w = head.weight
    return w if type(w) in (torch.Tensor, torch.nn.Parameter) else None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """sum_i CE(h_i @ weight.T, targets_i) without materialising all logits or their softmax twice.

    Args:
        h: (N, D) hidden states; weight: (V, D) LM head; targets: (N,) ids (no -100 here).
        chunk_rows: rows per chunk (default: about 4M logits, 16 MB of fp32, which stays in cache).

    With autograd on, the gradient is computed during the forward, chunk by chunk
    (softmax - onehot, then the two head matmuls), so the (N, V) logits never live
    past their chunk and there is no separate log-softmax backward. Matmuls run in
    the autocast dtype (as `nn.Linear` would); the softmax and loss in fp32.
    """
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    if chunk_rows is None:
        chunk_rows = max(1, (1 << 22) // weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk_rows, dtype)
    with torch.autocast(h.device.type, enabled=False):
        w = weight.to(dtype)
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], chunk_rows):
            logits = (h[s:s + chunk_rows].to(dtype) @ w.t()).float()
            total += F.cross_entropy(logits, targets[s:s + chunk_rows], reduction="sum")
        return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, dtype):
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            grad_h = torch.empty_like(h) if h.requires_grad else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.shape[0], chunk_rows):
                hc = h[s:s + chunk_rows].to(dtype)  # (n, D)
                t = targets[s:s + chunk_rows]
                logits = (hc @ w.t()).float()  # (n, V)
                # One exp pass serves both the loss (log of the row sums) and the gradient.
                m = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                target_logit = logits.gather(1, t[:, None]).squeeze(1)  # (n,)
                p = logits.sub_(m).exp_()
                row_sum = p.sum(dim=-1)  # (n,)
                total += (m.squeeze(1) + row_sum.log() - target_logit).sum()
                # d(sum CE)/d logits = softmax - onehot, built in place over the logits.
                p.mul_(row_sum.reciprocal()[:, None])
                p[torch.arange(p.shape[0], device=p.device), t] -= 1.0
                p = p.to(dtype)
                if grad_h is not None:
                    grad_h[s:s + chunk_rows] = p @ w
                if grad_w is not None:
                    grad_w += (p.t() @ hc).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None
