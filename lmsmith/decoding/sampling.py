"""Choosing the next token: pure functions from logits to a distribution to a token.

Nothing here knows about models, caches or text. Shapes: B rows, V vocabulary.
Every function takes fp32 logits (B, V) and returns new tensors (inputs are not
modified), except where a name ends in `_` (in place, for the engine's hot loop).

The order a sampling step applies them in (the same order as transformers):

    logits -> penalties (repetition, frequency/presence, no-repeat-ngram)
           -> / temperature -> top-k -> top-p -> min-p -> softmax -> draw

`distribution(logits, config)` runs the temperature and filter part (everything
after the penalties) and returns the probabilities a step samples from.
"""

from __future__ import annotations

import torch

from .config import GenerationConfig

NEG_INF = float("-inf")


# ---------------------------------------------------------------- penalties (on logits)

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / transformers repetition penalty.

    Args:
        logits: (B, V) scores.
        seen: (B, V) bool, True for every token already in the prompt or the output.
        penalty: > 1 discourages repeats: positive scores are divided by it, negative multiplied.

    Returns:
        (B, V) penalised scores.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence_penalty(logits: torch.Tensor, counts: torch.Tensor, frequency: float,
                                     presence: float) -> torch.Tensor:
    """OpenAI's penalties: `logits - frequency * count - presence * (count > 0)`.

    Args:
        logits: (B, V) scores.
        counts: (B, V) how often each token occurs in the output so far (the prompt is not counted).
    """
    if frequency == 0.0 and presence == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def banned_ngram_tokens(tokens: list[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram already in `tokens` (transformers' NoRepeatNGram rule).

    The last n-1 tokens form a prefix; every token that followed the same prefix earlier is banned.
    """
    if n <= 0 or len(tokens) + 1 < n:
        return []
    if n == 1:
        return list(set(tokens))
    prefix = tokens[len(tokens) - n + 1:]
    banned = []
    for i in range(len(tokens) - n + 1):
        if tokens[i:i + n - 1] == prefix:
            banned.append(tokens[i + n - 1])
    return banned


class NgramBans:
    """Incremental `banned_ngram_tokens` for one sequence: O(1) per appended token.

    Keeps a dict prefix (n-1 tokens) -> set of next tokens, updated as tokens arrive.
    """

    def __init__(self, tokens: list[int], n: int):
        self.n, self.tokens, self.table = n, [], {}
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        n = self.n
        if len(self.tokens) >= n:
            key = tuple(self.tokens[len(self.tokens) - n:-1])
            self.table.setdefault(key, set()).add(token)

    def banned(self) -> list[int]:
        n = self.n
        if len(self.tokens) + 1 < n:
            return []
        key = tuple(self.tokens[len(self.tokens) - n + 1:]) if n > 1 else ()
        return list(self.table.get(key, ()))


def ban_tokens_(logits: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    """Set logits[b, t] = -inf for each t in banned[b], in place. Returns `logits`."""
    for b, toks in enumerate(banned):
        if toks:
            logits[b, toks] = NEG_INF
    return logits


# ---------------------------------------------------------------- warpers (temperature and filters)

def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T (T > 0). softmax of the result sharpens (T < 1) or flattens (T > 1) the distribution."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores per row, set the rest to -inf. (B, V) -> (B, V).

    Ties at the k-th score are all kept, as in transformers (threshold comparison).
    """
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass reaches p.

    A token is kept when the mass of the tokens strictly more likely than it is below p; the most
    likely token is always kept. (B, V) -> (B, V) with the rest set to -inf.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with probability >= min_p * max probability (min-p sampling). (B, V) -> (B, V)."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, NEG_INF)


def warp(logits: torch.Tensor, config: GenerationConfig, temperature: float | None = None) -> torch.Tensor:
    """Temperature then top-k, top-p, min-p as set in `config`: filtered scores (B, V), -inf = removed."""
    t = config.temperature if temperature is None else temperature
    if t > 0:
        logits = apply_temperature(logits, t)
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p is not None:
        logits = top_p_filter(logits, config.top_p)
    if config.min_p is not None:
        logits = min_p_filter(logits, config.min_p)
    return logits


def distribution(logits: torch.Tensor, config: GenerationConfig | None = None, *,
                 temperature: float | None = None) -> torch.Tensor:
    """The probabilities one sampling step draws from.

    `softmax(filter(logits / T))` where the filters are `config`'s top-k, top-p and min-p, applied
    in that order, each on the output of the previous one (so top-p measures mass *after* top-k),
    as transformers does. Penalties are NOT applied here: they need the token history; apply
    `apply_repetition_penalty` etc. to `logits` first to see a penalised step.

    With temperature 0 (or a greedy/beam config) the result is one-hot on the argmax.

    Args:
        logits: (V,) or (B, V) raw next-token scores.
        config: a GenerationConfig (default: plain softmax, T=1, no filters).
        temperature: overrides `config.temperature`.

    Returns:
        Probabilities of the same shape as `logits`, fp32, rows summing to 1.
    """
    config = config or GenerationConfig(strategy="sample")
    squeeze = logits.dim() == 1
    x = logits.float()[None] if squeeze else logits.float()
    t = config.temperature if temperature is None else temperature
    if t == 0 or config.strategy in ("greedy", "beam"):
        probs = torch.zeros_like(x).scatter_(-1, x.argmax(-1, keepdim=True), 1.0)
    else:
        probs = warp(x, config, temperature=t).softmax(dim=-1)
    return probs[0] if squeeze else probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from probabilities (B, V) -> (B,) int64."""
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax per row (B, V) -> (B,) int64; the lowest id wins ties, as in torch.argmax/transformers."""
    return logits.argmax(dim=-1)
