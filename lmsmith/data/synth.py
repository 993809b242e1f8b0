"""Synthetic instruction tasks whose answers can be checked exactly.

    generate_task("arithmetic", n=1000, seed=0) -> [{"task", "instruction", "solution"}, ...]
    write_synth("mix", n=2000, out="data/synth") -> {"train": path, "heldout": path, "preference": path, ...}

Tasks (all answers are short strings compared exactly after strip):

    arithmetic  "What is 37 + 45?" -> "82"  (also subtraction with a non-negative result)
    reverse     "Reverse the words: red fox sun" -> "sun fox red"
    sort        "Sort these words alphabetically: pear fig apple" -> "apple fig pear"
    convert     "Convert 3 km to m." -> "3000"  (integer results only, both directions)
    lookup      "Capitals: Zorvania: Kelmport; Quenland: Ostrava. What is the capital of Quenland?"
                -> "Ostrava"  (made-up countries from COUNTRIES; the facts are in the prompt, so a
                model can answer held-out questions by reading, not by memorising)
    mix         an equal share of each task

`write_synth` writes train.jsonl and heldout.jsonl (disjoint by question) in the
{"instruction", "solution"} format (plus "task"), and preference.jsonl
({"prompt", "chosen", "rejected"}, a wrong answer as rejected) from the train split for DPO.

The embedded pretraining corpus carries a little of these tasks as plain text (`corpus_documents`:
question on one line, answer on the next), the way worked examples appear in web text. So the demo
base model has the skills but not the chat format, which is the situation instruction tuning is
for, and the one in which a few virtual tokens (prompt tuning) can unlock them. A fixed fifth of
the question space (`reserved`, by a hash of the question) never appears in that corpus, and
held-out questions are drawn from it first, so held-out accuracy is never a memorised answer.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from collections.abc import Callable
from pathlib import Path

from ..errors import LmsmithError

WORDS = ("apple", "bird", "cat", "dog", "egg", "fig", "goat", "hat", "ink", "jam", "kite", "lamp",
         "moon", "nut", "owl", "pear", "queen", "rose", "sun", "tree", "vase", "wolf", "yak", "zebra")

# A fixed table of made-up countries and their capitals (no real-world knowledge needed).
COUNTRIES = {
    "Zorvania": "Kelmport", "Quenland": "Ostrava", "Brellia": "Tamsk", "Vodristan": "Pelloa",
    "Ardemia": "Gravin", "Lusquay": "Nerrow", "Tiberoth": "Callis", "Ombria": "Fennick",
    "Skarrow": "Ilvane", "Mirethia": "Dunmore", "Paxilon": "Rethwick", "Cordessa": "Yelm",
    "Haldoria": "Brisk", "Uvantis": "Solmere", "Greskar": "Wendle", "Elvoria": "Tarnby",
}

# (from unit, to unit, factor): value_in_to = value_in_from * factor.
CONVERSIONS = (("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60),
               ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("dozen", "items", 12))

TASKS = ("arithmetic", "reverse", "sort", "convert", "lookup")


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if rng.random() < 0.5:
        ans = a + b
        q = f"What is {a} + {b}?"
    else:
        a, b = max(a, b), min(a, b)  # non-negative results only
        ans = a - b
        q = f"What is {a} - {b}?"
    wrong = ans + rng.choice([-1, 1]) * rng.randint(1, 10)
    return q, str(ans), str(abs(wrong) if wrong != ans else ans + 1)


def _reverse(rng: random.Random, n_words: tuple[int, int] = (3, 5)) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(*n_words))
    ans = " ".join(reversed(words))
    return f"Reverse the words: {' '.join(words)}", ans, " ".join(words)


def _sort(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    ans = " ".join(sorted(words))
    wrong = " ".join(words) if words != sorted(words) else " ".join(sorted(words, reverse=True))
    return f"Sort these words alphabetically: {' '.join(words)}", ans, wrong


def _convert(rng: random.Random) -> tuple[str, str, str]:
    src, dst, factor = rng.choice(CONVERSIONS)
    n = rng.randint(1, 20)
    if rng.random() < 0.5:
        q, ans = f"Convert {n} {src} to {dst}.", n * factor
    else:  # the inverse direction, chosen so the result is a whole number
        q, ans = f"Convert {n * factor} {dst} to {src}.", n
    wrong = ans * 10 if rng.random() < 0.5 else ans + rng.randint(1, 9)
    return q, str(ans), str(wrong)


def _lookup(rng: random.Random) -> tuple[str, str, str]:
    names = rng.sample(sorted(COUNTRIES), 3)
    facts = "; ".join(f"{c}: {COUNTRIES[c]}" for c in names)
    target = rng.choice(names)
    wrong = COUNTRIES[rng.choice([c for c in names if c != target])]
    return f"Capitals: {facts}. What is the capital of {target}?", COUNTRIES[target], wrong


_MAKERS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "arithmetic": _arithmetic, "reverse": _reverse, "sort": _sort, "convert": _convert, "lookup": _lookup,
}


def generate_task(task: str, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct questions of `task` (or of every task with "mix") as {"task", "instruction",
    "solution", "rejected"} dicts; fewer if the task has fewer distinct questions."""
    if task != "mix" and task not in _MAKERS:
        raise LmsmithError(f"unknown synthetic task {task!r}; choose one of: {', '.join((*TASKS, 'mix'))}")
    if n < 1:
        raise LmsmithError(f"--n {n} must be >= 1")
    rng = random.Random(seed)
    names = list(TASKS) if task == "mix" else [task]
    out, seen = [], set()
    # Round-robin over tasks so "mix" holds an equal share; give up on a task when it stops yielding new questions.
    misses = dict.fromkeys(names, 0)
    while len(out) < n and any(m < 200 for m in misses.values()):
        for name in names:
            if len(out) >= n or misses[name] >= 200:
                continue
            q, a, wrong = _MAKERS[name](rng)
            if q in seen:
                misses[name] += 1
                continue
            seen.add(q)
            out.append({"task": name, "instruction": q, "solution": a, "rejected": wrong})
    return out


def reserved(question: str) -> bool:
    """True for the fifth of all questions kept out of the pretraining corpus (a fixed hash partition)."""
    return zlib.crc32(question.encode("utf-8")) % 5 == 0


def corpus_documents(n: int = 30_000, seed: int = 20_24, per_document: int = 40) -> list[tuple[str, str]]:
    """Plain-text worked examples for the pretraining corpus: [(doc_id, text), ...].

    Each document holds `per_document` examples written "question\nanswer\n\n": the answer starts a
    line, as it does after a chat template's assistant header, so it tokenizes the same way in both.
    Questions for which `reserved` is true are left out.
    """
    rows = [r for r in generate_task("mix", n, seed) if not reserved(r["instruction"])]
    return [(f"tasks-{i // per_document:04d}",
             "".join(f"{r['instruction']}\n{r['solution']}\n\n" for r in rows[i:i + per_document]))
            for i in range(0, len(rows), per_document)]


def write_synth(task: str, n: int, out: str | os.PathLike, seed: int = 0,
                heldout_fraction: float = 0.1) -> dict:
    """Generate `n` questions and write train.jsonl, heldout.jsonl and preference.jsonl under `out`.

    Returns {"train": path, "heldout": path, "preference": path, "n_train", "n_heldout",
    "heldout_in_corpus", "tasks"}. Held-out questions never appear in train.jsonl or preference.jsonl;
    they are `reserved` questions (absent from the pretraining corpus) as far as there are enough of
    them, and "heldout_in_corpus" counts the rest.
    """
    if not 0 <= heldout_fraction < 1:
        raise LmsmithError(f"--held-out-fraction {heldout_fraction} must be in [0, 1)")
    examples = generate_task(task, n, seed)
    random.Random(seed + 1).shuffle(examples)
    n_held = int(round(len(examples) * heldout_fraction))
    if heldout_fraction > 0 and len(examples) > 1:
        n_held = max(1, n_held)
    # Reserved questions first (a stable sort keeps the shuffled order within each group).
    examples.sort(key=lambda r: not reserved(r["instruction"]))
    held, train = examples[:n_held], examples[n_held:]
    random.Random(seed + 2).shuffle(train)  # mix the reserved questions left over into the train order
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, rows: list[dict]) -> Path:
        path = out / name
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        return path

    def sft(r: dict) -> dict:
        return {"task": r["task"], "instruction": r["instruction"], "solution": r["solution"]}

    paths = {
        "train": write("train.jsonl", [sft(r) for r in train]),
        "heldout": write("heldout.jsonl", [sft(r) for r in held]),
        "preference": write("preference.jsonl", [{"task": r["task"], "prompt": r["instruction"],
                                                  "chosen": r["solution"], "rejected": r["rejected"]}
                                                 for r in train]),
    }
    tasks: dict[str, int] = {}
    for r in examples:
        tasks[r["task"]] = tasks.get(r["task"], 0) + 1
    return {**paths, "n_train": len(train), "n_heldout": len(held),
            "heldout_in_corpus": sum(not reserved(r["instruction"]) for r in held), "tasks": tasks}
