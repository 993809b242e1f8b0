"""Held-out evaluation during RL: greedy accuracy and pass@k from sampled answers.

    heldout_metrics(model, tokenizer, items, k=8, ...) -> {"val_accuracy", "val_pass@1", "val_pass@8",
                                                           "val_accuracy_<task>", ...}

accuracy: the greedy answer equals the reference (after strip). pass@1 / pass@k: from k samples
per prompt at the rollout temperature, the unbiased estimator with n = k samples and c correct:
pass@1 = c / k, pass@k = 1 if c > 0 else 0, averaged over prompts. Sampling is seeded, so two
evaluations of the same weights agree.
"""

from __future__ import annotations

import torch

from ..eval.tasks import exact_match


@torch.no_grad()
def _answers(model, tokenizer, prompt_ids, config, precision) -> list[list[str]]:
    from ..decoding import generate_ids

    comps = generate_ids(model, prompt_ids, config, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                         precision=precision)
    out: list[list[str]] = [[] for _ in prompt_ids]
    for c in comps:
        out[c.prompt_index].append(c.text)
    return out


def heldout_metrics(model, tokenizer, items: list[dict], *, k: int = 8, temperature: float = 1.0,
                    top_p: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                    precision: str | None = None, batch_size: int = 64) -> dict[str, float]:
    """The metrics of the module docstring over `items` (prompts with answers)."""
    from ..decoding import GenerationConfig, encode_chat
    from ..eval.tasks import generate_answers

    eos = list(getattr(tokenizer, "eos_ids", None) or [])
    ids = [encode_chat(tokenizer, it["messages"]) for it in items]
    greedy = generate_answers(model, tokenizer, [it["messages"] for it in items], max_new_tokens=max_new_tokens,
                              batch_size=batch_size, precision=precision)
    was_training = model.training
    model.eval()
    sampled = []
    try:
        if k > 0:
            per = max(1, batch_size // k)
            for s in range(0, len(ids), per):
                cfg = GenerationConfig(strategy="sample", temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, num_return_sequences=k, seed=seed + s * k,
                                       eos_ids=eos)
                sampled += _answers(model, tokenizer, ids[s:s + per], cfg, precision)
    finally:
        model.train(was_training)
    n = len(items)
    ok = [exact_match(g, it["answer"]) for g, it in zip(greedy, items)]
    out = {"val_accuracy": sum(ok) / n}
    if k > 0:
        correct = [sum(exact_match(a, it["answer"]) for a in answers) for answers, it in zip(sampled, items)]
        out["val_pass@1"] = sum(c / k for c in correct) / n
        out[f"val_pass@{k}"] = sum(c > 0 for c in correct) / n
    tasks: dict[str, list[bool]] = {}
    for it, good in zip(items, ok):
        tasks.setdefault(it["task"], []).append(good)
    if len(tasks) > 1:
        out.update({f"val_accuracy_{t}": sum(v) / len(v) for t, v in sorted(tasks.items())})
    return out
