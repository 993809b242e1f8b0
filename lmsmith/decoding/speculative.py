"""Speculative decoding: a cheap drafter proposes tokens, the target checks them all in one forward.

    DraftModel(model, max_batch, max_len)   a small model with its own KV cache (rows = the engine's slots)
    PromptLookup(max_ngram)                 copies what followed the last n-gram earlier in the sequence
    verify_token(scores, picker, draft, q)  one position's accept / correct decision

The engine (`engine.py`) runs a speculative step for every generating slot: the drafter proposes
gamma tokens per slot, the target runs [last token, d1 .. d_gamma] of every slot in ONE packed forward,
and each slot then walks its positions: position i's target scores (with the request's penalties
for the tokens accepted so far, then its temperature and filters) decide d_{i+1}:

  greedy     accept while argmax == d_{i+1}; the first mismatch contributes the target's argmax;
  sampling   accept d with probability min(1, p(d) / q(d)); on rejection draw from max(0, p - q)
             renormalised; after gamma acceptances a bonus token is drawn from p (Leviathan et al.,
             2023; Chen et al., 2023). The output then has the target's distribution exactly.

q is the distribution the drafter drew from, built with the same processors from the drafter's logits
(prompt lookup proposes deterministically: q is one-hot, so d is kept with probability p(d)). Both
caches are then rolled back past the first rejection (`KVCache.truncate`).

gamma per slot is adaptive unless fixed: +2 after a step whose drafts were all accepted, -1 otherwise
(transformers' "heuristic" schedule), between 1 and `MAX_GAMMA`; a slot whose one-token draft is
rejected stops drafting for `PAUSE_STEPS` steps, then tries again with one.
"""

from __future__ import annotations

import copy

import torch

from ..errors import LmsmithError
from ..kvcache import PackedStep
from . import sampling

MAX_GAMMA = 16
START_GAMMA = 4
# Steps without drafting after a rejected single-token draft (drafts that keep failing cost a verification each).
PAUSE_STEPS = 8


class PromptLookup:
    """Drafts from the sequence itself (prompt + output): find an earlier occurrence of the last n tokens
    (n = max_ngram down to 1) and propose the tokens that followed it. No model, no cache: pays off when
    the output repeats the prompt or itself (editing, extraction, code)."""

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """At most k tokens to follow `tokens` (possibly none): after the latest earlier occurrence of the
        longest matching tail that is followed by k tokens, else the occurrence followed by the most."""
        n_tok = len(tokens)
        for n in range(min(self.max_ngram, n_tok - 1), 0, -1):
            tail, best = tokens[n_tok - n:], []
            for start in range(n_tok - n - 1, -1, -1):  # latest first: the nearest context
                if tokens[start:start + n] == tail:
                    follow = tokens[start + n:start + n + k]
                    if len(follow) > len(best):
                        best = follow
                    if len(best) == k:
                        break
            if best:
                return best
        return []


class DraftModel:
    """A small model that drafts for the engine's slots, in its own KV cache (one row per slot).

    Args:
        model: the draft (same vocabulary as the target).
        max_batch: the engine's slots; max_len: tokens per row (at most the draft's context).
    """

    name = "model"

    def __init__(self, model: torch.nn.Module, max_batch: int, max_len: int):
        self.model = model
        self.max_len = min(max_len, model.config.max_seq_len)
        self.cache = model.make_cache(max_batch, self.max_len)
        self.device = next(model.parameters()).device

    def propose(self, work: list[tuple[object, int]], choose) -> list[tuple[list[int], list[torch.Tensor | None]]]:
        """Draft for several slots at once.

        Args:
            work: (seq, gamma) per slot; seq has `row`, `tokens` and `draft_cached` (how many of its
                tokens the draft's row holds; the rest are fed first).
            choose: choose(i, logits (1, V)) -> (token, q (V,) or None): slot i's draft token and the
                distribution it was drawn from.

        Returns:
            per slot (draft tokens, their q's); the draft's row then holds every token but the last draft.
        """
        out: list[tuple[list[int], list]] = [([], []) for _ in work]
        segments = [(s.row, len(s.tokens) - s.draft_cached) for s, _ in work]
        ids = [t for s, _ in work for t in s.tokens[s.draft_cached:]]
        live = list(range(len(work)))
        for step in range(max(g for _, g in work)):
            packed = PackedStep(self.cache, segments)
            logits = self.model(torch.tensor([ids], device=self.device), cache=packed, last_only=True)[0].float()
            for j, i in enumerate(live):
                s, _ = work[i]
                s.draft_cached += segments[j][1]
                tok, q = choose(i, logits[j:j + 1])
                out[i][0].append(tok)
                out[i][1].append(q)
            live = [i for i in live if work[i][1] > step + 1]
            segments = [(work[i][0].row, 1) for i in live]
            ids = [out[i][0][-1] for i in live]
        return out

    def truncate(self, row: int, n: int) -> None:
        self.cache.truncate(row, n)


def make_drafter(draft, max_batch: int, max_len: int, target_config):
    """A DraftModel or PromptLookup from what the caller gave: a model, 'prompt-lookup', or a drafter."""
    if draft is None or isinstance(draft, (DraftModel, PromptLookup)):
        return draft
    if isinstance(draft, str):
        if draft != "prompt-lookup":
            raise LmsmithError(f"draft {draft!r}: give a draft model or 'prompt-lookup'")
        return PromptLookup()
    vocab = draft.config.vocab_size
    if vocab != target_config.vocab_size:
        raise LmsmithError(f"the draft model's vocabulary has {vocab} tokens, the target's "
                           f"{target_config.vocab_size}; a draft must share the target's tokenizer")
    return DraftModel(draft, max_batch, max_len)


def fork_picker(picker):
    """A copy of a request's TokenPicker for drafting: its own penalty history (the drafts are not yet
    accepted), the request's generator (its draws are part of the request's random stream)."""
    fork = copy.copy(picker)
    fork.seen = None if picker.seen is None else picker.seen.clone()
    fork.counts = None if picker.counts is None else picker.counts.clone()
    fork.bans = copy.deepcopy(picker.bans)
    return fork


def draft_choice(picker, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """The drafter's token from its logits (1, V) under the request's processors: greedy -> argmax;
    sampling -> a draw from q, returned with q (V,)."""
    scores = picker.penalise(logits)
    if not picker.config.is_sampling:
        return int(sampling.greedy(scores)[0]), None
    q = sampling.warp(scores, picker.config).softmax(dim=-1)
    return int(sampling.sample(q, picker.generator)[0]), q[0]


def verify_token(scores: torch.Tensor, picker, draft: int | None, q: torch.Tensor | None) -> tuple[int, bool]:
    """One position: (the token to emit, whether it is the draft token).

    Args:
        scores: (1, V) the target's raw logits at this position.
        picker: the request's TokenPicker (its penalty state holds the tokens accepted so far).
        draft: the draft token at this position, or None (the bonus position after all drafts).
        q: (V,) the draft's distribution for `draft` (None: greedy, or a one-hot for prompt lookup).
    """
    scores = picker.penalise(scores)
    if not picker.config.is_sampling:
        tok = int(sampling.greedy(scores)[0])
        return tok, tok == draft
    p = sampling.warp(scores, picker.config).softmax(dim=-1)[0]  # (V,)
    if draft is None:
        return int(sampling.sample(p[None], picker.generator)[0]), False
    if q is None:  # a deterministic proposal
        q = torch.zeros_like(p)
        q[draft] = 1.0
    u = float(torch.rand((), generator=picker.generator, device=p.device))
    if u * float(q[draft]) < float(p[draft]):  # u < p/q without dividing by a tiny q
        return draft, True
    residual = (p - q).clamp_(min=0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: p itself
        residual = p
    return int(sampling.sample((residual / residual.sum())[None], picker.generator)[0]), False


def next_gamma(gamma: int, proposed: int, accepted: int) -> int:
    """The adaptive schedule: grow after a fully accepted draft, shrink after a rejection; a rejected
    single-token draft pauses drafting for PAUSE_STEPS steps (returned as -PAUSE_STEPS)."""
    if proposed == 0:
        return gamma
    if accepted == proposed:
        return min(MAX_GAMMA, gamma + 2)
    return -PAUSE_STEPS if gamma == 1 and accepted == 0 else max(1, gamma - 1)
