"""The generation engine, on token ids: prefill, decode with the KV cache, stop, stream.

It knows nothing about tokenization. Text appears only through an optional
`decode(ids) -> str` callback, needed for stop strings and text streaming.

Batches: prompts of different lengths are LEFT-padded to the longest (P tokens),
so every row's next token sits in the same column. Padding is hidden by an
attention mask (B, S) (1 = real key) and each row gets explicit rotary positions
(B, T) counting only its real tokens, so a row decodes exactly as it would alone.
When no row is padded both are omitted and the model takes its fast path
(plain causal attention, no mask tensor).

Limits: a sequence (prompt + new tokens) never exceeds the model's context
`max_seq_len`. A row that reaches it stops with finish_reason "length" (as with
`max_new_tokens`); a prompt longer than the context is an `LmsmithError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import LmsmithError
from ..model import KVCache
from . import sampling
from .config import GenerationConfig

FINISH_REASONS = ("eos", "stop", "length")


@dataclass
class Completion:
    """One generated sequence.

    Attributes:
        ids: the new token ids, without the prompt and without the EOS token. For a stop string,
            up to and including the token that completed it.
        finish_reason: "eos" (an end token), "stop" (a stop string), or "length" (max_new_tokens or
            the context limit).
        text: the decoded new text, cut before the stop string (only when a decode callback was given).
        prompt_index: which prompt this continues (several per prompt with num_return_sequences).
        score: beam search's length-penalised log-probability (None for other strategies).
    """

    ids: list[int]
    finish_reason: str
    text: str | None = None
    prompt_index: int = 0
    score: float | None = None


@dataclass
class Event:
    """One streamed step of one row: a new token (and the text it made printable), or the row's end.

    `token` is None on the final event of a row, which carries `finish_reason` and any text held back.
    """

    row: int
    token: int | None
    text: str = ""
    finish_reason: str | None = None


class Detokenizer:
    """Incremental text for one row: what is safe to print after each token, and stop strings.

    Decodes the whole output each step (simple and exact for byte-level BPE), and holds back
    (a) trailing U+FFFD, an incomplete multi-byte character that the next token may finish, and
    (b) a tail that could be the start of a stop string, so a stop string is never printed.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] | None = None):
        self.decode = decode
        self.stop = list(stop or [])
        self._longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False
        self._searched = 0

    def add(self, token: int) -> str:
        """Append a token; return the newly printable text (may be "")."""
        self.ids.append(token)
        full = self.decode(self.ids)
        if self.stop:
            start = max(0, self._searched - self._longest)  # a stop string may straddle the old end
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = full[:min(hits)]
                return self.flush()
            self._searched = len(full)
        self.text = full
        safe = len(full)
        while safe > self.emitted and full[safe - 1] == "\ufffd":
            safe -= 1
        if self.stop:
            safe = min(safe, self._stop_prefix_start(full))
        piece = full[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece

    def flush(self) -> str:
        """Everything not yet handed out (call when the row ends)."""
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece

    def _stop_prefix_start(self, full: str) -> int:
        # The earliest start of a suffix of `full` that is a proper prefix of some stop string.
        for k in range(min(self._longest - 1, len(full)), 0, -1):
            tail = full[len(full) - k:]
            if any(s.startswith(tail) for s in self.stop):
                return len(full) - k
        return len(full)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _precision_context(precision: str | None, device: torch.device):
    if precision in (None, "fp32"):
        return contextlib.nullcontext()
    from ..precision import autocast

    return autocast(precision, device)


def check_prompts(prompts: Sequence[Sequence[int]], context: int) -> list[list[int]]:
    """Validate prompts (lists of ids); a single flat list is one prompt."""
    if len(prompts) == 0:
        raise LmsmithError("no prompts given; pass at least one prompt")
    if isinstance(prompts[0], int):
        prompts = [prompts]  # type: ignore[list-item]
    out = []
    for i, p in enumerate(prompts):
        p = [int(t) for t in p]
        if not p:
            raise LmsmithError(f"prompt {i} is empty; generation needs at least one token "
                               f"(a tokenizer with a bos token adds one)")
        if len(p) > context:
            raise LmsmithError(f"prompt {i} has {len(p)} tokens, longer than the model's context of {context}; "
                               f"shorten the prompt")
        out.append(p)
    return out


def _left_pad(prompts: list[list[int]], total: int, device) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                      torch.Tensor | None]:
    """ids (B, P) left-padded with 0; attention mask (B, total) and prefill positions (B, P), or None, None."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
    if all(len(p) == P for p in prompts):
        return ids.to(device), None, None
    pad = torch.tensor([P - len(p) for p in prompts])
    mask = torch.ones(B, total, dtype=torch.long)
    mask[:, :P] = (torch.arange(P)[None, :] >= pad[:, None]).long()
    positions = (torch.arange(P)[None, :] - pad[:, None]).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def stream_ids(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    decode: Callable[[list[int]], str] | None = None,
    precision: str | None = None,
) -> Iterator[Event]:
    """Generate for a batch of prompts, yielding an `Event` per new token as it is produced.

    Greedy and sampling strategies only (beam search cannot stream: its best hypothesis is only
    known at the end; use `generate_ids`). With `config.num_return_sequences = n` each prompt is
    repeated n times: row r continues prompt r // n.

    Args:
        model: a `Transformer` (anything with `.config` and the same forward signature).
        prompts: B lists of token ids (a single flat list is one prompt).
        config: the GenerationConfig; `config.eos_ids` must be set here (None means no EOS).
        decode: ids -> text, needed for `config.stop` and to fill `Event.text`.
        precision: None/"fp32", or an `lmsmith.precision` policy ("auto", "bf16", "fp16") for autocast.

    Yields:
        Events in step order; after a row's last token one Event(row, None, text, finish_reason).
    """
    if config.strategy == "beam":
        raise LmsmithError("beam search cannot stream; use generate_ids / generate")
    if config.stop and decode is None:
        raise LmsmithError("stop strings need a decode callback (ids -> text); pass decode=tokenizer.decode")
    ctx = model.config.max_seq_len
    prompts = check_prompts(prompts, ctx)
    n = config.num_return_sequences
    rows = [p for p in prompts for _ in range(n)]
    with torch.inference_mode(), _precision_context(precision, model_device(model)):
        yield from _decode_loop(model, rows, config, decode)


def _decode_loop(model, rows: list[list[int]], config: GenerationConfig, decode) -> Iterator[Event]:
    cfg = model.config
    device = model_device(model)
    B = len(rows)
    lens = [len(p) for p in rows]
    P = max(lens)
    budget = [min(config.max_new_tokens, cfg.max_seq_len - n) for n in lens]
    steps = max(budget)
    detoks = [Detokenizer(decode, config.stop) for _ in rows] if decode is not None else None
    if steps <= 0:
        for i in range(B):
            yield Event(i, None, "", "length")
        return

    eos = set(config.eos_ids or ())
    ids, mask, positions = _left_pad(rows, P + steps, device)
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, B, max_len=P + steps, dtype=dtype, device=device)
    # Prefill: only the last position's logits are needed.
    logits = model(ids, positions=positions, attention_mask=mask, cache=cache, last_only=True)[:, -1].float()
    if mask is not None:
        pos = torch.tensor(lens, device=device)[:, None]  # (B, 1) next rotary position, real tokens only

    # Penalty state, kept incrementally so a step costs O(B * V), not O(B * length).
    V = logits.shape[-1]
    seen = counts = bans = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        for i, p in enumerate(rows):
            seen[i, p] = True
    if config.frequency_penalty != 0.0 or config.presence_penalty != 0.0:
        counts = torch.zeros(B, V, dtype=torch.int32, device=device)
    if config.no_repeat_ngram_size > 0:
        bans = [sampling.NgramBans(p, config.no_repeat_ngram_size) for p in rows]
    generator = None
    if config.is_sampling:
        generator = torch.Generator(device=device)
        if config.seed is not None:
            generator.manual_seed(config.seed)
        else:
            generator.seed()

    done = [False] * B
    out: list[list[int]] = [[] for _ in rows]
    for _step in range(steps):
        scores = logits
        if seen is not None:
            scores = sampling.apply_repetition_penalty(scores, seen, config.repetition_penalty)
        if counts is not None:
            scores = sampling.apply_frequency_presence_penalty(scores, counts, config.frequency_penalty,
                                                               config.presence_penalty)
        if bans is not None:
            scores = sampling.ban_tokens_(scores.clone() if scores is logits else scores,
                                          [b.banned() for b in bans])
        if config.is_sampling:
            probs = sampling.warp(scores, config).softmax(dim=-1)
            next_tokens = sampling.sample(probs, generator)
        else:
            next_tokens = sampling.greedy(scores)
        toks = next_tokens.tolist()
        for i, tok in enumerate(toks):
            if done[i]:
                continue
            if tok in eos:
                done[i] = True
                yield Event(i, None, detoks[i].flush() if detoks else "", "eos")
                continue
            out[i].append(tok)
            piece = detoks[i].add(tok) if detoks else ""
            if detoks and detoks[i].stopped:
                done[i] = True
                yield Event(i, tok, piece, None)
                yield Event(i, None, "", "stop")
                continue
            yield Event(i, tok, piece, None)
            if len(out[i]) >= budget[i]:
                done[i] = True
                yield Event(i, None, detoks[i].flush() if detoks else "", "length")
                continue
            if seen is not None:
                seen[i, tok] = True
            if counts is not None:
                counts[i, tok] += 1
            if bans is not None:
                bans[i].append(tok)
        if all(done):
            return
        # Finished rows keep decoding (their tokens are ignored) so the batch shape never changes.
        if mask is None:
            logits = model(next_tokens[:, None], cache=cache)[:, -1].float()
        else:
            logits = model(next_tokens[:, None], positions=pos, attention_mask=mask, cache=cache)[:, -1].float()
            pos += 1


def generate_ids(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    decode: Callable[[list[int]], str] | None = None,
    precision: str | None = None,
) -> list[Completion]:
    """Generate for a batch of prompts (lists of ids); return every completion, prompt-major.

    With `num_return_sequences = n` there are n completions per prompt (`Completion.prompt_index`
    says which). Beam search returns its n best hypotheses, best first. `decode` (ids -> text) is
    needed for stop strings and fills `Completion.text`.

    Args:
        model: a `Transformer`.
        prompts: B lists of token ids (or one flat list for one prompt).
        config: GenerationConfig (greedy, 64 new tokens by default); `eos_ids` None = no EOS.
        decode: optional ids -> text callback.
        precision: None/"fp32" or an `lmsmith.precision` policy for autocast.

    Returns:
        B * num_return_sequences `Completion`s.
    """
    config = config or GenerationConfig()
    if config.strategy == "beam":
        from .beam import beam_search

        if config.stop and decode is None:
            raise LmsmithError("stop strings need a decode callback (ids -> text); pass decode=tokenizer.decode")
        return beam_search(model, prompts, config, decode=decode, precision=precision)
    ids: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    texts: dict[int, list[str]] = {}
    for ev in stream_ids(model, prompts, config, decode=decode, precision=precision):
        if ev.token is not None:
            ids.setdefault(ev.row, []).append(ev.token)
        if ev.text:
            texts.setdefault(ev.row, []).append(ev.text)
        if ev.finish_reason is not None:
            reasons[ev.row] = ev.finish_reason
    n = config.num_return_sequences
    return [Completion(ids=ids.get(r, []), finish_reason=reasons[r],
                       text="".join(texts.get(r, [])) if decode is not None else None, prompt_index=r // n)
            for r in sorted(reasons)]
