"""Instruction and preference data: formats, chat-template rendering, loss masking, packing, batches.

    read_examples(path, format=None, skip_bad=False) -> (examples, ReadStats)
    encode_sft(examples, tokenizer, seq_len) -> (items, EncodeStats)       items: {"input_ids", "labels"}
    encode_preference(examples, tokenizer, seq_len) -> (items, EncodeStats)
    pack(items, seq_len) -> items                                          several examples per row
    InstructBatches(items, batch_size, seed=, pad_id=)                     shuffled, resumable batches

Formats (one JSON object per JSONL line, or a JSON array of objects), detected from
the first record unless `format` says which:

    solution     {"instruction", "solution"}
    alpaca       {"instruction", "input", "output"}          (input may be empty)
    chat         {"messages": [{"role", "content"}, ...]}    every assistant turn is a response
    completion   {"prompt", "completion"}
    preference   {"prompt", "chosen", "rejected"}             for DPO

Every SFT example becomes a list of chat messages rendered with the tokenizer's
chat template. The loss covers exactly the assistant turns: the tokens of each
response plus the end-of-turn token that follows it (so the model learns to
stop); the prompt, the template's role headers and whatever the template writes
after the end-of-turn token (ChatML's newline) are masked with -100.

Labels are already shifted, as the training loop expects: `labels[t]` is the
target for `input_ids[t]`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LmsmithError

IGNORE_INDEX = -100
FORMATS = ("solution", "alpaca", "chat", "completion", "preference")
# Keys that identify each format (a record must have all of them).
_KEYS = {
    "preference": ("prompt", "chosen", "rejected"),
    "alpaca": ("instruction", "input", "output"),
    "solution": ("instruction", "solution"),
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
}
# Detection order: the most specific key sets first (alpaca before solution, preference before completion).
_DETECT_ORDER = ("preference", "alpaca", "solution", "chat", "completion")


# ---- reading ----------------------------------------------------------------------------------


@dataclass
class ReadStats:
    """What `read_examples` saw: the format used, records read, malformed lines skipped."""

    format: str
    examples: int = 0
    bad_lines: int = 0
    first_bad: str | None = None  # "file:line: why" of the first skipped line


def detect_format(record: dict) -> str | None:
    """The format whose keys `record` has (most specific first), or None."""
    if not isinstance(record, dict):
        return None
    for name in _DETECT_ORDER:
        if all(k in record for k in _KEYS[name]):
            return name
    return None


def _content(value, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _prompt_messages(prompt) -> list[dict]:
    """A preference/completion prompt: a string (one user turn) or a list of chat messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return _check_messages(prompt, need_assistant=False)
    raise ValueError(f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}")


def _check_messages(messages, need_assistant: bool) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        out.append({"role": _content(m["role"], f"messages[{i}].role"),
                    "content": _content(m["content"], f"messages[{i}].content")})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise ValueError("the conversation has no assistant turn to learn from")
    return out


def normalize(record: dict, fmt: str) -> dict:
    """One record of format `fmt` as {"messages": [...]} (SFT) or {"prompt": [...], "chosen", "rejected"}.

    Raises ValueError (with the reason) when the record does not fit the format.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in _KEYS[fmt] if k not in record]
    if missing:
        raise ValueError(f"format '{fmt}' needs keys {', '.join(_KEYS[fmt])}; missing {', '.join(missing)}")
    extra = {k: record[k] for k in ("task",) if k in record}  # kept for per-task accuracy
    if fmt == "solution":
        msgs = [{"role": "user", "content": _content(record["instruction"], "'instruction'")},
                {"role": "assistant", "content": _content(record["solution"], "'solution'")}]
    elif fmt == "alpaca":
        inp = _content(record["input"] or "", "'input'")
        user = _content(record["instruction"], "'instruction'") + (f"\n\n{inp}" if inp.strip() else "")
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": _content(record["output"], "'output'")}]
    elif fmt == "chat":
        msgs = _check_messages(record["messages"], need_assistant=True)
    elif fmt == "completion":
        msgs = [*_prompt_messages(record["prompt"]),
                {"role": "assistant", "content": _content(record["completion"], "'completion'")}]
    else:  # preference
        return {"prompt": _prompt_messages(record["prompt"]), "chosen": _content(record["chosen"], "'chosen'"),
                "rejected": _content(record["rejected"], "'rejected'"), **extra}
    return {"messages": msgs, **extra}


def records(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """(line number, parsed JSON or None, error) for each record of a JSONL file or JSON array.

    A line that is not UTF-8 text is an error of that line (so --skip-bad can skip it)."""
    from ..fileio import check_regular_file

    check_regular_file(path, "data file")
    raw = path.read_bytes()
    if raw.lstrip().startswith(b"["):
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield raw.count(b"\n", 0, e.start) + 1, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x})"
            return
        except json.JSONDecodeError as e:
            yield e.lineno, None, f"not valid JSON ({e.msg})"
            return
        for i, rec in enumerate(data, 1):
            yield i, rec, None  # an array has no lines per record: number the records
        return
    for lineno, chunk in enumerate(raw.split(b"\n"), 1):
        try:
            line = chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, None, f"not UTF-8 text (byte 0x{chunk[e.start]:02x} at column {e.start + 1})"
            continue
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line), None
        except json.JSONDecodeError as e:
            yield lineno, None, f"not valid JSON ({e.msg})"


def read_examples(path: str | os.PathLike, format: str | None = None,
                  skip_bad: bool = False) -> tuple[list[dict], ReadStats]:
    """Read instruction or preference data; every record normalised (see `normalize`).

    Args:
        path: a .jsonl file (one object per line) or a .json file holding an array of objects.
        format: one of FORMATS; None detects it from the first well-formed record.
        skip_bad: skip and count malformed records instead of raising.

    Returns:
        (examples, stats). SFT examples are {"messages": [...]} (+ "task" when present);
        preference examples are {"prompt": [...messages], "chosen": str, "rejected": str}.

    Raises:
        LmsmithError: naming the file and line of the first malformed record (without skip_bad),
            for a missing/empty file, or when `format` is unknown.
    """
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise LmsmithError(f"unknown data format {format!r}; choose one of: {', '.join(FORMATS)}")
    if not path.is_file():
        raise LmsmithError(f"{path}: no such data file")
    stats = ReadStats(format=format or "")
    examples: list[dict] = []
    fmt = format
    for lineno, rec, err in records(path):
        if err is None:
            if fmt is None:
                fmt = detect_format(rec)
                if fmt is None:
                    keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
                    err = (f"cannot tell the format from keys ({keys}); expected one of "
                           + "; ".join(f"{n}: {', '.join(_KEYS[n])}" for n in FORMATS)
                           + " (or pass --format)")
            if err is None:
                try:
                    examples.append(normalize(rec, fmt))
                    continue
                except ValueError as e:
                    err = str(e)
                    if format is not None and not examples and detect_format(rec) not in (None, format):
                        err += f" (the record looks like format '{detect_format(rec)}'; check --format)"
        where = f"{path}:{lineno}: {err}"
        if not skip_bad:
            raise LmsmithError(f"{where}; fix the record or pass --skip-bad to skip malformed records")
        stats.bad_lines += 1
        stats.first_bad = stats.first_bad or where
    if not examples:
        why = f" ({stats.bad_lines} malformed, first: {stats.first_bad})" if stats.bad_lines else ""
        raise LmsmithError(f"{path}: no usable examples{why}")
    stats.format = fmt or ""
    stats.examples = len(examples)
    return examples, stats


# ---- rendering and masking --------------------------------------------------------------------


def render_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the chat-template rendering of `messages` into (text, is_response) pieces.

    A response piece is what the template adds for an assistant turn after the generation
    prompt of the turns before it: `render(m[:i+1])` minus `render(m[:i], add_generation_prompt=True)`,
    i.e. the content plus the end-of-turn marker (and whatever the template writes after it).
    So training sees exactly the prompt that generation will see.

    Raises:
        LmsmithError: when the template does not render conversations as growing prefixes
            (e.g. one that rewrites earlier turns), so the response cannot be located.
    """
    full = tokenizer.apply_chat_template(messages)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= done):
            raise LmsmithError("the chat template does not render conversations as growing prefixes, so "
                               "assistant turns cannot be located for loss masking; use a ChatML-style template")
        pieces.append((full[done:len(before)], False))
        pieces.append((upto[len(before):], True))
        done = len(upto)
    pieces.append((full[done:], False))
    return [(t, r) for t, r in pieces if t]


def tokenize_messages(tokenizer, messages: list[dict], max_tokens: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is a response target.

    Within a response piece the targets run up to and including the first end-of-turn token
    (`tokenizer.eos_ids`); what the template adds after it (ChatML's "\\n") is not a target.
    If a response piece has no end-of-turn token, the tokenizer's eos is appended as its target.
    With `max_tokens`, a long conversation is encoded only until that many ids exist (the result then
    holds at least `max_tokens`), so a 49 MB answer costs no more memory than the context needs.
    """
    segs = render_segments(tokenizer, messages)
    if max_tokens is not None and sum(len(t) for t, _ in segs) > max_tokens * 4:
        encoded, have = [], 0
        for t, _ in segs:  # one segment at a time, each only as far as still needed
            if have >= max_tokens:
                break
            encoded.append(tokenizer.encode(t, max_tokens=max_tokens - have))
            have += len(encoded[-1])
        segs = segs[:len(encoded)]
    else:
        encoded = tokenizer.encode_batch([t for t, _ in segs])
    ends = set(getattr(tokenizer, "eos_ids", None) or [])
    ids: list[int] = []
    target: list[bool] = []
    for (_, is_resp), toks in zip(segs, encoded):
        if not is_resp:
            ids += toks
            target += [False] * len(toks)
            continue
        stop = next((j for j, t in enumerate(toks) if t in ends), None)
        if stop is None and tokenizer.eos_id is not None:
            toks, stop = [*toks, tokenizer.eos_id], len(toks)
        n_tgt = len(toks) if stop is None else stop + 1
        ids += toks
        target += [True] * n_tgt + [False] * (len(toks) - n_tgt)
    return ids, target


def _shift(ids: list[int], target: list[bool]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels[t] = ids[t+1] where that token is a target, else -100."""
    return ids[:-1], [t if m else IGNORE_INDEX for t, m in zip(ids[1:], target[1:])]


@dataclass
class EncodeStats:
    """Counts from encoding: examples kept, truncated, dropped (nothing left to learn after truncation)."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    target_tokens: int = 0
    longest: int = 0

    def describe(self) -> str:
        return (f"{self.examples:,} examples, {self.tokens:,} tokens ({self.target_tokens:,} trained on); "
                f"{self.truncated:,} truncated to the context, {self.dropped:,} dropped (no response left)")


def encode_sft(examples: Sequence[dict], tokenizer, seq_len: int) -> tuple[list[dict], EncodeStats]:
    """SFT examples -> items {"input_ids": list[int], "labels": list[int]} of at most `seq_len` tokens.

    Longer conversations are cut at the end (counted in `truncated`); one whose responses
    were cut away completely is dropped (counted in `dropped`).
    """
    items, stats = [], EncodeStats()
    for ex in examples:
        # seq_len + 2: more ids than fit, so a conversation cut short while encoding counts as truncated
        ids, target = tokenize_messages(tokenizer, ex["messages"], max_tokens=seq_len + 2)
        stats.longest = max(stats.longest, len(ids) - 1)
        if len(ids) > seq_len + 1:
            ids, target = ids[: seq_len + 1], target[: seq_len + 1]
            stats.truncated += 1
        inp, lab = _shift(ids, target)
        n_tgt = sum(t != IGNORE_INDEX for t in lab)
        if n_tgt == 0:
            stats.dropped += 1
            continue
        items.append({"input_ids": inp, "labels": lab})
        stats.examples += 1
        stats.tokens += len(inp)
        stats.target_tokens += n_tgt
    return items, stats


def encode_preference(examples: Sequence[dict], tokenizer,
                      seq_len: int) -> tuple[list[dict], EncodeStats]:
    """Preference examples -> items {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}.

    Each side is the prompt plus that response (with its end-of-turn token as a target);
    a pair where either side loses its whole response to truncation is dropped.
    """
    items, stats = [], EncodeStats()
    for ex in examples:
        item, cut = {}, False
        for side in ("chosen", "rejected"):
            msgs = [*ex["prompt"], {"role": "assistant", "content": ex[side]}]
            ids, target = tokenize_messages(tokenizer, msgs)
            stats.longest = max(stats.longest, len(ids) - 1)
            if len(ids) > seq_len + 1:
                ids, target, cut = ids[: seq_len + 1], target[: seq_len + 1], True
            item[f"{side}_ids"], item[f"{side}_labels"] = _shift(ids, target)
        stats.truncated += cut
        n = [sum(t != IGNORE_INDEX for t in item[f"{s}_labels"]) for s in ("chosen", "rejected")]
        if min(n) == 0:
            stats.dropped += 1
            continue
        items.append(item)
        stats.examples += 1
        stats.tokens += len(item["chosen_ids"]) + len(item["rejected_ids"])
        stats.target_tokens += sum(n)
    return items, stats


def pack(items: Sequence[dict], seq_len: int) -> list[dict]:
    """Concatenate consecutive SFT items into rows of at most `seq_len` tokens (next-fit, in order).

    Items are joined as (input_ids, labels) pairs that are already shifted, so a label never
    spans two examples: the last position of one example predicts that example's own last
    token, never the next example's first. Attention DOES cross example boundaries inside a
    row (no block-diagonal mask): later examples see earlier ones as extra context. For short,
    independent examples this costs little and saves most of the padding.
    """
    rows: list[dict] = []
    cur_i: list[int] = []
    cur_l: list[int] = []
    for it in items:
        if cur_i and len(cur_i) + len(it["input_ids"]) > seq_len:
            rows.append({"input_ids": cur_i, "labels": cur_l})
            cur_i, cur_l = [], []
        cur_i = cur_i + list(it["input_ids"])
        cur_l = cur_l + list(it["labels"])
    if cur_i:
        rows.append({"input_ids": cur_i, "labels": cur_l})
    return rows


# ---- batches ----------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The permutation of item indices for `epoch`: a pure function of (seed, epoch)."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63))
    return torch.randperm(n, generator=g).tolist()


@dataclass
class InstructBatches:
    """Endless, shuffled, right-padded batches over encoded items, resumable exactly.

    Each epoch visits every item once in the order `epoch_order(n, seed, epoch)`; the last
    batch of an epoch may be smaller. `state_dict()` is (epoch, position), so a resumed run
    sees the same batches as an uninterrupted one.

    Batches: for SFT items {"input_ids": (B, T) long, "labels": (B, T) long}; for preference
    items {"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"}, each (B, T_side).
    Keys ending in "labels" are padded with -100, the others with `pad_id`; T is the longest
    row of the batch (not the context), which saves compute on short examples.
    """

    items: list[dict]
    batch_size: int
    seed: int = 0
    pad_id: int = 0
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.items:
            raise LmsmithError("no training examples left after encoding; check the data and --seq-len")
        if self.batch_size < 1:
            raise LmsmithError(f"batch size {self.batch_size} must be >= 1")
        self._order = epoch_order(len(self.items), self.seed, self.epoch)

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.items) // self.batch_size)

    def __iter__(self) -> InstructBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self.items):
            self.epoch += 1
            self.position = 0
            self._order = epoch_order(len(self.items), self.seed, self.epoch)
        idx = self._order[self.position:self.position + self.batch_size]
        self.position += len(idx)
        return collate([self.items[i] for i in idx], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": len(self.items)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n", len(self.items)) != len(self.items):
            raise LmsmithError(f"the checkpoint's data had {state['n']} items, this data has {len(self.items)}; "
                               "resume with the same data, --seq-len and --pack")
        self.seed = state.get("seed", self.seed)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = epoch_order(len(self.items), self.seed, self.epoch)


def collate(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad each key of `items` to its longest row: labels with -100, masks with 0, ids with `pad_id`."""
    out = {}
    for key in items[0]:
        width = max(len(it[key]) for it in items)
        fill = IGNORE_INDEX if key.endswith("labels") else 0 if key.endswith("mask") else pad_id
        t = torch.full((len(items), width), fill, dtype=torch.long)
        for r, it in enumerate(items):
            t[r, : len(it[key])] = torch.tensor(it[key], dtype=torch.long)
        out[key] = t
    return out


def pad_id_of(tokenizer) -> int:
    """The id used for padding: pad, else eos, else 0 (padded positions carry no loss either way)."""
    for i in (tokenizer.pad_id, tokenizer.eos_id):
        if i is not None:
            return int(i)
    return 0


def prompt_and_answer(example: dict) -> tuple[list[dict], str]:
    """(messages before the last assistant turn, that turn's content) of an SFT or preference example."""
    if "messages" in example:
        msgs = example["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], msgs[last]["content"]
    return example["prompt"], example["chosen"]
