"""Exact-match task accuracy: greedy answers under the chat template, compared after strip.

    task_accuracy(model, tokenizer, examples, max_new_tokens=32) -> {
        "accuracy": float, "correct": int, "total": int,
        "per_task": {task: {"accuracy", "correct", "total"}},
        "examples": [{"task", "prompt", "expected", "got", "correct"}, ...]}   (the first few)

`examples` are normalised instruction examples (`lmsmith.data.instruct.read_examples`):
the prompt is every turn before the last assistant turn, the expected answer that turn's content.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.instruct import prompt_and_answer


@torch.no_grad()
def _greedy_wrapped(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy decoding without a KV cache, one prompt at a time, for wrapped models (prompt tuning)
    whose forward takes only token ids. Slower than the engine; fine for evaluation sets."""
    device = next(model.parameters()).device
    eos = set(getattr(tokenizer, "eos_ids", None) or [])
    out = []
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        new: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(model(x)[0, -1].argmax())
            if tok in eos:
                break
            new.append(tok)
            x = torch.cat([x, torch.tensor([[tok]], device=device)], dim=1)
        out.append(tokenizer.decode(new, skip_special_tokens=True))
    return out


def exact_match(answer: str, expected: str) -> bool:
    """The tasks' checker: equal after strip."""
    return answer.strip() == expected.strip()


def generate_answers(model, tokenizer, prompts: Sequence[list[dict]], *, max_new_tokens: int = 32,
                     batch_size: int = 32, precision: str | None = None) -> list[str]:
    """Greedy completions of chat prompts (lists of messages), rendered with the generation prompt
    (`precision`: an autocast policy for the engine, None = the weights' dtype)."""
    from ..decoding import GenerationConfig, encode_prompt, generate_ids

    texts = [tokenizer.apply_chat_template(list(p), add_generation_prompt=True) for p in prompts]
    ids = [encode_prompt(tokenizer, t) for t in texts]
    was_training = model.training
    model.eval()
    try:
        if not hasattr(model, "hidden_states"):
            return _greedy_wrapped(model, tokenizer, ids, max_new_tokens)
        eos = list(getattr(tokenizer, "eos_ids", None) or [])
        config = GenerationConfig(strategy="greedy", max_new_tokens=max_new_tokens, eos_ids=eos)
        answers: list[str] = []
        for s in range(0, len(ids), batch_size):
            comps = generate_ids(model, ids[s:s + batch_size], config,
                                 decode=lambda x: tokenizer.decode(x, skip_special_tokens=True), precision=precision)
            answers += [c.text for c in comps]
        return answers
    finally:
        model.train(was_training)


def task_accuracy(model, tokenizer, examples: Sequence[dict], *, max_new_tokens: int = 32,
                  batch_size: int = 32, n_shown: int = 3) -> dict:
    """Exact-match accuracy of greedy answers (after strip) over `examples`, overall and per task.

    Args:
        examples: normalised SFT or preference examples (see `read_examples`); "task" names the
            group in the breakdown (default "all").
        n_shown: how many (prompt, expected, got) examples to return, mistakes first.
    """
    pairs = [prompt_and_answer(ex) for ex in examples]
    got = generate_answers(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                           batch_size=batch_size)
    per: dict[str, dict] = {}
    rows = []
    for ex, (prompt, expected), answer in zip(examples, pairs, got):
        ok = exact_match(answer, expected)
        task = ex.get("task", "all")
        d = per.setdefault(task, {"correct": 0, "total": 0})
        d["correct"] += ok
        d["total"] += 1
        rows.append({"task": task, "prompt": prompt[-1]["content"] if prompt else "", "expected": expected.strip(),
                     "got": answer.strip(), "correct": ok})
    for d in per.values():
        d["accuracy"] = d["correct"] / d["total"]
    correct = sum(d["correct"] for d in per.values())
    shown = sorted(rows, key=lambda r: r["correct"])[:n_shown]  # mistakes first: they are what to look at
    return {"accuracy": correct / max(len(rows), 1), "correct": correct, "total": len(rows),
            "per_task": dict(sorted(per.items())), "examples": shown}


def format_accuracy(result: dict) -> str:
    """One line: overall accuracy and the per-task breakdown."""
    parts = [f"{result['accuracy']:.1%} ({result['correct']}/{result['total']})"]
    if len(result["per_task"]) > 1:
        parts.append(", ".join(f"{t} {d['accuracy']:.0%}" for t, d in result["per_task"].items()))
    return "; ".join(parts)
