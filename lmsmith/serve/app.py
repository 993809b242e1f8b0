"""The HTTP side: an OpenAI-compatible API, health, metrics and the chat page, as a FastAPI app.

    GET  /                     the chat page (static/index.html; no network needed)
    GET  /health               {"status": "ok"}
    GET  /metrics              Prometheus text
    GET  /v1/models            the served model
    POST /v1/completions       prompt(s) -> text, logprobs, echo, streaming
    POST /v1/chat/completions  messages (the model's chat template) -> reply, logprobs, JSON mode, streaming

Every error is `{"error": {"message", "type", "param", "code"}}` with its status: 400 for
bad input, 401 for a missing or wrong API key, 413 for a body over `MAX_BODY`, 429 when
the queue is full, 500 if a request fails inside the engine (only that request).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..decoding import encode_chat, encode_prompt
from ..decoding.engine import Request as EngineRequest
from ..errors import LmsmithError
from . import protocol as P
from .protocol import ApiError, Choice, Job
from .worker import QueueFull, Worker

MAX_BODY = 4 * 2**20  # bytes of JSON per request
PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass
class Served:
    """What the app serves: the model's tokenizer and engine worker, and the server's limits."""

    tokenizer: object
    worker: Worker
    name: str
    context: int
    max_tokens: int
    api_key: str | None = None


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="lmsmith", docs_url=None, redoc_url=None, openapi_url=None)
    tok = served.tokenizer
    eos_ids = list(getattr(tok, "eos_ids", None) or ([tok.eos_id] if tok.eos_id is not None else []))
    token_text = functools.lru_cache(maxsize=None)(lambda i: tok.decode([i]))
    page = PAGE.read_text(encoding="utf-8")

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return JSONResponse(ApiError(str(e.detail), e.status_code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, e):
        err = ApiError(f"internal error: {type(e).__name__}: {e}", 500, type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if served.api_key and request.url.path.startswith(("/v1", "/metrics")):
            given = request.headers.get("authorization", "")
            scheme, _, key = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip(), served.api_key):
                err = ApiError("Incorrect or missing API key: send 'Authorization: Bearer <key>' with the key "
                               "given to `lmsmith serve --api-key`", 401, code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(served.worker.metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": int(time.time()), "owned_by": "lmsmith",
                "max_model_len": served.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != served.name:
            raise ApiError(f"The model '{name}' does not exist", 404, param="model", code="model_not_found")
        return model_card()

    def check_length(ids: list[int], param: str) -> None:
        if len(ids) > served.context:
            raise ApiError(f"This model's maximum context length is {served.context} tokens, but the request "
                           f"has {len(ids)} tokens of {param}; shorten it", param=param, code="context_length_exceeded")

    def completion_job(body: dict) -> Job:
        P.check_model(body, served.name)
        if body.get("suffix") is not None:
            raise ApiError("'suffix' is not supported", param="suffix")
        echo = P.flag(body, "echo")
        logprobs = P.number(body, "logprobs", None, lo=0, hi=P.MAX_LOGPROBS, integer=True)
        n, max_tokens = P.read_counts(body, 16, served.max_tokens, echo)
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or len(prompt) * n > P.MAX_N * 4:
            raise ApiError(f"'prompt' must be a string, a list of strings or token ids (at most {P.MAX_N * 4} "
                           f"choices in all)", param="prompt")
        ids, texts = [], []
        for p in prompt:
            if isinstance(p, str):
                ids.append(encode_prompt(tok, p))
                texts.append(p)
            elif isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < len(tok) for t in p):
                ids.append(list(p))
                texts.append(tok.decode(p))
            else:
                raise ApiError("each prompt must be a string or a non-empty list of token ids", param="prompt")
            check_length(ids[-1], "prompt")
        configs = P.sampling_configs(body, n, max_tokens, eos_ids)
        return Job("completion", ids, texts, n, [c for _ in ids for c in configs], stream=P.flag(body, "stream"),
                   include_usage=P.stream_options(body), logprobs=logprobs, echo=echo)

    def chat_job(body: dict) -> Job:
        P.check_model(body, served.name)
        messages = P.read_messages(body)
        try:
            ids = encode_chat(tok, messages)
        except LmsmithError as e:
            raise ApiError(f"the chat template failed on these messages: {e}", param="messages") from None
        check_length(ids, "messages")
        n, max_tokens = P.read_counts(body, None, served.max_tokens, False)
        want = P.flag(body, "logprobs")
        top = P.number(body, "top_logprobs", None, lo=0, hi=P.MAX_LOGPROBS, integer=True)
        if top is not None and not want:
            raise ApiError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        configs = P.sampling_configs(body, n, max_tokens, eos_ids)
        return Job("chat", [ids], [""], n, configs, stream=P.flag(body, "stream"),
                   include_usage=P.stream_options(body), logprobs=(top or 0) if want else None,
                   json_object=P.response_format(body))

    def submit(job: Job, queue: asyncio.Queue) -> list[int]:
        reqs = [EngineRequest(job.prompts[i // job.n], c, logprobs=job.logprobs,
                              prompt_logprobs=job.echo and job.logprobs is not None, json_object=job.json_object)
                for i, c in enumerate(job.configs)]
        try:
            return served.worker.submit(reqs, asyncio.get_running_loop(), queue)
        except LmsmithError as e:
            raise ApiError(str(e)) from None
        except QueueFull as e:
            raise ApiError(str(e), 429, type="rate_limit_error", code="queue_full") from None

    async def handle(request: Request, make_job):
        job = make_job(await read_json(request))
        queue: asyncio.Queue = asyncio.Queue()
        rids = submit(job, queue)
        if job.stream:
            return StreamingResponse(stream(job, rids, queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await collect(request, rids, queue)
        build = P.chat_response if job.kind == "chat" else P.completion_response
        return build(job, served.name, choices, token_text)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, completion_job)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat_job)

    async def collect(request: Request, rids: list[int], queue: asyncio.Queue) -> list[Choice]:
        index = {rid: i for i, rid in enumerate(rids)}
        choices = [Choice() for _ in rids]
        pending = set(rids)
        try:
            while pending:
                try:
                    rid, ev = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return choices
                    continue
                if isinstance(ev, Exception):
                    raise ApiError(f"generation failed: {type(ev).__name__}: {ev}", 500, type="server_error")
                _apply(choices[index[rid]], ev)
                if ev.finish_reason is not None:
                    pending.discard(rid)
            return choices
        finally:
            if pending:
                served.worker.cancel(list(pending))

    async def stream(job: Job, rids: list[int], queue: asyncio.Queue):
        index = {rid: i for i, rid in enumerate(rids)}
        choices = [Choice() for _ in rids]
        offsets = [0 if job.echo else len(job.prompt_texts[i // job.n]) for i in range(len(rids))]
        pending = set(rids)
        try:
            for i in range(len(rids)):
                if job.kind == "chat":
                    yield _sse(P.chunk(job, served.name, [P.choice_delta(job, i, "", [], [], [], None, token_text,
                                                                         first=True)]))
                elif job.echo and job.logprobs is None:
                    yield _sse(P.chunk(job, served.name, [P.choice_delta(job, i, job.prompt_texts[i // job.n], [],
                                                                         [], [], None, token_text)]))
            while pending:
                rid, ev = await queue.get()
                if isinstance(ev, Exception):
                    err = ApiError(f"generation failed: {type(ev).__name__}: {ev}", 500, type="server_error")
                    yield _sse(err.body())
                    break
                i = index[rid]
                c = choices[i]
                _apply(c, ev)
                if ev.prompt_logprobs is not None:  # echo with logprobs: the prompt first, with its logprobs
                    prompt = job.prompts[i // job.n]
                    piece = P.choice_delta(job, i, job.prompt_texts[i // job.n], prompt, ev.prompt_logprobs,
                                           ev.prompt_top_logprobs or [None] * len(prompt), None, token_text)
                    offsets[i] += sum(len(token_text(t)) for t in prompt)
                    yield _sse(P.chunk(job, served.name, [piece]))
                    continue
                tokens = [ev.token] if ev.token is not None else []
                lps = [ev.logprob] if tokens else []
                tops = [ev.top_logprobs] if tokens else []
                piece = P.choice_delta(job, i, ev.text, tokens, lps, tops, ev.finish_reason, token_text,
                                       offset=offsets[i])
                offsets[i] += sum(len(token_text(t)) for t in tokens)
                yield _sse(P.chunk(job, served.name, [piece]))
                if ev.finish_reason is not None:
                    pending.discard(rid)
            else:
                if job.include_usage:
                    total = P.usage(sum(len(p) for p in job.prompts), sum(len(c.tokens) for c in choices))
                    yield _sse(P.chunk(job, served.name, [], total))
            yield "data: [DONE]\n\n"
        finally:
            if pending:  # the client went away (or the request failed): free its slots
                served.worker.cancel(list(pending))

    return app


def _apply(c: Choice, ev) -> None:
    """Fold one engine event into a choice."""
    if ev.prompt_logprobs is not None:
        c.prompt_logprobs, c.prompt_top = ev.prompt_logprobs, ev.prompt_top_logprobs
        return
    c.text += ev.text
    if ev.token is not None:
        c.tokens.append(ev.token)
        c.logprobs.append(ev.logprob)
        c.top.append(ev.top_logprobs)
    if ev.finish_reason is not None:
        c.finish_reason = ev.finish_reason


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def read_json(request: Request) -> dict:
    """The body as a JSON object, read no further than MAX_BODY bytes."""
    size, parts = 0, []
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY:
            raise ApiError(f"the request body is larger than {MAX_BODY // 2**20} MiB", 413)
        parts.append(part)
    try:
        body = json.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    return body
