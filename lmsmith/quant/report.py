"""The quality table: what each quantization scheme costs in perplexity and saves in bytes.

For every scheme the model is really written (GGUF file or int8 directory), read
back with lmsmith's own loader (so the numbers include every rounding the file
makes) and scored with `lmsmith.eval.perplexity` on the same text. The f32 GGUF
is the reference for size (ratio 1:N) and the source model for perplexity.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LmsmithError

# Δ perplexity (%) upper bounds for each quality word.
QUALITY_WORDS = ((0.1, "lossless"), (1.0, "excellent"), (3.0, "good"), (10.0, "fair"))


def quality_word(delta_pct: float) -> str:
    """'lossless' / 'excellent' / 'good' / 'fair' / 'poor' for a perplexity change in percent."""
    for bound, word in QUALITY_WORDS:
        if delta_pct < bound:
            return word
    return "poor"


@dataclass
class SchemeResult:
    """One row of the quality table."""

    scheme: str
    bits_per_weight: float
    size_bytes: int
    ratio: float  # f32 size / this size
    perplexity: float
    delta_pct: float  # perplexity change against f32, percent
    quality: str
    seconds: float  # time to write the file


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def measure_scheme(model, tokenizer, scheme: str, texts: list[str], workdir: str | os.PathLike, *,
                   seq_len: int | None = None, stride: int | None = None) -> tuple[int, float, float, float]:
    """Write `model` with `scheme` under `workdir`, load it back, score it.

    Returns `(size_bytes, bits_per_weight, perplexity, seconds_to_write)`.
    """
    from ..eval.perplexity import perplexity
    from ..loader import load
    from .gguf import export_gguf
    from .int8 import save_int8

    workdir = Path(workdir)
    t0 = time.perf_counter()
    if scheme == "int8":
        out = save_int8(model, tokenizer, workdir / "int8")
        seconds = time.perf_counter() - t0
        size = _dir_bytes(out)
        qmodel, _ = load(out)
        bpw = 8.0 * size / model.num_params()
    else:
        summary = export_gguf(model, tokenizer, workdir / f"{scheme}.gguf", scheme, progress=False)
        seconds = time.perf_counter() - t0
        size, bpw = summary.file_bytes, summary.bits_per_weight
        qmodel, _ = load(summary.path)
    ppl = perplexity(qmodel, tokenizer, texts, seq_len=seq_len, stride=stride).perplexity
    del qmodel
    if scheme != "int8":
        summary.path.unlink(missing_ok=True)  # the table needs the numbers, not the files
    return size, bpw, ppl, seconds


def quality_table(model, tokenizer, texts: list[str], schemes: list[str], *, workdir: str | os.PathLike | None = None,
                  seq_len: int | None = None, stride: int | None = None, progress: bool = True
                  ) -> list[SchemeResult]:
    """Measure every scheme (plus the f32 reference, first row) on `texts`; see the module docstring."""
    from ..eval.perplexity import perplexity
    from .mixes import scheme_names

    known = [*scheme_names(), "int8"]
    schemes = [s.lower() for s in schemes]
    bad = [s for s in schemes if s not in known]
    if bad:
        raise LmsmithError(f"unknown scheme {bad[0]!r}; known schemes: {', '.join(known)}")
    if tokenizer is None:
        raise LmsmithError("the quality table needs the model's tokenizer to score text")
    from tqdm.auto import tqdm

    rows: list[SchemeResult] = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        # The f32 reference is the bar's first step: scoring it takes as long as any scheme.
        bar = tqdm(["f32", *[s for s in schemes if s != "f32"]], desc="schemes", disable=not progress)
        for scheme in bar:
            bar.set_postfix_str(scheme)
            if scheme == "f32":
                base_ppl = perplexity(model, tokenizer, texts, seq_len=seq_len, stride=stride).perplexity
                f32_size, f32_bpw, _, f32_s = measure_scheme(model, tokenizer, "f32", texts[:1], tmp, seq_len=8)
                rows.append(SchemeResult("f32", f32_bpw, f32_size, 1.0, base_ppl, 0.0, quality_word(0.0), f32_s))
                continue
            size, bpw, ppl, sec = measure_scheme(model, tokenizer, scheme, texts, tmp, seq_len=seq_len, stride=stride)
            delta = 100.0 * (ppl - base_ppl) / base_ppl
            rows.append(SchemeResult(scheme, bpw, size, f32_size / size, ppl, delta, quality_word(delta), sec))
    return rows


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_table(rows: list[SchemeResult]) -> str:
    """The table as aligned text: scheme · bpw · size · ratio · perplexity · Δ% · quality."""
    head = ("scheme", "bpw", "size", "ratio", "perplexity", "Δ%", "quality")
    body = [(r.scheme, f"{r.bits_per_weight:.2f}", _human(r.size_bytes), f"1:{r.ratio:.1f}",
             f"{r.perplexity:.3f}" if math.isfinite(r.perplexity) else "inf",
             "—" if r.scheme == "f32" else f"{r.delta_pct:+.2f}%", r.quality) for r in rows]
    widths = [max(len(x[i]) for x in (head, *body)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_size_vs_perplexity(rows: list[SchemeResult], png: str | os.PathLike, title: str = "") -> Path:
    """Save a size-vs-perplexity scatter (one labelled point per scheme) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmsmithError("the plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [r.size_bytes / 1e6 for r in rows]
    ys = [r.perplexity for r in rows]
    ax.plot(xs, ys, "o", color="tab:blue")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r.scheme, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or "quantization: size vs perplexity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png
