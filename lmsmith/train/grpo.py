"""The online RL objective (GRPO / RLOO / REINFORCE) on rollout batches.

For a group of G responses to one prompt with rewards r_1..r_G, the advantage of response i is

    mean baseline (GRPO):        A_i = r_i - mean(r)
    leave-one-out (RLOO):        A_i = r_i - mean_{j != i} r_j
    none (REINFORCE):            A_i = r_i
    scaled by the group's std:   A_i / (std(r) + 1e-4)            (--scale-rewards group)

and every token t of it carries, with ratio_t = exp(logp_t - old_logp_t) (the policy now over
the policy that sampled),

    loss_t = -min(ratio_t * A_i, clip(ratio_t, 1 - eps, 1 + eps) * A_i) + kl * KL_t
    KL_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1       (k3: unbiased, >= 0)

summed over every response token of the batch and divided by their count (token-level
normalisation: the loop divides by n = response tokens over the whole step). With one update
per rollout old_logp = logp (detached), so the ratio is 1 and its gradient is the policy
gradient A * grad logp.

Batches (`rl.rollout.Rollouts`): "input_ids" (R, T), "labels" (R, T) (response tokens, -100
elsewhere), "advantages" (R,), optionally "old_logp" (R, T), "temperature" (the sampling
temperature: every log-probability is that of logits / temperature, the distribution sampled
from) and "stats" (floats to log).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..loss import IGNORE_INDEX

BASELINES = ("mean", "leave-one-out", "none")
SCALES = ("group", "none")


def group_advantages(rewards: torch.Tensor, baseline: str = "mean", scale: str = "group") -> torch.Tensor:
    """Advantages (P, G) of rewards (P, G): one row per prompt, one column per response."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline {baseline!r}: choose one of {', '.join(BASELINES)}")
    if scale not in SCALES:
        raise ValueError(f"scale {scale!r}: choose one of {', '.join(SCALES)}")
    rewards = rewards.double()
    G = rewards.shape[1]
    if baseline == "mean":
        adv = rewards - rewards.mean(dim=1, keepdim=True)
    elif baseline == "leave-one-out":
        if G < 2:
            raise ValueError("the leave-one-out baseline needs at least 2 responses per prompt")
        adv = rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (G - 1)
    else:
        adv = rewards
    if scale == "group":
        std = rewards.std(dim=1, keepdim=True) if G > 1 else torch.zeros_like(rewards[:, :1])
        adv = adv / (std + 1e-4)
    return adv.float()


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, *, clip_eps: float = 0.2, kl: float = 0.0,
                        ref_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(summed loss over the masked tokens, metrics) of the module docstring's formula.

    Args:
        logp, old_logp, ref_logp: (R, T) log-probabilities of each row's tokens under the policy
            (with gradient), the sampling policy and the reference.
        advantages: (R,) one per response; mask: (R, T) True on response tokens.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    n = mask.sum().clamp(min=1)
    metrics = {"clip_fraction": float(((ratio - clipped).abs() > 0)[mask].float().sum() / n)}
    if ref_logp is not None:
        d = ref_logp - logp
        kl_t = torch.exp(d) - d - 1
        if kl:
            per_token = per_token + kl * kl_t
        metrics["kl"] = float(kl_t.detach()[mask].sum() / n)
    return per_token[mask].sum(), metrics


def grpo_objective(clip_eps: float = 0.2, kl: float = 0.0, reference: torch.nn.Module | None = None,
                   reference_context: Callable[[torch.nn.Module], contextlib.AbstractContextManager] | None = None
                   ) -> Callable:
    """The loop's objective for rollout batches. The reference (for the KL penalty and the KL metric)
    is a frozen model, or the policy inside `reference_context` (LoRA's adapters off); neither: no KL."""
    if kl and reference is None and reference_context is None:
        raise ValueError("a KL penalty needs a reference model")

    def token_logp(model, batch) -> torch.Tensor:
        # (R, T), 0 off target; of the tempered distribution the responses were sampled from, as trl does
        return -model(batch["input_ids"], labels=batch["labels"], reduction="none",
                      temperature=batch.get("temperature", 1.0))

    def objective(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
        mask = batch["labels"] != IGNORE_INDEX
        logp = token_logp(model, batch)
        old = batch.get("old_logp")
        old = logp.detach() if old is None else old
        ref = None
        if reference is not None or reference_context is not None:
            with torch.no_grad():
                if reference is not None:
                    ref = token_logp(reference, batch)
                else:
                    with reference_context(model):
                        ref = token_logp(model, batch)
        loss, metrics = clipped_policy_loss(logp, old, batch["advantages"], mask, clip_eps=clip_eps, kl=kl,
                                            ref_logp=ref)
        return loss, {**metrics, **batch.get("stats", {})}, int(mask.sum())

    objective.progress_metrics = ("reward", "accuracy", "kl", "length", "sampling")
    return objective
