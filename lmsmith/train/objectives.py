"""Objectives: functions from (model, batch) to a loss.

The contract every objective follows (pretraining, SFT, DPO, distillation):

    objective(model, batch) -> (loss_sum, metrics, n)

`loss_sum` is a scalar tensor: the SUM of the per-item losses over the batch
(per target token for language modelling, per pair for DPO). `n` is how many
items that sum covers (an int). `metrics` is a dict of extra floats to log.
The loop backpropagates `loss_sum` of every micro-batch and divides the
gradients by the total `n` of the accumulated step (over every data-parallel
rank), so a token in a short micro-batch weighs the same as a token in a long
one (not a mean of means).

Objectives only call the model (`model(ids, labels=labels)` returns the loss):
they never reach into its modules, so a DDP / FSDP / pipeline wrapper sees the
whole computation.

Batches are dicts: `input_ids` (B, T) and `labels` (B, T), where `labels[b, t]`
is the target of position t, already shifted (the token that follows
`input_ids[b, t]`), and -100 marks positions that carry no loss.
"""

from __future__ import annotations

import torch

from ..loss import IGNORE_INDEX, linear_cross_entropy

__all__ = ["IGNORE_INDEX", "causal_lm_objective", "linear_cross_entropy"]


def causal_lm_objective(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
    """Next-token cross-entropy summed over the targets (labels != -100), through `model(..., labels=)`.

    The model computes it fused and chunked (`loss.linear_cross_entropy`), the softmax in fp32 even
    under bf16 autocast, and only on rows with a target; wrappers (prompt tuning, LoRA heads) do the same
    through their own head.
    """
    labels = batch["labels"]
    loss_sum = model(batch["input_ids"], labels=labels, attention_mask=batch.get("attention_mask"))
    return loss_sum, {}, int((labels != IGNORE_INDEX).sum())


causal_lm_objective.perplexity = True  # its loss is a per-token NLL: exp(loss) is a perplexity
