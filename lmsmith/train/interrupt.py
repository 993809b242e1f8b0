"""Ctrl-C and SIGTERM for the training loop: stop at a step boundary, never mid-write.

The first SIGINT (Ctrl-C) or SIGTERM (what schedulers and `docker stop` send) asks the
loop to stop after the step in flight; the loop then writes a checkpoint of the last
completed step and returns. A second signal interrupts at once (KeyboardInterrupt),
except inside a `critical()` section (the optimizer update, a checkpoint write), where it
is held until the section ends: the in-memory state is then always one a checkpoint can
describe exactly.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """Context manager installing the handlers (main thread only); `requested` is set by the first signal."""

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._old: dict[int, object] = {}
        self._critical = 0
        self._held = False

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            return
        if self._critical:
            self._held = True  # raised when the critical section ends
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self):
        """A section a second signal must not cut in two (its KeyboardInterrupt waits for the end)."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self._held:
            self._held = False
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
