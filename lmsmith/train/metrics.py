"""What a run reports: metrics.jsonl, the progress bar, MFU, the loss-curve PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

_PEAKS: dict[tuple[str, str], float] = {}


def measure_matmul_peak(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        seconds: float = 1.0, n: int = 1024, refresh: bool = False) -> float:
    """Achieved FLOP/s of a square matmul in `dtype` on `device` (cached per process; `refresh` measures again).

    A measured peak, not a datasheet number, so MFU says how close training gets to
    what this machine's matmul kernels really deliver.
    """
    device = torch.device(device)
    key = (str(dtype), str(device))
    if key in _PEAKS and not refresh:
        return _PEAKS[key]
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):  # warm the kernels and caches
        a @ b
    sync()
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    _PEAKS[key] = 2 * n**3 * reps / elapsed
    return _PEAKS[key]


class MetricsLog:
    """Append-only metrics.jsonl; each row is flushed to disk as it is written."""

    def __init__(self, path: Path, rows: list[dict] | None = None, write: bool = True):
        self.path = Path(path)
        self.rows: list[dict] = list(rows or [])
        self._write = write  # False on every rank but 0 of a distributed run: the rows are kept, not written
        if not write:
            return
        # Rewrite from the rows we were given: after a resume, rows logged past the
        # checkpoint by the interrupted run are dropped, so the file matches the state.
        with open(self.path, "w") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if not self._write:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def progress_bar(total: int, initial: int, enabled: bool = True, quiet: bool = False):
    """A tqdm bar over optimizer steps (or a stand-in that prints its messages when tqdm is missing or
    disabled; `quiet`: prints nothing either, for every rank but 0)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        enabled = False
    if quiet:
        return _QuietBar()
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")


class _NoBar:
    def update(self, n=1): ...
    def set_postfix_str(self, s, refresh=True): ...
    def refresh(self): ...
    def write(self, s): print(s)
    def close(self): ...


class _QuietBar(_NoBar):
    def write(self, s): ...


def format_postfix(loss: float, lr: float, tok_s: float, mfu: float | None, extra: dict | None = None) -> str:
    """The progress bar's text; `extra`: an objective's `progress_metrics` (RL's reward, accuracy, ...)."""
    mfu_s = f" mfu {100 * mfu:.0f}%" if mfu is not None else ""
    shown = "".join(f" {k} {_short(v)}" for k, v in (extra or {}).items())
    return f"loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s{mfu_s}{shown}"


def _short(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def format_eval(ev: dict, extra: dict) -> str:
    """One line per evaluation: the validation loss (and perplexity), then an `eval_fn`'s metrics."""
    parts = []
    if "val_loss" in ev:
        ppl = f", ppl {ev['val_ppl']:.2f}" if "val_ppl" in ev else ""
        parts.append(f"val loss {ev['val_loss']:.4f}{ppl}")
    parts += [f"{k.removeprefix('val_')} {_short(v)}" for k, v in extra.items()]
    return ", ".join(parts)


def plot_loss_curve(rows: list[dict], png_path: Path) -> str | None:
    """Write train (and validation) loss against step; returns a note if it was skipped."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed; skipped the loss-curve PNG (pip install matplotlib)"
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return "no metrics to plot"
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_ylabel("loss (nats/token)")
    _finish(plt, fig, [ax], png_path)
    return None


def plot_curves(rows: list[dict], png_path: Path, panels: dict[str, dict[str, str]]) -> str | None:
    """One panel per entry of `panels` ({title: {legend label: metrics key}}), each key's values
    against step (rows lacking a key are skipped); returns a note if nothing was written."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed; skipped the curves PNG (pip install matplotlib)"
    series = {title: {label: [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                      for label, key in keys.items()} for title, keys in panels.items()}
    series = {t: {lab: pts for lab, pts in s.items() if pts} for t, s in series.items()}
    series = {t: s for t, s in series.items() if s}
    if not series:
        return "no metrics to plot"
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], series.items()):
        for label, pts in lines.items():
            ax.plot(*zip(*pts), "o-" if len(pts) < 30 else "-", label=label)
        ax.set_title(title)
    _finish(plt, fig, axes[0], png_path)
    return None


def _pyplot():
    """matplotlib.pyplot on the file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _finish(plt, fig, axes, png_path: Path) -> None:
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
