"""The engine's loop: steps the slot engine while there is work and hands each event to its request.

HTTP handlers run on the asyncio event loop (uvicorn's thread); the engine runs in
`Worker.run`, on the process's MAIN thread: torch's CPU kernels run ~1.7x slower when
called from a second thread (measured on 2 cores), and a long forward then never blocks
the event loop either (torch releases the GIL). A handler
`submit`s its choices and reads their events from an `asyncio.Queue`, filled with
`loop.call_soon_threadsafe`. A step that raises fails the requests it was running
(their queues get an `Exception`); the thread and the other requests go on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from ..decoding.engine import Engine, Event, Request
from .metrics import Metrics

log = logging.getLogger("lmsmith.serve")


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class QueueFull(Exception):
    """More requests wait than --max-queue allows."""


class _Sub:
    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue
        self.start = time.perf_counter()
        self.last: float | None = None


class Worker:
    """Owns the Engine; thread-safe `submit` / `cancel` for the HTTP side."""

    def __init__(self, engine: Engine, max_queue: int = 64):
        self.engine, self.max_queue = engine, max_queue
        self.metrics = Metrics({
            "lmsmith_queue_length": ("Requests waiting for a slot.", lambda: self.engine.waiting),
            "lmsmith_running_slots": ("Slots decoding or prefilling.", lambda: len(self.engine.active)),
            "lmsmith_slots": ("Slots (--max-batch).", lambda: self.engine.max_batch),
        }, engine.stats)
        self._subs: dict[int, _Sub] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False

    def stop(self) -> None:
        """Make `run` return after the step in flight (any thread)."""
        self._stop = True
        self._wake.set()

    def submit(self, requests: list[Request], loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> list[int]:
        """Queue the choices of one call; every event of theirs goes to `queue` as (rid, Event)."""
        for r in requests:
            self.engine.check(r)  # LmsmithError before anything is queued
        with self._lock:
            if self.engine.waiting + len(requests) > self.max_queue:
                raise QueueFull(f"the server is busy: {self.engine.waiting} requests are waiting "
                                f"(--max-queue {self.max_queue}); retry later")
            rids = []
            for r in requests:
                rid = self.engine.submit(r)
                self._subs[rid] = _Sub(loop, queue)
                rids.append(rid)
        self._wake.set()
        return rids

    def cancel(self, rids: list[int]) -> None:
        """Stop these choices (a client went away); their slots are freed at the next step."""
        with self._lock:
            for rid in rids:
                if self._subs.pop(rid, None) is not None:
                    self.engine.cancel(rid)
        self._wake.set()

    # ---- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        """Step the engine until `stop` (blocks; call it on the main thread)."""
        while not self._stop:
            if not self.engine.busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - one bad step must not end the server
                log.exception("engine step failed")
                self._fail_running(e)
                continue
            self.metrics.step(time.perf_counter() - t0)
            self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        """Hand a step's events to their queues: one wake-up of each event loop per step, not per
        token (the loop's thread competes with torch's threads for the cores)."""
        now = time.perf_counter()
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for ev in events:
                sub = self._subs.get(ev.row)
                if ev.finish_reason is not None:
                    self.metrics.finished(ev.finish_reason)
                    self._subs.pop(ev.row, None)
                if sub is None:
                    continue
                item = (ev.row, RuntimeError(ev.text)) if ev.finish_reason == "error" else (ev.row, ev)
                if ev.token is not None:
                    if sub.last is None:
                        self.metrics.first_token(now - sub.start)
                    else:
                        self.metrics.per_token(now - sub.last)
                    sub.last = now
                batches.setdefault(sub.loop, []).append((sub.queue, item))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _fail_running(self, error: Exception) -> None:
        rids = self.engine.reset_running()
        with self._lock:
            for rid in rids:
                sub = self._subs.pop(rid, None)
                self.metrics.finished("error")
                if sub is not None:
                    sub.loop.call_soon_threadsafe(sub.queue.put_nowait, (rid, error))
