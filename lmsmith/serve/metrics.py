"""The server's counters, gauges and histograms, written in Prometheus' text format (`GET /metrics`)."""

from __future__ import annotations

import threading
from collections.abc import Callable

# Seconds: time to first token and per-token latency on CPU span milliseconds to tens of seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# (metric, engine stats key, help)
COUNTERS = (
    ("lmsmith_prompt_tokens_total", "prompt_tokens", "Prompt tokens admitted."),
    ("lmsmith_cached_prompt_tokens_total", "cached_prompt_tokens",
     "Prompt tokens whose keys/values were reused from a slot's cache (prompt caching)."),
    ("lmsmith_generation_tokens_total", "generated_tokens", "Tokens generated."),
    ("lmsmith_decode_steps_total", "decode_steps", "Batched decode forwards."),
    ("lmsmith_decode_rows_total", "decode_rows", "Rows of all decode forwards (/ steps = the average batch)."),
    ("lmsmith_draft_tokens_total", "draft_tokens", "Tokens proposed by the draft (speculative decoding, --draft)."),
    ("lmsmith_draft_accepted_tokens_total", "draft_accepted",
     "Draft tokens the model accepted (/ draft tokens = the acceptance rate)."),
)


class Histogram:
    def __init__(self, buckets=BUCKETS):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """Thread-safe counters; `gauges` are read when the page is rendered (queue, running slots)."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]], stats: dict[str, int]):
        self._lock = threading.Lock()
        self.gauges = gauges
        self.stats = stats  # the engine's counters, read as they are
        self.requests: dict[str, int] = {}  # finish reason (or "error") -> count
        self.ttft = Histogram()
        self.tpot = Histogram()
        self.steps = Histogram()

    def finished(self, reason: str) -> None:
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def per_token(self, seconds: float) -> None:
        with self._lock:
            self.tpot.observe(seconds)

    def step(self, seconds: float) -> None:
        with self._lock:
            self.steps.observe(seconds)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP lmsmith_requests_total Finished requests (choices) by finish reason.",
                     "# TYPE lmsmith_requests_total counter"]
            lines += [f'lmsmith_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(self.requests.items())]
            for name, key, text in COUNTERS:
                lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {self.stats[key]}"]
            for name, (text, read) in self.gauges.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {read()}"]
            for name, h, text in (("lmsmith_time_to_first_token_seconds", self.ttft, "Time to first token."),
                                  ("lmsmith_time_per_output_token_seconds", self.tpot,
                                   "Time between consecutive tokens of a request."),
                                  ("lmsmith_engine_step_seconds", self.steps,
                                   "One engine step (admit, decode, prefill).")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"] + h.lines(name)
        return "\n".join(lines) + "\n"
