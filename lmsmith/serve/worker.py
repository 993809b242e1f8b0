"""The engine's thread: steps the slot engine while there is work and hands each event to its request.

HTTP handlers run on the asyncio event loop; the engine runs here, on one thread,
so a long forward never blocks the loop (torch releases the GIL). A handler
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
        self._thread = threading.Thread(target=self._run, name="lmsmith-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

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

    # ---- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            if not self.engine.busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - one bad step must not end the server
                log.exception("engine step failed")
                self._fail_running(e)
                continue
            self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        now = time.perf_counter()
        with self._lock:
            for ev in events:
                sub = self._subs.get(ev.row)
                if ev.finish_reason is not None:
                    self.metrics.finished(ev.finish_reason)
                    self._subs.pop(ev.row, None)
                if sub is None:
                    continue
                if ev.finish_reason == "error":
                    sub.loop.call_soon_threadsafe(sub.queue.put_nowait, (ev.row, RuntimeError(ev.text)))
                    continue
                if ev.token is not None:
                    if sub.last is None:
                        self.metrics.first_token(now - sub.start)
                    else:
                        self.metrics.per_token(now - sub.last)
                    sub.last = now
                sub.loop.call_soon_threadsafe(sub.queue.put_nowait, (ev.row, ev))

    def _fail_running(self, error: Exception) -> None:
        rids = self.engine.reset_running()
        with self._lock:
            for rid in rids:
                sub = self._subs.pop(rid, None)
                self.metrics.finished("error")
                if sub is not None:
                    sub.loop.call_soon_threadsafe(sub.queue.put_nowait, (rid, error))
