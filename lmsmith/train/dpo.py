"""Fine-tuning objectives: SFT on any (possibly wrapped) model, and DPO.

Both follow the loop's contract `objective(model, batch) -> (loss_sum, metrics, n)`:

- `sft_objective`: next-token cross-entropy over the response tokens (labels != -100),
  summed; n = target tokens. Plain models go through the fused `causal_lm_objective`;
  wrapped ones (prompt tuning) through their forward's logits.
- `dpo_objective(beta, ...)`: Direct Preference Optimisation (Rafailov et al., 2023),

      loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

  where pi_* / ref_* are the policy's / frozen reference's log-probabilities of the
  chosen / rejected response, summed over the response tokens. n = pairs.
  Metrics: reward_margin (mean of beta*((pi_c-ref_c)-(pi_r-ref_r))), reward_accuracy
  (fraction of pairs whose chosen reward beats the rejected one), chosen_reward, rejected_reward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .objectives import IGNORE_INDEX, causal_lm_objective


def sft_objective(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
    """Cross-entropy summed over response tokens; batch {"input_ids": (B, T), "labels": (B, T)}.

    The same computation as pretraining's: every model (plain or wrapped) takes `labels` in its forward."""
    return causal_lm_objective(model, batch)


sft_objective.perplexity = True  # per-token NLL of the responses


def sequence_logprobs(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over positions with labels != -100 of log p(labels[b, t] | input_ids[b, :t+1]).

    Args:
        input_ids: (B, T) token ids; labels: (B, T) shifted targets, -100 where ignored.

    Returns:
        (B,) fp32 summed log-probabilities. Only the response rows go through the LM head (the
        prompt's logits are never built), with the log-softmax in fp32.
    """
    return -model(input_ids, labels=labels, reduction="none").sum(dim=1)


def _pair_batch(batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Chosen and rejected stacked into one (2B, T) batch, right-padded to a common width."""
    c_ids, c_lab, r_ids, r_lab = (batch[k] for k in ("chosen_ids", "chosen_labels", "rejected_ids",
                                                     "rejected_labels"))
    width = max(c_ids.shape[1], r_ids.shape[1])

    def pad(t, fill):
        return F.pad(t, (0, width - t.shape[1]), value=fill)

    pad_id = int(c_ids[0, -1]) if c_ids.numel() else 0  # padding id is irrelevant: padded labels are -100
    ids = torch.cat([pad(c_ids, pad_id), pad(r_ids, pad_id)])
    labels = torch.cat([pad(c_lab, IGNORE_INDEX), pad(r_lab, IGNORE_INDEX)])
    return ids, labels, c_ids.shape[0]


def dpo_objective(beta: float = 0.1, reference: torch.nn.Module | None = None,
                  reference_context: Callable[[torch.nn.Module], contextlib.AbstractContextManager] | None = None
                  ) -> Callable:
    """The DPO objective for batches {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}.

    The reference is either a separate frozen model (`reference`, e.g. a copy for full
    fine-tuning) or the policy itself inside `reference_context(model)` (e.g. LoRA's
    `lora_disabled`, so no second model is held in memory). Reference log-probs are computed
    without gradient.
    """
    if (reference is None) == (reference_context is None):
        raise ValueError("give exactly one of reference (a frozen model) or reference_context")
    if not beta > 0:
        raise ValueError(f"beta {beta} must be > 0")

    def objective(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
        ids, labels, B = _pair_batch(batch)
        pi = sequence_logprobs(model, ids, labels)  # (2B,)
        with torch.no_grad():
            if reference is not None:
                ref = sequence_logprobs(reference, ids, labels)
            else:
                with reference_context(model):
                    ref = sequence_logprobs(model, ids, labels)
        chosen = beta * (pi[:B] - ref[:B])  # implicit rewards, (B,)
        rejected = beta * (pi[B:] - ref[B:])
        margin = chosen - rejected
        loss = -F.logsigmoid(margin).sum()
        m = margin.detach()
        metrics = {"reward_margin": float(m.mean()), "reward_accuracy": float((m > 0).float().mean()),
                   "chosen_reward": float(chosen.detach().mean()), "rejected_reward": float(rejected.detach().mean())}
        return loss, metrics, B

    return objective
