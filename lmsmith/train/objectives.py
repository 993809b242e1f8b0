"""Objectives: functions from (model, batch) to a loss.

The contract every objective follows (pretraining, SFT, DPO, distillation):

    objective(model, batch) -> (loss_sum, metrics, n)

`loss_sum` is a scalar tensor: the SUM of the per-item losses over the batch
(per target token for language modelling, per pair for DPO). `n` is how many
items that sum covers (an int). `metrics` is a dict of extra floats to log.
The loop backpropagates `loss_sum` of every micro-batch and divides the
gradients by the total `n` of the accumulated step, so a token in a short
micro-batch weighs the same as a token in a long one (not a mean of means).

Batches are dicts: `input_ids` (B, T) and `labels` (B, T), where `labels[b, t]`
is the target of position t, already shifted (the token that follows
`input_ids[b, t]`), and -100 marks positions that carry no loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_objective(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
    """Next-token cross-entropy summed over the targets (labels != -100).

    Only rows with a target go through the LM head, so SFT batches whose prompts
    are masked pay for the head on answer tokens only. The head and the loss are
    fused (`linear_cross_entropy`): chunked, the softmax and loss in fp32 even
    under bf16 autocast (logits of a large vocabulary lose too much precision in bf16).
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    h = model.hidden_states(input_ids, attention_mask=batch.get("attention_mask"))  # (B, T, D)
    labels = labels.reshape(-1)
    h = h.reshape(-1, h.shape[-1])
    keep = labels != IGNORE_INDEX
    n = int(keep.sum())
    if n != labels.numel():
        h, labels = h[keep], labels[keep]  # (N, D), (N,)
    head = model.lm_head
    # A wrapper may patch rows of the head (prompt tuning's trained token rows): it says so by output_weight().
    weight = model.output_weight() if hasattr(model, "output_weight") else None
    if weight is None and type(head) is torch.nn.Linear and head.bias is None:
        weight = head.weight
    if weight is not None:
        loss_sum = linear_cross_entropy(h, weight, labels)
    else:  # a wrapped head (LoRA, quantized): go through its forward
        loss_sum = F.cross_entropy(head(h).float(), labels, reduction="sum")
    return loss_sum, {}, n


causal_lm_objective.perplexity = True  # its loss is a per-token NLL: exp(loss) is a perplexity


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
