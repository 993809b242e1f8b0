"""Incremental detokenization: the text that is safe to print after each token, and stop strings."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class Detokenizer:
    """Incremental text for one row: what is safe to print after each token, and stop strings.

    Decodes the whole output each step (simple and exact for byte-level BPE), and holds back
    (a) trailing U+FFFD, an incomplete multi-byte character that the next token may finish, and
    (b) a tail that could be the start of a stop string, so a stop string is never printed.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] | None = None):
        self.decode = decode
        self.stop = list(stop or [])
        self._longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False
        self._searched = 0

    def add(self, token: int) -> str:
        """Append a token; return the newly printable text (may be "")."""
        self.ids.append(token)
        full = self.decode(self.ids)
        if self.stop:
            start = max(0, self._searched - self._longest)  # a stop string may straddle the old end
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                self.text = full[:min(hits)]
                return self.flush()
            self._searched = len(full)
        self.text = full
        safe = len(full)
        while safe > self.emitted and full[safe - 1] == "\ufffd":
            safe -= 1
        if self.stop:
            safe = min(safe, self._stop_prefix_start(full))
        piece = full[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece

    def flush(self) -> str:
        """Everything not yet handed out (call when the row ends)."""
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece

    def _stop_prefix_start(self, full: str) -> int:
        # The earliest start of a suffix of `full` that is a proper prefix of some stop string.
        for k in range(min(self._longest - 1, len(full)), 0, -1):
            tail = full[len(full) - k:]
            if any(s.startswith(tail) for s in self.stop):
                return len(full) - k
        return len(full)
