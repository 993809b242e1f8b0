"""OpenAI's request and response shapes: validate a JSON body, build the engine's requests, format replies.

Nothing here touches the network or the engine's thread. `parse_completion` and
`parse_chat` turn a body into a `Job` (prompts as ids, one `GenerationConfig` per
choice, the logprobs/echo/JSON options) or raise `ApiError`, which the app answers
as `{"error": {"message", "type", "param", "code"}}` with its HTTP status.
The `*_response` / `*_chunk` functions build the replies from finished choices.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..decoding.config import GenerationConfig
from ..errors import LmsmithError

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 4


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One API call: its prompts (ids) and, per choice, the engine settings.

    `choices[i]` continues `prompts[i // n]`; `prompt_texts` are the prompts as text (echo,
    text offsets).
    """

    kind: str  # "completion" or "chat"
    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    configs: list[GenerationConfig]
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # alternatives per token; None = no logprobs
    echo: bool = False
    json_object: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


# ---- field readers ------------------------------------------------------------------------------

def number(body: dict, name: str, default, lo=None, hi=None, lo_open=False, integer=False):
    v = body.get(name, default)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)) \
            or not math.isfinite(v):
        raise ApiError(f"'{name}' must be {kind}, got {v!r}", param=name)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ApiError(f"'{name}' is {v}; it must be {'>' if lo_open else '>='} {lo}", param=name)
    if hi is not None and v > hi:
        raise ApiError(f"'{name}' is {v}; it must be <= {hi}", param=name)
    return v


def flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(f"'{name}' must be a boolean, got {v!r}", param=name)
    return v


def _stop(body: dict) -> list[str] | None:
    v = body.get("stop")
    if v is None:
        return None
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError("'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP:
        raise ApiError(f"'stop' has {len(stops)} strings; at most {MAX_STOP} are allowed", param="stop")
    return [s for s in stops if s] or None


def check_model(body: dict, served: str) -> None:
    name = body.get("model")
    if not isinstance(name, str):
        raise ApiError("'model' is required: a string naming the model (see GET /v1/models)", param="model")
    if name != served:
        raise ApiError(f"The model '{name}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")


def sampling_configs(body: dict, n: int, max_tokens: int, eos_ids: list[int]) -> list[GenerationConfig]:
    """One GenerationConfig per choice from OpenAI's sampling fields and the extra ones
    (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`). Temperature 0 is greedy; choice j
    gets seed + j."""
    temperature = number(body, "temperature", 1.0, lo=0, hi=2)
    top_p = number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)
    top_k = number(body, "top_k", None, integer=True)
    if top_k is not None and top_k < 1:  # vLLM's -1 / llama.cpp's 0 mean "off"
        top_k = None
    min_p = number(body, "min_p", 0.0, lo=0, hi=1)
    rep = number(body, "repetition_penalty", 1.0, lo=0, lo_open=True)
    freq = number(body, "frequency_penalty", 0.0, lo=-2, hi=2)
    pres = number(body, "presence_penalty", 0.0, lo=-2, hi=2)
    seed = number(body, "seed", None, integer=True)
    if flag(body, "ignore_eos"):  # vLLM's and llama.cpp's extra field: exactly max_tokens (benchmarks)
        eos_ids = []
    greedy = temperature == 0
    if greedy and n > 1:
        raise ApiError("'n' > 1 needs sampling: greedy decoding (temperature 0) gives n identical choices",
                       param="n")
    base = dict(strategy="greedy" if greedy else "sample", temperature=temperature if not greedy else 1.0,
                repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres, max_new_tokens=max_tokens,
                stop=_stop(body), eos_ids=eos_ids)
    if not greedy:
        base.update(top_k=top_k, top_p=top_p if top_p < 1 else None, min_p=min_p or None)
    try:
        return [GenerationConfig(**base, seed=None if seed is None else seed + j) for j in range(n)]
    except LmsmithError as e:
        raise ApiError(str(e)) from None


def read_counts(body: dict, default_max: int | None, cap: int, echo: bool) -> tuple[int, int]:
    """(n, max_tokens): validated, max_tokens capped by the server's --max-tokens."""
    n = number(body, "n", 1, lo=1, hi=MAX_N, integer=True)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, name, default_max, lo=0 if echo else 1, integer=True)
    return n, min(cap, max_tokens if max_tokens is not None else cap)


def response_format(body: dict) -> bool:
    """True for {"type": "json_object"}; "text" or absent is False."""
    rf = body.get("response_format")
    if rf is None:
        return False
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return False
    if kind == "json_object":
        return True
    raise ApiError(f"response_format type {kind!r} is not supported; use 'text' or 'json_object'",
                   param="response_format")


def stream_options(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise ApiError("'stream_options' must be an object", param="stream_options")
    return bool(opts.get("include_usage", False))


# ---- messages -----------------------------------------------------------------------------------

ROLES = ("system", "developer", "user", "assistant", "tool")


def read_messages(body: dict) -> list[dict]:
    """The chat messages as {"role", "content": str}; content parts of type text are joined."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' is required: a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(f"messages[{i}] needs a 'role' among {', '.join(ROLES)}", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(f"messages[{i}].content must be a string or a list of text parts",
                           param=f"messages[{i}].content")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


# ---- replies ------------------------------------------------------------------------------------

@dataclass
class Choice:
    """What the engine produced for one choice: text, tokens with logprobs, finish reason."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top: list | None = None
    finish_reason: str | None = None


def finish_reason(reason: str | None) -> str | None:
    """Ours -> OpenAI's: an end token is "stop" too."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(token_text, tokens: list[int], lps: list, tops: list, offset: int) -> dict:
    """The completions API's logprobs object for `tokens`, text offsets counted from `offset`."""
    texts = [token_text(t) for t in tokens]
    offsets, pos = [], offset
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    top = [None if alts is None else {token_text(i): lp for i, lp in alts} for alts in tops]
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(token_text, tokens: list[int], lps: list[float], tops: list) -> dict:
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""
    def entry(i: int, lp: float) -> dict:
        text = token_text(i)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for tok, lp, alts in zip(tokens, lps, tops):
        content.append({**entry(tok, lp), "top_logprobs": [entry(i, a) for i, a in (alts or [])]})
    return {"content": content, "refusal": None}


def completion_choice(job: Job, index: int, c: Choice, token_text) -> dict:
    text = c.text
    logprobs = None
    p = index // job.n
    if job.echo:
        text = job.prompt_texts[p] + text
    if job.logprobs is not None:
        tops = c.top if job.logprobs > 0 else [None] * len(c.tokens)
        if job.echo:
            prompt = job.prompts[p]
            ptop = c.prompt_top if c.prompt_top is not None else [None] * len(prompt)
            logprobs = completion_logprobs(token_text, prompt + c.tokens, list(c.prompt_logprobs or []) + c.logprobs,
                                           ptop + tops, 0)
        else:
            logprobs = completion_logprobs(token_text, c.tokens, c.logprobs, tops, len(job.prompt_texts[p]))
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(c.finish_reason)}


def completion_response(job: Job, model: str, choices: list[Choice], token_text) -> dict:
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": model,
            "choices": [completion_choice(job, i, c, token_text) for i, c in enumerate(choices)],
            "usage": usage(sum(len(p) for p in job.prompts), sum(len(c.tokens) for c in choices))}


def chat_response(job: Job, model: str, choices: list[Choice], token_text) -> dict:
    out = []
    for i, c in enumerate(choices):
        lp = chat_logprobs(token_text, c.tokens, c.logprobs, c.top) if job.logprobs is not None else None
        out.append({"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": lp, "finish_reason": finish_reason(c.finish_reason)})
    return {"id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": job.created, "model": model,
            "choices": out, "usage": usage(sum(len(p) for p in job.prompts), sum(len(c.tokens) for c in choices)),
            "system_fingerprint": None}


def chunk(job: Job, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    """One server-sent event's object for either API."""
    chat = job.kind == "chat"
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": job.created, "model": model, "choices": choices}
    if chat:
        body["system_fingerprint"] = None
    if job.include_usage:
        body["usage"] = usage_
    return body


def choice_delta(job: Job, index: int, text: str, tokens: list[int], lps: list[float], tops: list,
                 finish: str | None, token_text, first: bool = False, offset: int = 0) -> dict:
    """A streamed choice: the chat `delta` or the completions `text`, with this piece's logprobs."""
    reason = finish_reason(finish)
    if job.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
            {"content": text} if text or not reason else {})
        lp = chat_logprobs(token_text, tokens, lps, tops) if job.logprobs is not None and tokens else None
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
    lp = None
    if job.logprobs is not None and tokens:
        lp = completion_logprobs(token_text, tokens, lps, tops if job.logprobs > 0 else [None] * len(tokens), offset)
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}
