"""Synthetic instruction tasks whose answers can be checked exactly.

    generate_task("arithmetic", n=1000, seed=0) -> [{"task", "instruction", "solution"}, ...]
    write_synth("mix", n=2000, out="data/synth") -> {"train": path, "heldout": path, "preference": path, ...}

Tasks (all answers are short strings compared exactly after strip):

    arithmetic  "What is 37 + 45?" -> "82"  (also subtraction with a non-negative result)
    reverse     "Reverse the words: red fox sun" -> "sun fox red"
    sort        "Sort these words alphabetically: pear fig apple" -> "apple fig pear"
    convert     "Convert 3 km to m." -> "3000"  (integer results only, both directions)
    lookup      "Capitals: Zorvania: Kelmport; Quenland: Ostrava; Brellia: Tamsk. What is the capital
                of Quenland?" -> "Ostrava"  (made-up countries and cities, paired at random in every
                question: the facts are in the prompt and change each time, so only reading answers it)
    mix         the tasks in turn: an equal share of each until a task runs out of distinct questions
                (convert has 320), then the others share the rest

`write_synth` writes train.jsonl and heldout.jsonl (disjoint by question) in the
{"instruction", "solution"} format (plus "task"), and preference.jsonl
({"prompt", "chosen", "rejected"}, a wrong answer as rejected) from the train split for DPO.

The embedded pretraining corpus carries a little of these tasks as plain text (`corpus_documents`:
question on one line, answer on the next), the way worked examples appear in web text. So the demo
base model has the skills but not the chat format, which is the situation instruction tuning is
for, and the one in which a few virtual tokens (prompt tuning) can unlock them. A fixed fifth of
the question space (`reserved`) never appears in that corpus, and held-out questions are drawn
from it first, so a held-out answer is never one the model saw. The partition hashes a canonical
form of each question, so that variants with the same answer fall on the same side: "37 + 45" and
"45 + 37", one word order and its reverse, the same words in any order for sorting, "3 km to m"
and "3000 m to km". (Which questions are held out therefore depends on that hash more than on the
seed.)
"""

from __future__ import annotations

import json
import os
import random
import re
import zlib
from collections.abc import Callable
from pathlib import Path

from ..errors import LmsmithError

WORDS = ("apple", "bird", "cat", "dog", "egg", "fig", "goat", "hat", "ink", "jam", "kite", "lamp",
         "moon", "nut", "owl", "pear", "queen", "rose", "sun", "tree", "vase", "wolf", "yak", "zebra")

# Made-up countries and cities (no real-world knowledge needed); each lookup question pairs them at random.
COUNTRIES = ("Zorvania", "Quenland", "Brellia", "Vodristan", "Ardemia", "Lusquay", "Tiberoth", "Ombria",
             "Skarrow", "Mirethia", "Paxilon", "Cordessa", "Haldoria", "Uvantis", "Greskar", "Elvoria")
CITIES = ("Kelmport", "Ostrava", "Tamsk", "Pelloa", "Gravin", "Nerrow", "Callis", "Fennick",
          "Ilvane", "Dunmore", "Rethwick", "Yelm", "Brisk", "Solmere", "Wendle", "Tarnby")

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
    return q, str(ans), str(wrong if wrong >= 0 else ans - wrong)  # a wrong answer, never negative


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
    names, cities = rng.sample(COUNTRIES, 3), rng.sample(CITIES, 3)
    target = rng.randrange(3)
    facts = "; ".join(f"{c}: {t}" for c, t in zip(names, cities))
    wrong = cities[(target + rng.randint(1, 2)) % 3]
    return f"Capitals: {facts}. What is the capital of {names[target]}?", cities[target], wrong


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
    # Round-robin over tasks so "mix" holds an equal share; a task is done when 200 draws in a row repeat
    # earlier questions (its question space is nearly exhausted: "convert" has 320).
    misses = dict.fromkeys(names, 0)
    while len(out) < n and any(m < 200 for m in misses.values()):
        for name in names:
            while len(out) < n and misses[name] < 200:  # draw until this task's turn yields a new question
                q, a, wrong = _MAKERS[name](rng)
                if q in seen:
                    misses[name] += 1
                    continue
                misses[name] = 0
                seen.add(q)
                out.append({"task": name, "instruction": q, "solution": a, "rejected": wrong})
                break
    return out


def _canonical(question: str) -> str:
    """One string for all questions that share an answer or its reverse (see the module docstring)."""
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", question):
        return "+ " + " ".join(sorted(m.groups(), key=int))
    if m := re.fullmatch(r"Reverse the words: (.+)", question):
        words = m.group(1).split()
        return "Reverse the words: " + " ".join(min(words, words[::-1]))  # an order and its reverse: one pair
    if m := re.fullmatch(r"Sort these words alphabetically: (.+)", question):
        return "Sort these words alphabetically: " + " ".join(sorted(m.group(1).split()))
    if m := re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", question):
        n, src, dst = int(m.group(1)), m.group(2), m.group(3)
        for unit, other, factor in CONVERSIONS:
            if (src, dst) == (other, unit) and n % factor == 0:
                return f"convert {unit} {other} {n // factor}"
            if (src, dst) == (unit, other):
                return f"convert {unit} {other} {n}"
    return question


def reserved(question: str) -> bool:
    """True for the fifth of all questions kept out of the pretraining corpus: a fixed hash partition of
    their canonical form, so "45 + 37" is reserved exactly when "37 + 45" is."""
    return zlib.crc32(_canonical(question).encode("utf-8")) % 5 == 0


def heldout_warning(examples: list[dict], path) -> str | None:
    """A one-line note when synthetic questions in an evaluation file lie outside the `reserved` fifth,
    so a model pretrained on the built-in corpus may have seen their answers (e.g. a held-out file made
    before the partition existed); None when there are none. `examples` as `read_examples` returns them."""
    ours = [next(m["content"] for m in e["messages"] if m["role"] == "user") for e in examples
            if e.get("task") in TASKS and any(m.get("role") == "user" for m in e.get("messages", ()))]
    seen = sum(not reserved(q) for q in ours)
    if not seen:
        return None
    return (f"note: {path}: {seen:,} of {len(ours):,} synthetic questions are outside the held-out fifth that the "
            "built-in pretraining corpus never contains; for a clean held-out score make the file with "
            "`lmsmith data synth`")


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
        from ..fileio import atomic_file

        path = out / name
        with atomic_file(path) as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
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
