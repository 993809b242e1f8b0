"""Simple English stories from a probabilistic grammar whose next-word distribution is known exactly.

    from lmsmith.data.stories import generate_stories, true_next_word
    generate_stories(3, seed=0)                 # ["The cat sat on the mat. Tom ran to the park, and ...", ...]
    true_next_word("The cat sat on the")        # {"floor": 0.19, "bed": 0.16, "couch": 0.13, ...}

The grammar has no left recursion (a story is sentences, one after another), so the words
that may follow a prefix, and their exact probabilities, come from following every
derivation consistent with the prefix (`true_next_word`): what a model trained on these
stories should learn, to compare its next-token table with. Words are separated by spaces;
"," and "." are words of their own, written without a space before them. "<end>" is the
end of a story.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

END = "<end>"

# Nonterminal -> [(weight, right-hand side)]; a symbol in GRAMMAR is a nonterminal, anything else a word.
GRAMMAR: dict[str, list[tuple[float, list[str]]]] = {
    "STORY": [(0.75, ["SENTENCE", "STORY"]), (0.25, ["SENTENCE"])],
    "SENTENCE": [(1.0, ["SUBJECT", "PREDICATE", "ENDING"])],
    "SUBJECT": [(0.7, ["The", "ANIMAL"]), (0.3, ["NAME"])],
    "ANIMAL": [(0.3, ["cat"]), (0.25, ["dog"]), (0.15, ["bird"]), (0.12, ["mouse"]), (0.1, ["fox"]),
               (0.08, ["rabbit"])],
    "NAME": [(0.3, ["Tom"]), (0.3, ["Mia"]), (0.2, ["Sam"]), (0.2, ["Lily"])],
    "PREDICATE": [(0.35, ["sat", "on", "the", "SEAT"]), (0.2, ["ran", "to", "the", "PLACE"]),
                  (0.15, ["looked", "at", "the", "THING"]), (0.15, ["ate", "the", "FOOD"]),
                  (0.15, ["slept", "in", "the", "BED"])],
    "SEAT": [(0.19, ["floor"]), (0.16, ["bed"]), (0.13, ["couch"]), (0.12, ["mat"]), (0.1, ["chair"]),
             (0.09, ["rug"]), (0.08, ["table"]), (0.07, ["grass"]), (0.06, ["roof"])],
    "PLACE": [(0.3, ["park"]), (0.25, ["house"]), (0.2, ["river"]), (0.15, ["garden"]), (0.1, ["shop"])],
    "THING": [(0.3, ["moon"]), (0.25, ["tree"]), (0.25, ["door"]), (0.2, ["sky"])],
    "FOOD": [(0.3, ["bread"]), (0.25, ["cake"]), (0.25, ["apple"]), (0.2, ["cheese"])],
    "BED": [(0.4, ["box"]), (0.35, ["sun"]), (0.25, ["basket"])],
    "ENDING": [(0.55, ["."]), (0.45, [",", "LINK"])],
    "LINK": [(0.5, ["and", "CLAUSE"]), (0.3, ["but", "CLAUSE"]), (0.2, ["so", "CLAUSE"])],
    "CLAUSE": [(0.45, ["then", "it", "PREDICATE", "."]), (0.35, ["it", "PREDICATE", "."]),
               (0.2, ["the", "ANIMAL", "PREDICATE", "."])],
}

PUNCTUATION = {",", "."}


def _check(grammar: dict) -> None:
    for name, rules in grammar.items():
        total = sum(w for w, _ in rules)
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"stories grammar: the weights of {name} sum to {total}, not 1")


_check(GRAMMAR)


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """n stories, reproducible from `seed`."""
    rng = random.Random(seed)
    return [render(_derive(rng)) for _ in range(n)]


def _derive(rng: random.Random) -> list[str]:
    words, stack = [], ["STORY"]
    while stack:
        sym = stack.pop()
        if sym in GRAMMAR:
            weights, rhss = zip(*GRAMMAR[sym])
            stack.extend(reversed(rng.choices(rhss, weights=weights)[0]))
        else:
            words.append(sym)
    return words


def render(words: list[str]) -> str:
    """Words -> text: spaces between words, none before "," or "."."""
    return "".join(w if w in PUNCTUATION or i == 0 else " " + w for i, w in enumerate(words))


def split_words(text: str) -> list[str]:
    """Text -> words, "," and "." separated from the word before them."""
    return text.replace(",", " , ").replace(".", " . ").split()


# ---- the exact next-word distribution ------------------------------------------------------------

def _expand(stack: tuple[str, ...], p: float) -> Iterator[tuple[str, tuple[str, ...], float]]:
    """(first word, the stack after it, probability) for every way `stack` can start."""
    if not stack:
        yield END, (), p
        return
    head, rest = stack[0], stack[1:]
    if head not in GRAMMAR:
        yield head, rest, p
        return
    for w, rhs in GRAMMAR[head]:
        yield from _expand(tuple(rhs) + rest, p * w)


def true_next_word(prefix: str) -> dict[str, float]:
    """The grammar's probability of each next word after `prefix` (a story's beginning).

    Returns word -> probability (summing to 1), most likely first; `END` is the story's end.
    Raises ValueError when the grammar cannot produce `prefix`.
    """
    states: dict[tuple[str, ...], float] = {("STORY",): 1.0}
    words = split_words(prefix)
    for i, word in enumerate(words):
        nxt: dict[tuple[str, ...], float] = {}
        for stack, p in states.items():
            for w, rest, q in _expand(stack, p):
                if w == word:
                    nxt[rest] = nxt.get(rest, 0.0) + q
        if not nxt:
            raise ValueError(f"the stories grammar never writes {word!r} after {render(words[:i])!r}")
        states = nxt
    dist: dict[str, float] = {}
    for stack, p in states.items():
        for w, _, q in _expand(stack, p):
            dist[w] = dist.get(w, 0.0) + q
    total = sum(dist.values())
    return dict(sorted(((w, q / total) for w, q in dist.items()), key=lambda kv: -kv[1]))
