"""A model's next-word distribution against the stories grammar's exact one (`data/stories.py`).

    rows, kl, mass = compare_with_truth(model, tok, "The cat sat on the")
    # rows: [(word, true p, model p), ...] most likely (true) first; kl = KL(true || model) in nats

The model predicts tokens; the probability it gives a word is the product of its
tokens' conditional probabilities after the prefix (" floor" may be one token or
several). The story's end is the model's probability of its end-of-text token.
"""

from __future__ import annotations

import math

import torch

from ..data.stories import END, PUNCTUATION, true_next_word
from ..decoding import encode_prompt


@torch.inference_mode()
def word_probability(model, tokenizer, prefix: str, word: str) -> float:
    """The model's probability that `word` comes next after `prefix` (a space before it unless it is
    punctuation or the prefix ends in one); END is the end-of-text token."""
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prefix)
    if word == END:
        cont = [tokenizer.eos_id]
    else:
        sep = "" if word in PUNCTUATION or not prefix or prefix.endswith(" ") else " "
        full = encode_prompt(tokenizer, prefix + sep + word)
        cont = full[len(ids):] if full[:len(ids)] == ids else tokenizer.encode(sep + word)
    x = torch.tensor([ids + cont], device=device)
    logp = torch.log_softmax(model(x)[0].float(), dim=-1)  # (T, V)
    return math.exp(sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(cont)))


def compare_with_truth(model, tokenizer, prefix: str) -> tuple[list[tuple[str, float, float]], float, float]:
    """([(word, true probability, model probability)], KL(true || model) in nats, the model's mass on the
    grammar's words). Raises ValueError if the grammar cannot write `prefix`."""
    truth = true_next_word(prefix)
    rows = [(w, p, word_probability(model, tokenizer, prefix, w)) for w, p in truth.items()]
    kl = sum(p * math.log(p / max(q, 1e-12)) for _, p, q in rows)
    return rows, kl, sum(q for _, _, q in rows)
