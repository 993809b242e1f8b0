"""Choosing one token per row of a batch in which every row has its own settings.

The engine decodes requests with different strategies, temperatures, filters,
penalties and seeds in one forward. Here each row's scores go through the same pure
functions of `sampling.py` that a batch of one would use, grouped by identical
settings (each function works row by row, so a row's result does not depend on
the others in its group), and each request draws from its own `torch.Generator`:
a seeded request gives the same tokens alone or batched.

`TokenPicker` is one request's state: its config, generator, penalty history,
optional JSON constraint. `pick(scores, pickers)` chooses the tokens of a step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import sampling
from .config import GenerationConfig
from .json_mode import JsonPrefix

# Candidates tried, most likely first, before the JSON constraint scans the whole vocabulary.
_JSON_TRIES = 64


class TokenPicker:
    """One request's token choice state.

    Args:
        config: its GenerationConfig (strategy, filters, penalties, seed).
        prompt: the prompt ids (the repetition penalty and no-repeat-ngram see them).
        vocab_size: V.
        device: where the scores live.
        json_texts: for JSON mode, a function id -> the token's text (None: unconstrained).
    """

    def __init__(self, config: GenerationConfig, prompt: list[int], vocab_size: int, device: torch.device,
                 json_texts: Callable[[int], str | None] | None = None):
        self.config = config
        self.key = (config.is_sampling, config.temperature, config.top_k, config.top_p, config.min_p)
        self.generator = None
        if config.is_sampling:
            self.generator = torch.Generator(device=device)
            if config.seed is not None:
                self.generator.manual_seed(config.seed)
            else:
                self.generator.seed()
        self.seen = self.counts = self.bans = None
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, prompt] = True
        if config.frequency_penalty != 0.0 or config.presence_penalty != 0.0:
            self.counts = torch.zeros(1, vocab_size, dtype=torch.int32, device=device)
        if config.no_repeat_ngram_size > 0:
            self.bans = sampling.NgramBans(prompt, config.no_repeat_ngram_size)
        self.json = JsonPrefix() if json_texts is not None else None
        self.json_texts = json_texts
        self.room = config.max_new_tokens  # tokens left, counting this step's (the engine updates it)

    def penalise(self, scores: torch.Tensor) -> torch.Tensor:
        """This request's penalties on its scores (1, V)."""
        c = self.config
        if self.seen is not None:
            scores = sampling.apply_repetition_penalty(scores, self.seen, c.repetition_penalty)
        if self.counts is not None:
            scores = sampling.apply_frequency_presence_penalty(scores, self.counts, c.frequency_penalty,
                                                               c.presence_penalty)
        if self.bans is not None:
            scores = sampling.ban_tokens_(scores.clone(), [self.bans.banned()])
        return scores

    def accept(self, token: int) -> None:
        """Record a chosen token that stays in the output."""
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[0, token] += 1
        if self.bans is not None:
            self.bans.append(token)
        if self.json is not None:
            self.json.feed(self.json_texts(token) or "")

    # ---- the JSON constraint -------------------------------------------------------------------

    def _json_ok(self, token: int) -> bool:
        """The token's text continues the JSON and leaves room to close it within the budget."""
        text = self.json_texts(token)
        if not text:
            return False
        after = self.json.copy()
        return after.feed(text) and len(after.closing()) <= self.room - 1

    def constrained(self, scores: torch.Tensor, probs: torch.Tensor | None) -> int:
        """The token JSON mode allows, or -1 when none is: greedy takes the best allowed one; sampling
        redraws (a disallowed token's probability set to 0) until one is allowed. Because a token must
        leave room for the shortest closing text, the object is always closed within the budget."""
        if probs is None:
            order = torch.topk(scores[0], min(_JSON_TRIES, scores.shape[-1])).indices.tolist()
            for tok in order:
                if self._json_ok(tok):
                    return tok
        else:
            probs = probs.clone()
            for _ in range(_JSON_TRIES):
                if float(probs.sum()) <= 0:
                    break
                tok = int(sampling.sample(probs, self.generator)[0])
                if self._json_ok(tok):
                    return tok
                probs[0, tok] = 0.0
        for tok in torch.argsort(scores[0], descending=True).tolist():  # the rest, most likely first
            if self._json_ok(tok):
                return tok
        return -1


def pick(scores: torch.Tensor, pickers: list[TokenPicker]) -> list[int]:
    """One token per row: scores (R, V) fp32 raw logits, pickers[r] the row's request state."""
    scores = torch.cat([p.penalise(scores[r:r + 1]) for r, p in enumerate(pickers)]) if any(
        p.seen is not None or p.counts is not None or p.bans is not None for p in pickers) else scores
    tokens = [0] * len(pickers)
    probs_of: dict[int, torch.Tensor] = {}
    groups: dict[tuple, list[int]] = {}
    for r, p in enumerate(pickers):
        groups.setdefault(p.key, []).append(r)
    for key, rows in groups.items():
        idx = torch.tensor(rows, device=scores.device)
        sub = scores.index_select(0, idx)
        if key[0]:  # sampling: each row draws with its own generator
            probs = sampling.warp(sub, pickers[rows[0]].config).softmax(dim=-1)
            for i, r in enumerate(rows):
                probs_of[r] = probs[i:i + 1]
                if pickers[r].json is None:
                    tokens[r] = int(sampling.sample(probs[i:i + 1], pickers[r].generator)[0])
        else:
            for i, tok in enumerate(sampling.greedy(sub).tolist()):
                tokens[rows[i]] = tok
    for r, p in enumerate(pickers):
        if p.json is not None:
            tokens[r] = p.constrained(scores[r:r + 1], probs_of.get(r))
    return tokens
