"""Time budgets: `--time 10m` parsed, printed, and turned into a step count.

A run with a time budget measures its own speed over its first steps and then fixes
`max_steps` (and with it the LR schedule, which decays to its minimum at the last step),
so the run ends on time on a fast machine and a slow one alike.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable

from ..errors import LmsmithError

_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float | int, what: str = "--time") -> float:
    """'90s', '10m', '1.5h', '1h30m', 600 -> seconds (a bare number is seconds)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", str(text).strip().lower())
        joined = "".join(f"{n}{u}" for n, u in parts)
        if not parts or joined != re.sub(r"\s+", "", str(text).strip().lower()) or \
                any(u not in _UNITS for _, u in parts):
            raise LmsmithError(f"{what} {text!r} is not a duration; use e.g. 90s, 10m, 1.5h or 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise LmsmithError(f"{what} {text!r}: the duration must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    """600 -> '10m', 90 -> '1m30s', 5400 -> '1h30m'."""
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{sec}s" if sec or not (h or m) else "")
    return out


def fit_steps(budget: float, elapsed: float, step: int, sec_per_step: float, cap: int, *,
              eval_every: int = 0, eval_seconds: float = 0.0, reserve: float = 0.01) -> int:
    """The step count that ends a run of `budget` seconds on time.

    Args:
        budget: seconds for the whole run; `elapsed` of them are spent after `step` steps.
        sec_per_step: measured seconds per optimizer step.
        cap: the most steps the run may take (its max_steps).
        eval_every, eval_seconds: evaluations still to come (every `eval_every` steps, and a
            final one when `eval_seconds` > 0) and the estimated cost of one.
        reserve: the fraction of the budget kept for the checkpoints and final save.

    Returns:
        At least `step + 1`, at most `cap`.
    """
    left = budget * (1 - reserve) - elapsed - eval_seconds
    per_step = sec_per_step + (eval_seconds / eval_every if eval_every else 0.0)
    return max(step + 1, min(cap, step + int(max(0.0, left) / max(per_step, 1e-9))))


class StepBudget:
    """Fits a run's step count to a time budget as the run goes.

    The first fit comes after `fit_after` timed steps (the first step pays one-off costs and is
    not timed), from the plain step rate and an estimate of the evaluations to come; each later
    refit (after a checkpoint or evaluation) uses the rate measured so far, evaluations and
    checkpoints included, so their cost is counted as it really is.
    """

    def __init__(self, seconds: float, cap: int, start_step: int, fit_after: int, *, eval_every: int = 0,
                 fitted: bool = False):
        self.seconds, self.cap, self.start_step, self.fit_after = seconds, cap, start_step, fit_after
        self.eval_every, self.fitted = eval_every, fitted
        self.eval_seconds = 0.0  # the last evaluation's cost (estimated until one ran)
        self.save_seconds = 0.0  # the last checkpoint's cost
        self._t0: float | None = None

    def _rate(self, step: int) -> float:
        return (time.perf_counter() - self._t0) / (step - self.start_step - 1)

    def _fit(self, step: int, elapsed: float, sec_per_step: float) -> int:
        # After the last step come a final evaluation, a checkpoint, the final/ save and the loss plot
        # (about a second when matplotlib still has to be imported).
        plot = 0.3 if "matplotlib.pyplot" in sys.modules else 1.0
        final = self.eval_seconds + 3 * self.save_seconds + plot
        return fit_steps(self.seconds, elapsed + final, step, sec_per_step, self.cap)

    def after_step(self, step: int, elapsed: float, eval_estimate: Callable[[float], float]) -> int | None:
        """The fitted step count when `step` completes the timed warm-up, else None.

        `eval_estimate(sec_per_step)` is the expected cost of one evaluation (0 without eval data)."""
        if step == self.start_step + 1:
            self._t0 = time.perf_counter()
            return None
        if self.fitted or self._t0 is None or step < self.start_step + self.fit_after:
            return None
        per_step = self._rate(step)
        self.eval_seconds = eval_estimate(per_step)
        self.fitted = True
        return self._fit(step, elapsed, per_step + (self.eval_seconds / self.eval_every if self.eval_every else 0))

    def after_overhead(self, step: int, elapsed: float) -> int | None:
        """A refitted step count after a checkpoint or evaluation, else None."""
        if not self.fitted or self._t0 is None or step <= self.start_step + 1:
            return None
        return self._fit(step, elapsed, self._rate(step))
