"""Serving: `lmsmith serve MODEL` — an OpenAI-compatible HTTP API and a chat page over the slot engine.

    app.py       the FastAPI routes (completions, chat completions, models, health, metrics, the page)
    protocol.py  OpenAI's request fields -> engine requests; responses and stream chunks
    worker.py    the engine's loop (main thread): continuous batching, events to each request's queue
    metrics.py   Prometheus counters and histograms
    static/      index.html, the chat page with the next-token probability view (no network needed)
"""
