"""The reward model's objective: Bradley-Terry on preference pairs.

    loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected) - margin)

summed over the pairs of a batch (n = pairs), where r is the reward model's score at the
last token of the rendered pair (`reward_model.reward_ids`). Metrics: accuracy (fraction of
pairs whose chosen response scores higher), margin (mean r_c - r_r), chosen and rejected
(mean rewards).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data.instruct import EncodeStats


def encode_reward_pairs(examples: Sequence[dict], tokenizer, seq_len: int) -> tuple[list[dict], EncodeStats]:
    """Preference examples -> items {"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}: the
    full sequences a reward model scores (the prompt cut from the left when longer than `seq_len`)."""
    from ..reward_model import reward_ids

    items, stats = [], EncodeStats()
    for ex in examples:
        item = {}
        for side in ("chosen", "rejected"):
            full = reward_ids(tokenizer, ex["prompt"], ex[side])
            stats.longest = max(stats.longest, len(full))
            stats.truncated += len(full) > seq_len
            ids = full[-seq_len:]
            item[f"{side}_ids"], item[f"{side}_mask"] = ids, [1] * len(ids)
        items.append(item)
        stats.examples += 1
        stats.tokens += len(item["chosen_ids"]) + len(item["rejected_ids"])
        stats.target_tokens += 2
    return items, stats


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Summed -log sigmoid(chosen - rejected - margin) over pairs; chosen, rejected: (B,) rewards."""
    return -F.logsigmoid(chosen - rejected - margin).sum()


def reward_objective(margin: float = 0.0) -> Callable:
    """The loop's objective for reward-model batches (see the module docstring)."""

    def objective(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
        c_ids, r_ids = batch["chosen_ids"], batch["rejected_ids"]
        width = max(c_ids.shape[1], r_ids.shape[1])

        def pad(t):
            return F.pad(t, (0, width - t.shape[1]), value=0)

        B = c_ids.shape[0]
        rewards = model(torch.cat([pad(c_ids), pad(r_ids)]),
                        attention_mask=torch.cat([pad(batch["chosen_mask"]), pad(batch["rejected_mask"])]))
        chosen, rejected = rewards[:B], rewards[B:]
        loss = bradley_terry_loss(chosen, rejected, margin)
        d = (chosen - rejected).detach()
        metrics = {"accuracy": float((d > 0).float().mean()), "margin": float(d.mean()),
                   "chosen": float(chosen.detach().mean()), "rejected": float(rejected.detach().mean())}
        return loss, metrics, B

    return objective
