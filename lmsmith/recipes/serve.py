"""`lmsmith serve MODEL`: an OpenAI-compatible server with continuous batching, and a chat page at /.

    lmsmith serve runs/pretrain/final                 # http://127.0.0.1:8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "runs/pretrain/final", "messages": [{"role": "user", "content": "Hi"}]}'

Any model lmsmith loads works (HF directory, .gguf, int8 directory), with --adapter for
a LoRA, prompt or prefix adapter. --max-batch requests decode together in slots of one
KV cache (memory: max-batch x context tokens of keys/values, printed at start);
more wait in a queue of --max-queue, beyond which requests get 429. Ctrl-C stops.
"""

from __future__ import annotations

import os
import sys

HELP = "an OpenAI-compatible server (continuous batching) with a web chat page"
DESCRIPTION = __doc__.split("\n", 2)[2].strip() if __doc__ else HELP
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(p) -> None:
    from .generate import add_draft_arguments, add_dtype_argument, add_packed_argument

    p.add_argument("model", help="model directory, .gguf file or int8 directory")
    p.add_argument("--adapter", default=None, metavar="DIR", help="LoRA, prompt or prefix adapter (peft format)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $LMSMITH_API_KEY)")
    p.add_argument("--model-name", default=None, help="the name clients use (default: MODEL as given)")
    p.add_argument("--max-batch", type=int, default=8, help="slots: requests decoded together (default: 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (default: 64)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="the most tokens one choice may generate, whatever the request asks (default: 1024)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per engine step, in one forward with the decoding requests, "
                        "so a long prompt does not stall the others (default: 512)")
    add_dtype_argument(p)
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    add_packed_argument(p)
    add_draft_arguments(p)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default: warning; info logs every request)")


def check_args(args) -> None:
    from ..errors import LmsmithError

    for name in ("max_batch", "max_queue", "max_tokens", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise LmsmithError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if not 0 <= args.port <= 65535:
        raise LmsmithError(f"--port {args.port} must be between 0 and 65535")


def run(args) -> int:
    import threading
    import time

    import uvicorn

    from ..decoding.engine import Engine
    from ..errors import LmsmithError
    from ..memory import human_bytes
    from ..quant.linear import has_packed_weights
    from ..serve.app import Served, create_app
    from ..serve.worker import Worker
    from .generate import load_draft, load_for_generation

    check_args(args)
    api_key = args.api_key or os.environ.get("LMSMITH_API_KEY") or None
    if args.host not in LOCAL_HOSTS and not api_key:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use the "
              f"model; pass --api-key or set LMSMITH_API_KEY", file=sys.stderr)
    model, tokenizer = load_for_generation(args)
    context = model.config.max_seq_len
    engine = Engine(model, max_batch=args.max_batch, decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                    prefill_chunk=args.prefill_chunk,
                    draft=load_draft(args, model, tokenizer), draft_tokens=args.draft_tokens)
    kv = engine.cache.k.numel() * engine.cache.k.element_size() * 2
    worker = Worker(engine, max_queue=args.max_queue)
    name = args.model_name or args.model
    app = create_app(Served(tokenizer, worker, name, context, args.max_tokens, api_key))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=3, access_log=args.log_level in ("debug", "info"))
    server = uvicorn.Server(config)
    # HTTP on a thread of its own (uvicorn installs no signal handlers there); the engine on this one.
    http = threading.Thread(target=server.run, name="lmsmith-http", daemon=True)
    http.start()
    while not server.started:
        if not http.is_alive():
            raise LmsmithError(f"could not serve on {args.host}:{args.port} (is the port in use? try --port)")
        time.sleep(0.05)
    host = f"[{args.host}]" if ":" in args.host else args.host
    weights = "packed" if has_packed_weights(model) else str(model.model.norm.weight.dtype).removeprefix("torch.")
    print(f"serving {name!r} ({weights} weights): {args.max_batch} slots x {context} tokens (KV cache "
          f"{human_bytes(kv)}); "
          f"chat page http://{host}:{args.port}/ , OpenAI API http://{host}:{args.port}/v1", file=sys.stderr)
    try:
        worker.run()  # until Ctrl-C / SIGTERM (the CLI turns SIGTERM into KeyboardInterrupt)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.should_exit = True
        http.join(timeout=10)
    return 0
