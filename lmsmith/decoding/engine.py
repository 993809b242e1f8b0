"""The generation engine on token ids: slots that share one KV cache, stepped by a scheduler.

A fixed number of slots (`max_batch`) share one `KVCache` with a length per row. Requests
arrive at any time (`submit`); each `step()` of the engine

  1. admits waiting requests into free slots (a slot whose cached tokens share a prefix
     with the new prompt, such as the previous turn of a chat, keeps those keys/values),
  2. runs ONE decode forward for every slot that is generating (one new token each),
  3. prefills waiting prompts, at most `prefill_chunk` tokens per step, so a long prompt
     never stalls the running slots for long,
  4. chooses every slot's next token with its own settings and generator (`picker.py`),
  5. ends the slots that finished (EOS, a stop string, their token budget, cancelled);
     their slots take new requests at the next step (continuous batching).

Slots are rows of the cache kept compact: generating slots in rows [0, n) so the decode
forward works on a view without copies; a finished slot's row keeps its tokens for
prompt caching until another request takes it. The engine knows nothing about
tokenization: text appears only through an optional `decode(ids) -> str` callback
(stop strings, streamed text, JSON mode).

`lmsmith.generate`, `generate_stream`, `generate_ids` and `stream_ids` run on this engine
(every row a request); beam search has its own loop (`beam.py`). A sequence never
exceeds the cache's length (the model's context by default): a request that reaches
it ends with finish_reason "length"; a prompt longer than the context is refused.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import LmsmithError
from ..kvcache import PackedStep
from .config import GenerationConfig
from .detokenizer import Detokenizer
from .picker import TokenPicker, pick
from .speculative import (
    MAX_GAMMA,
    START_GAMMA,
    DraftModel,
    PromptLookup,
    draft_choice,
    fork_picker,
    make_drafter,
    next_gamma,
    verify_token,
)

FINISH_REASONS = ("eos", "stop", "length", "cancelled", "error")


@dataclass
class Completion:
    """One generated sequence.

    Attributes:
        ids: the new token ids, without the prompt and without the EOS token. For a stop string,
            up to and including the token that completed it.
        finish_reason: "eos" (an end token), "stop" (a stop string, or JSON mode's object closed),
            or "length" (max_new_tokens or the context limit).
        text: the decoded new text, cut before the stop string (only when a decode callback was given).
        prompt_index: which prompt this continues (several per prompt with num_return_sequences).
        score: beam search's length-penalised log-probability (None for other strategies).
        eos_token: the end token that finished it (finish_reason "eos"), else None.
    """

    ids: list[int]
    finish_reason: str
    text: str | None = None
    prompt_index: int = 0
    score: float | None = None
    eos_token: int | None = None


@dataclass
class Event:
    """One step of one request: a new token (and the text it made printable), or the request's end.

    Attributes:
        row: the request's id (`Engine.submit`'s return value; the row index in `stream_ids`).
        token: the new token id; None on the request's final event (and on a prompt-logprobs event).
        text: newly printable text (may be "").
        finish_reason: set on the final event: "eos", "stop", "length", "cancelled", or "error" (this
            request's own work raised; `text` is the message, the engine and other requests go on).
        logprob: the token's log-probability under the model (raw logits, before penalties and
            temperature), when the request asked for logprobs.
        top_logprobs: the `Request.logprobs` most likely (token id, log-probability) of that step.
        prompt_logprobs: once, right after prefill, for `Request.prompt_logprobs`: one entry per
            prompt token (None for the first, which nothing predicts).
        prompt_top_logprobs: with it, each prompt token's `Request.logprobs` alternatives (None first).
        eos_token: on the final event of a request that ended with an end token, which one.
    """

    row: int
    token: int | None
    text: str = ""
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    eos_token: int | None = None


@dataclass
class Request:
    """What a caller asks the engine for.

    Attributes:
        prompt: the prompt's token ids (at least one).
        config: how to choose tokens and when to stop (`num_return_sequences` is the caller's
            business: submit n requests; give each its own seed).
        logprobs: report each new token's log-probability and this many alternatives (None: off).
        prompt_logprobs: report the prompt tokens' log-probabilities (disables prompt caching).
        json_object: constrain the output to one JSON object (needs the engine's decode callback).
    """

    prompt: list[int]
    config: GenerationConfig = field(default_factory=GenerationConfig)
    logprobs: int | None = None
    prompt_logprobs: bool = False
    json_object: bool = False


class _Seq:
    """A request in a slot: its tokens (cached, plus the one chosen last, not yet cached)."""

    def __init__(self, rid: int, req: Request, picker: TokenPicker, detok: Detokenizer | None, budget: int):
        self.rid, self.req, self.picker, self.detok, self.budget = rid, req, picker, detok, budget
        self.tokens = list(req.prompt)  # prompt + generated
        self.cached = 0  # how many of `tokens` the cache row holds
        self.out: list[int] = []
        self.row = -1
        self.gamma = 0  # draft tokens to propose next (speculative decoding); < 0: steps left in a pause
        self.draft_cached = 0  # how many of `tokens` the draft model's cache row holds

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.req.prompt)


class Engine:
    """Continuous batching over `max_batch` slots of one KV cache (see the module docstring).

    Args:
        model: a `Transformer` (or a wrapper with its interface and `make_cache`).
        max_batch: slots, i.e. requests decoded together; the cache holds max_batch x max_len tokens.
        max_len: tokens per slot, prompt + output (default and at most the model's context).
        decode: ids -> text; needed for stop strings, JSON mode and `Event.text`.
        precision: None/"fp32" or an `lmsmith.precision` policy for autocast.
        prefill_chunk: prompt tokens prefilled per step, packed into one forward with the decode
            rows (a request asking for prompt logprobs is prefilled whole, alone).
        draft: speculative decoding (`speculative.py`): a draft model with the target's vocabulary, or
            "prompt-lookup"; every generating slot then drafts and verifies its own number of tokens.
        draft_tokens: tokens drafted per step (None: adaptive per slot).

    `submit` and `cancel` may be called from any thread; `step` from one thread at a time.
    """

    def __init__(self, model: torch.nn.Module, *, max_batch: int = 8, max_len: int | None = None,
                 decode: Callable[[list[int]], str] | None = None, precision: str | None = None,
                 prefill_chunk: int = 512, draft=None, draft_tokens: int | None = None):
        if max_batch < 1:
            raise LmsmithError(f"max_batch {max_batch} must be >= 1")
        context = model.config.max_seq_len
        self.model, self.max_batch = model, max_batch
        self.max_len = min(max_len or context, context)
        self.decode, self.precision, self.prefill_chunk = decode, precision, max(1, prefill_chunk)
        self.device = model_device(model)
        self.cache = model.make_cache(max_batch, self.max_len)
        if draft_tokens is not None and not 1 <= draft_tokens <= MAX_GAMMA:
            raise LmsmithError(f"draft_tokens {draft_tokens} must be between 1 and {MAX_GAMMA}")
        self.drafter = make_drafter(draft, max_batch, self.max_len, model.config)
        self.draft_tokens = draft_tokens
        self.row_seq: list[_Seq | None] = [None] * max_batch
        self.row_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # a free row's cached tokens
        self.active: list[_Seq] = []
        # counters for metrics: decode_rows / decode_steps is the average decode batch
        # draft_accepted / draft_tokens is the acceptance rate of speculative decoding
        self.stats = {"prompt_tokens": 0, "cached_prompt_tokens": 0, "generated_tokens": 0, "decode_steps": 0,
                      "decode_rows": 0, "draft_tokens": 0, "draft_accepted": 0}
        self._waiting: deque[_Seq] = deque()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._token_text: dict[int, str | None] = {}

    # ---- the caller's side ---------------------------------------------------------------------

    def check(self, req: Request) -> None:
        """Raise LmsmithError if `req` cannot run here (what `submit` would refuse)."""
        c = req.config
        if c.strategy == "beam":
            raise LmsmithError("beam search does not run in the slot engine; use generate_ids / generate")
        if (c.stop or req.json_object) and self.decode is None:
            raise LmsmithError("stop strings and JSON mode need a decode callback (ids -> text)")
        if not req.prompt:
            raise LmsmithError("the prompt is empty; generation needs at least one token")
        if len(req.prompt) > self.max_len:
            raise LmsmithError(f"the prompt has {len(req.prompt)} tokens, more than the context of "
                               f"{self.max_len} tokens; shorten the prompt")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise LmsmithError(f"logprobs {req.logprobs} must be between 0 and 20")

    def submit(self, req: Request) -> int:
        """Queue a request; return its id (the `row` of its events)."""
        self.check(req)
        req.prompt = [int(t) for t in req.prompt]
        budget = min(req.config.max_new_tokens, self.max_len - len(req.prompt))
        picker = TokenPicker(req.config, req.prompt, self.model.config.vocab_size, self.device,
                             self._text_of if req.json_object else None)
        detok = Detokenizer(self.decode, req.config.stop) if self.decode is not None else None
        with self._lock:
            seq = _Seq(next(self._ids), req, picker, detok, budget)
            self._waiting.append(seq)
        return seq.rid

    def cancel(self, rid: int) -> None:
        """Stop a request (waiting or running); it ends with finish_reason "cancelled"."""
        with self._lock:
            self._cancelled.add(rid)

    @property
    def busy(self) -> bool:
        return bool(self.active or self._waiting)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def reset_running(self) -> list[int]:
        """Drop every running request (after a step that raised); return their ids. Waiting ones stay."""
        rids = [s.rid for s in self.active]
        self.active = []
        self.row_seq = [None] * self.max_batch
        self.row_tokens = [[] for _ in range(self.max_batch)]  # nothing cached is trusted any more
        return rids

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Admit, decode one token for every generating slot, prefill, choose, finish.

        A step with prompt tokens to prefill runs them and the decode rows as ONE packed
        forward (`PackedStep`): every linear layer then multiplies all of the step's tokens at
        once. A step with only decode rows runs them as a batch over rows [0, n).
        """
        events: list[Event] = []
        with torch.inference_mode(), _precision_context(self.precision, self.device):
            self._drop_cancelled(events)
            self._admit(events)
            rows, logits = [], []
            decoding = [s for s in self.active if not s.prefilling]
            chunks = self._prefill_plan()
            if chunks:
                self._packed_forward([(s, 1) for s in decoding] + chunks, rows, logits)
            elif decoding and self.drafter is not None:
                self._speculative_step(decoding, events)
            elif decoding:
                self._layout()
                decoding.sort(key=lambda s: s.row)
                ids = torch.tensor([[s.tokens[s.cached]] for s in decoding], device=self.device)
                logits.append(self.model(ids, cache=self.cache.rows(0, len(decoding)))[:, -1].float())
                for s in decoding:
                    s.cached += 1
                rows += decoding
            if decoding:
                self.stats["decode_steps"] += 1
                self.stats["decode_rows"] += len(decoding)
            for s in [s for s in self.active if s.prefilling and s.req.prompt_logprobs]:
                try:  # prompt logprobs need every position's logits: prefilled alone, whole
                    self._prefill(s, rows, logits, events)
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    self._fail(s, e, events)
            if rows:
                self._choose(rows, torch.cat(logits), events)
        return events

    def _prefill_plan(self) -> list[tuple[_Seq, int]]:
        """(request, prompt tokens) to prefill this step: oldest first, `prefill_chunk` tokens in all."""
        plan, budget = [], self.prefill_chunk
        for s in self.active:
            if budget <= 0:
                break
            if s.prefilling and not s.req.prompt_logprobs:
                n = min(len(s.req.prompt) - s.cached, budget)
                plan.append((s, n))
                budget -= n
        return plan

    def _packed_forward(self, segments: list[tuple[_Seq, int]], rows: list, logits: list) -> None:
        """One forward over each request's next n tokens; queue the logits of those now generating."""
        ids = [t for s, n in segments for t in s.tokens[s.cached:s.cached + n]]
        step = PackedStep(self.cache, [(s.row, n) for s, n in segments])
        out = self.model(torch.tensor([ids], device=self.device), cache=step, last_only=True)[0].float()
        for j, (s, n) in enumerate(segments):
            s.cached += n
            if not s.prefilling:
                rows.append(s)
                logits.append(out[j:j + 1])

    # ---- speculative decoding --------------------------------------------------------------------

    def _speculative_step(self, decoding: list[_Seq], events: list[Event]) -> None:
        """Every generating slot drafts its tokens, ONE packed target forward scores them all, each slot
        keeps its accepted prefix and one token of the target's, and both caches roll back."""
        plan = [(s, self._gamma_for(s)) for s in decoding]
        drafts = self._draft([(s, g) for s, g in plan if g > 0])
        segments = [(s, [s.tokens[s.cached], *drafts.get(s.rid, ([], []))[0]]) for s, _ in plan]
        ids = [t for _, seg in segments for t in seg]
        packed = PackedStep(self.cache, [(s.row, len(seg)) for s, seg in segments])
        out = self.model(torch.tensor([ids], device=self.device), cache=packed)[0].float()  # (N, V)
        start = 0
        for s, seg in segments:
            d, qs = drafts.get(s.rid, ([], []))
            try:
                self._verify(s, out[start:start + len(seg)], d, qs, events)
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                self._fail(s, e, events)
            start += len(seg)

    def _gamma_for(self, s: _Seq) -> int:
        """Tokens slot s drafts now: its (adaptive or fixed) gamma within its budget and both caches."""
        if s.req.json_object:
            return 0
        if s.gamma == 0:
            s.gamma = self.draft_tokens or START_GAMMA
        if s.gamma < 0:  # pausing after rejected drafts (the adaptive schedule): count down, then one token
            s.gamma = s.gamma + 1 or 1
            return 0
        n = len(s.tokens)
        room = min(s.budget - len(s.out) - 1, self.max_len - n)
        if isinstance(self.drafter, DraftModel):
            room = min(room, self.drafter.max_len - n)
        return max(0, min(s.gamma, room))

    def _draft(self, work: list[tuple[_Seq, int]]) -> dict[int, tuple[list[int], list]]:
        """request id -> (draft tokens, the distributions they were drawn from)."""
        if isinstance(self.drafter, PromptLookup):
            return {s.rid: (d, [None] * len(d)) for s, g in work if (d := self.drafter.propose(s.tokens, g))}
        if not work:
            return {}
        forks = [fork_picker(s.picker) for s, _ in work]

        def choose(i, logits):
            tok, q = draft_choice(forks[i], logits)
            forks[i].accept(tok)
            return tok, q

        return {s.rid: r for (s, _), r in zip(work, self.drafter.propose(work, choose))}

    def _verify(self, s: _Seq, logits: torch.Tensor, drafts: list[int], qs: list, events: list[Event]) -> None:
        """Walk slot s's positions (logits (1 + gamma, V)): emit accepted drafts, then the target's token."""
        n = len(s.tokens)
        if not drafts:  # nothing drafted (JSON mode, no lookup match, no room): the ordinary choice
            s.cached = n
            self._choose([s], logits[:1], events)
            return
        accepted = 0
        lp = torch.log_softmax(logits, dim=-1) if s.req.logprobs is not None else None
        for i in range(len(drafts) + 1):
            draft = drafts[i] if i < len(drafts) else None
            tok, ok = verify_token(logits[i:i + 1], s.picker, draft, qs[i] if i < len(drafts) else None)
            s.cached = n + i  # the last token and the i drafts accepted so far are valid in the cache
            logprob = top = None
            if lp is not None:
                logprob = float(lp[i, tok])
                if s.req.logprobs > 0:
                    v, j = torch.topk(lp[i], s.req.logprobs)
                    top = list(zip(j.tolist(), v.tolist()))
            self._advance(s, tok, logprob, top, events)
            accepted += ok
            if not ok or s not in self.active:
                break
        self.stats["draft_tokens"] += len(drafts)
        self.stats["draft_accepted"] += accepted
        if s in self.active:
            self.cache.truncate(s.row, s.cached)  # past the first rejection
            if isinstance(self.drafter, DraftModel):
                s.draft_cached = min(s.draft_cached, s.cached)
                self.drafter.truncate(s.row, s.draft_cached)
            if self.draft_tokens is None:
                s.gamma = next_gamma(s.gamma, len(drafts), accepted)

    def _prefill(self, s: _Seq, rows: list, logits: list, events: list[Event]) -> None:
        """Prefill s's whole prompt with every position's logits: its prompt logprobs, then its first token."""
        ids = torch.tensor([s.req.prompt], device=self.device)  # (cached is 0: no prompt reuse for these)
        out = self.model(ids, cache=self.cache.rows(s.row, s.row + 1))[0].float()  # (P, V)
        lp = torch.log_softmax(out[:-1], dim=-1)  # row i predicts prompt token i + 1
        chosen = [None] + lp.gather(1, ids[0, 1:, None]).squeeze(1).tolist()
        top = None
        if s.req.logprobs:
            v, i = torch.topk(lp, min(s.req.logprobs, lp.shape[-1]), dim=-1)
            top = [None] + [list(zip(a, b)) for a, b in zip(i.tolist(), v.tolist())]
        events.append(Event(s.rid, None, prompt_logprobs=chosen, prompt_top_logprobs=top))
        s.cached = len(s.req.prompt)
        rows.append(s)
        logits.append(out[-1:])

    def _choose(self, rows: list[_Seq], logits: torch.Tensor, events: list[Event]) -> None:
        for s in rows:
            s.picker.room = s.budget - len(s.out)
        try:
            tokens: list[int | None] = pick(logits, [s.picker for s in rows])
        except Exception:  # noqa: BLE001 - find the failing request(s): rows are independent
            tokens = [self._pick_one(logits[r:r + 1], s, events) for r, s in enumerate(rows)]
        lp = None
        if any(s.req.logprobs is not None for s in rows):
            lp = torch.log_softmax(logits, dim=-1)
        for r, (s, tok) in enumerate(zip(rows, tokens)):
            if tok is None:  # failed in _pick_one
                continue
            if tok < 0:  # JSON mode: no token can still close the object within the budget
                self._finish(s, "length", events)
                continue
            logprob = top = None
            if lp is not None and s.req.logprobs is not None:
                logprob = float(lp[r, tok])
                if s.req.logprobs > 0:
                    v, i = torch.topk(lp[r], s.req.logprobs)
                    top = list(zip(i.tolist(), v.tolist()))
            try:
                self._advance(s, tok, logprob, top, events)
            except Exception as e:  # noqa: BLE001 - e.g. the decode callback; this request only
                self._fail(s, e, events)

    def _pick_one(self, logits: torch.Tensor, s: _Seq, events: list[Event]) -> int | None:
        try:
            return pick(logits, [s.picker])[0]
        except Exception as e:  # noqa: BLE001
            self._fail(s, e, events)
            return None

    def _fail(self, s: _Seq, error: Exception, events: list[Event]) -> None:
        """End a request whose own work raised: finish_reason "error", the message as its text."""
        if s in self.active:
            self.active.remove(s)
            self.row_seq[s.row] = None
            self.row_tokens[s.row] = []  # its cache row may be half written
        events.append(Event(s.rid, None, f"{type(error).__name__}: {error}", "error"))

    def _advance(self, s: _Seq, tok: int, logprob, top, events: list[Event]) -> None:
        eos = s.req.config.eos_ids or ()
        if tok in eos and s.picker.json is None:
            self._finish(s, "eos", events, eos_token=tok)
            return
        s.out.append(tok)
        s.tokens.append(tok)
        s.picker.accept(tok)
        self.stats["generated_tokens"] += 1
        piece = s.detok.add(tok) if s.detok is not None else ""
        events.append(Event(s.rid, tok, piece, logprob=logprob, top_logprobs=top))
        if s.detok is not None and s.detok.stopped or s.picker.json is not None and s.picker.json.complete:
            self._finish(s, "stop", events, flush=False)
        elif len(s.out) >= s.budget:
            self._finish(s, "length", events)

    def _finish(self, s: _Seq, reason: str, events: list[Event], flush: bool = True,
                eos_token: int | None = None) -> None:
        text = s.detok.flush() if flush and s.detok is not None else ""
        events.append(Event(s.rid, None, text, reason, eos_token=eos_token))
        if s.row >= 0:
            self.active.remove(s)
            self.row_seq[s.row] = None
            self.row_tokens[s.row] = s.tokens[:s.cached]

    # ---- slots ---------------------------------------------------------------------------------

    def _drop_cancelled(self, events: list[Event]) -> None:
        with self._lock:
            if not self._cancelled:
                return
            gone = self._cancelled
            self._cancelled = set()
            kept = [s for s in self._waiting if s.rid not in gone]
            dropped = [s for s in self._waiting if s.rid in gone]
            self._waiting = deque(kept)
        for s in dropped + [s for s in self.active if s.rid in gone]:
            self._finish(s, "cancelled", events, flush=False)

    def _admit(self, events: list[Event]) -> None:
        """Give waiting requests the free rows, each the one whose cached tokens it can reuse most."""
        while len(self.active) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    return
                s = self._waiting.popleft()
            if s.budget <= 0:
                self._finish(s, "length", events)
                continue
            prompt = s.req.prompt
            limit = 0 if s.req.prompt_logprobs else len(prompt) - 1  # the last prompt token makes the logits
            free = [r for r in range(self.max_batch) if self.row_seq[r] is None]
            reuse, row = max((_common_prefix(self.row_tokens[r], prompt, limit), -r) for r in free)
            row = -row
            s.row, s.cached = row, reuse
            self.row_seq[row] = s
            self.row_tokens[row] = []
            self.cache.truncate(row, reuse)
            if isinstance(self.drafter, DraftModel):  # the draft re-reads the prompt (it is cheap)
                self.drafter.truncate(row, 0)
            self.active.append(s)
            self.stats["prompt_tokens"] += len(prompt)
            self.stats["cached_prompt_tokens"] += reuse

    def _layout(self) -> None:
        """Move generating slots into rows [0, n) (one swap per slot out of place)."""
        n = sum(not s.prefilling for s in self.active)
        holes = [r for r in range(n) if self.row_seq[r] is None or self.row_seq[r].prefilling]
        for s, hole in zip([s for s in self.active if not s.prefilling and s.row >= n], holes):
            self._swap(s.row, hole)

    def _swap(self, a: int, b: int) -> None:
        self.cache.swap_rows(a, b)
        if isinstance(self.drafter, DraftModel):
            self.drafter.cache.swap_rows(a, b)
        self.row_seq[a], self.row_seq[b] = self.row_seq[b], self.row_seq[a]
        self.row_tokens[a], self.row_tokens[b] = self.row_tokens[b], self.row_tokens[a]
        for r in (a, b):
            if self.row_seq[r] is not None:
                self.row_seq[r].row = r

    # ---- JSON mode -----------------------------------------------------------------------------

    def _text_of(self, token: int) -> str | None:
        """A token's own text, or None when it is not whole characters (JSON mode skips those)."""
        if token not in self._token_text:
            text = self.decode([token])
            self._token_text[token] = None if "\ufffd" in text else text
        return self._token_text[token]


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n


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
    draft=None,
    draft_tokens: int | None = None,
    stats: dict | None = None,
) -> Iterator[Event]:
    """Generate for a batch of prompts, yielding an `Event` per new token as it is produced.

    Greedy and sampling strategies only (beam search cannot stream: its best hypothesis is only
    known at the end; use `generate_ids`). Every row is one request of an `Engine`, so a row
    decodes exactly as it would alone. With `config.num_return_sequences = n` each prompt is
    repeated n times: row r continues prompt r // n. With a seed s, row r draws with its own
    generator seeded s + r: reproducible, different rows differ, and a row equals a solo run
    seeded s + r.

    Args:
        model: a `Transformer` (anything with `.config`, `make_cache` and the same forward signature).
        prompts: B lists of token ids (a single flat list is one prompt).
        config: the GenerationConfig; `config.eos_ids` must be set here (None means no EOS).
        decode: ids -> text, needed for `config.stop` and to fill `Event.text`.
        precision: None/"fp32", or an `lmsmith.precision` policy ("auto", "bf16", "fp16") for autocast.
        draft: speculative decoding with this draft model (same vocabulary) or "prompt-lookup";
            draft_tokens: tokens drafted per step (None: adaptive). Greedy output is unchanged;
            sampling keeps the target's distribution.
        stats: a dict that receives the engine's counters at the end (generated_tokens, decode_steps,
            draft_tokens, draft_accepted, ...).

    Yields:
        Events in step order; after a row's last token one Event(row, None, text, finish_reason).
    """
    if config.strategy == "beam":
        raise LmsmithError("beam search cannot stream; use generate_ids / generate")
    if config.stop and decode is None:
        raise LmsmithError("stop strings need a decode callback (ids -> text); pass decode=tokenizer.decode")
    context = model.config.max_seq_len
    prompts = check_prompts(prompts, context)
    n = config.num_return_sequences
    rows = [p for p in prompts for _ in range(n)]
    longest = max(len(p) + min(config.max_new_tokens, context - len(p)) for p in rows)
    engine = Engine(model, max_batch=len(rows), max_len=max(1, longest), decode=decode, precision=precision,
                    prefill_chunk=sum(len(p) for p in rows),  # offline: prefill everything in the first step
                    draft=draft, draft_tokens=draft_tokens)
    for r, p in enumerate(rows):
        seed = None if config.seed is None else config.seed + r
        engine.submit(Request(p, config.replace(num_return_sequences=1, seed=seed)))
    try:
        while engine.busy:
            yield from engine.step()
    finally:
        if stats is not None:
            stats.update(engine.stats)


def generate_ids(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    decode: Callable[[list[int]], str] | None = None,
    precision: str | None = None,
    draft=None,
    draft_tokens: int | None = None,
    stats: dict | None = None,
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
        draft, draft_tokens, stats: speculative decoding, as in `stream_ids` (not for beam search).

    Returns:
        B * num_return_sequences `Completion`s.
    """
    config = config or GenerationConfig()
    if config.strategy == "beam":
        from .beam import beam_search

        if config.stop and decode is None:
            raise LmsmithError("stop strings need a decode callback (ids -> text); pass decode=tokenizer.decode")
        if draft is not None:
            raise LmsmithError("speculative decoding (a draft) works with greedy and sampling, not beam search")
        return beam_search(model, prompts, config, decode=decode, precision=precision)
    ids: dict[int, list[int]] = {}
    reasons: dict[int, str] = {}
    ends: dict[int, int | None] = {}
    texts: dict[int, list[str]] = {}
    for ev in stream_ids(model, prompts, config, decode=decode, precision=precision, draft=draft,
                         draft_tokens=draft_tokens, stats=stats):
        if ev.token is not None:
            ids.setdefault(ev.row, []).append(ev.token)
        if ev.text:
            texts.setdefault(ev.row, []).append(ev.text)
        if ev.finish_reason is not None:
            reasons[ev.row], ends[ev.row] = ev.finish_reason, ev.eos_token
    n = config.num_return_sequences
    return [Completion(ids=ids.get(r, []), finish_reason=reasons[r],
                       text="".join(texts.get(r, [])) if decode is not None else None, prompt_index=r // n,
                       eos_token=ends[r])
            for r in sorted(reasons)]
