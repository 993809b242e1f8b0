"""Preference accuracy: how often a model ranks the chosen response above the rejected one.

    preference_accuracy(model, tokenizer, examples) -> {"accuracy", "correct", "total", "margin",
                                                        "per_task": {task: {"accuracy", "correct", "total"}},
                                                        "by": "reward" | "logprob"}

A reward model (`RewardModel`) ranks by its score; a language model by the summed log-probability
of each response given the prompt (the quantity DPO raises for chosen responses). Ties count as
wrong. `examples` are preference examples as `read_examples` returns them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def _logprob_scores(model, tokenizer, prompts, responses, batch_size: int = 16) -> list[float]:
    from ..data.instruct import _shift, collate, pad_id_of, tokenize_messages
    from ..train.dpo import sequence_logprobs

    items = []
    for p, r in zip(prompts, responses):
        ids, target = tokenize_messages(tokenizer, [*p, {"role": "assistant", "content": r}])
        keep = model.config.max_seq_len + 1  # the context, and the response's end, are what count
        ids, labels = _shift(ids[-keep:], target[-keep:])
        items.append({"input_ids": ids, "labels": labels})
    out: list[float] = []
    device = next(model.parameters()).device
    for s in range(0, len(items), batch_size):
        b = collate(items[s:s + batch_size], pad_id_of(tokenizer))
        out += sequence_logprobs(model, b["input_ids"].to(device), b["labels"].to(device)).tolist()
    return out


def preference_accuracy(model, tokenizer, examples: Sequence[dict], *, batch_size: int = 16) -> dict:
    """Accuracy of ranking chosen over rejected, overall and per task (see the module docstring)."""
    from ..reward_model import RewardModel, score_batch

    prompts = [ex["prompt"] for ex in examples]
    by = "reward" if isinstance(model, RewardModel) else "logprob"
    was_training = model.training
    model.eval()
    try:
        def scores(side):
            responses = [ex[side] for ex in examples]
            if by == "reward":
                return score_batch(model, tokenizer, prompts, responses, batch_size=batch_size)
            return _logprob_scores(model, tokenizer, prompts, responses, batch_size)

        chosen, rejected = scores("chosen"), scores("rejected")
    finally:
        model.train(was_training)
    per: dict[str, dict] = {}
    for ex, c, r in zip(examples, chosen, rejected):
        d = per.setdefault(ex.get("task", "all"), {"correct": 0, "total": 0})
        d["correct"] += c > r
        d["total"] += 1
    for d in per.values():
        d["accuracy"] = d["correct"] / d["total"]
    correct = sum(d["correct"] for d in per.values())
    n = max(len(examples), 1)
    return {"accuracy": correct / n, "correct": correct, "total": len(examples),
            "margin": sum(c - r for c, r in zip(chosen, rejected)) / n, "per_task": dict(sorted(per.items())),
            "by": by}
