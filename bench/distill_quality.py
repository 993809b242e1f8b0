"""Distillation quality: a `small` teacher pretrained on the built-in corpus, then `tiny` students trained
on the same tokens for the same steps: cross-entropy only, and each distillation loss (online, and from
the teacher's top-K cache). Every student is scored on the same held-out batches (the teacher's
validation shards): perplexity, KL to the teacher, wall time of its training.

    python bench/distill_quality.py [--teacher-time 10m] [--steps 150] [--work /tmp/lmsmith-distill-bench] [--reuse]

--reuse keeps the teacher and every student already trained in the work folder (their recorded times)
and trains only the missing ones.

Target (issue 14): the best distilled student's held-out perplexity at most 0.95x the CE-only student's.
Run it alone on the machine: two torch processes on 2 cores slow each other 10x.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_description


def lmsmith(*args: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lmsmith", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"lmsmith {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def score(student_dir: Path, teacher, shards, batches: int) -> tuple[float, float]:
    """(held-out perplexity, KL(teacher || student) per token) on the teacher's validation shards."""
    from lmsmith.data import sequential_batches
    from lmsmith.loader import load
    from lmsmith.train import evaluate
    from lmsmith.train.distill import DistillSpec, distill_objective

    student, _ = load(student_dir)
    ev = evaluate(student, lambda: sequential_batches(shards, "validation", batch_size=16, seq_len=256,
                                                      max_batches=batches),
                  distill_objective(DistillSpec("fkl"), teacher), n_batches=batches, policy="fp32")
    return math.exp(ev["val_ce"]), ev["val_kl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-time", default="10m", help="the teacher's pretraining budget")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of every student (16 x 256 tokens)")
    ap.add_argument("--reuse", action="store_true", help="keep students already trained in --work")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--work", default="/tmp/lmsmith-distill-bench")
    a = ap.parse_args()
    work = Path(a.work)
    teacher_dir = work / "teacher" / "final"
    if not teacher_dir.exists():
        print(f"pretraining the small teacher ({a.teacher_time}) ...", flush=True)
        lmsmith("pretrain", "--preset", "small", "--time", a.teacher_time, "--out", str(work / "teacher"),
                "--overwrite", "--no-progress", "--eval-every", "0")
    common = ["--teacher", str(teacher_dir), "--student", "tiny", "--max-steps", str(a.steps),
              "--eval-every", "0", "--save-every", "0", "--no-progress", "--overwrite"]
    cache = work / "cache"
    cached = [c for c in common if c not in ("--teacher", str(teacher_dir))]
    runs = [("cross-entropy only", common + ["--alpha", "0"]), ("fkl (online)", common + ["--loss", "fkl"]),
            ("rkl (online)", common + ["--loss", "rkl"]), ("jsd beta=0.5 (online)", common + ["--loss", "jsd"]),
            ("fkl, 25% on-policy", common + ["--loss", "fkl", "--on-policy", "0.25"]),
            (f"fkl (top-{a.top_k} cache)", cached + ["--teacher-cache", str(cache)])]
    times = {}
    t_cache = _timed(work / "cache.seconds", a.reuse and (cache / "manifest.json").exists(), lambda: lmsmith(
        "distill", "cache", "--teacher", str(teacher_dir), "--top-k", str(a.top_k), "--tokens",
        str(a.steps * 16 * 256), "--out", str(cache), "--overwrite"))
    for name, args in runs:
        out = work / _slug(name)
        print(f"student: {name} ...", flush=True)
        times[name] = _timed(out / "seconds", a.reuse and (out / "final").exists(),
                             lambda args=args, out=out: lmsmith("distill", *args, "--out", str(out)))

    from lmsmith.data import TokenShards
    from lmsmith.loader import load

    teacher, _ = load(teacher_dir)
    shards = TokenShards(work / "teacher" / "data")
    print(f"\nsmall teacher -> tiny students, {a.steps} steps x 16 x 256 tokens each; held-out: "
          f"{a.eval_batches} validation batches of the teacher's shards; CPU: {cpu_description()}\n")
    print("| student | held-out perplexity | vs CE-only | KL to teacher (nats/token) | train time (s) |")
    print("|---|---|---|---|---|")
    rows = {name: score(work / _slug(name) / "final", teacher, shards, a.eval_batches) for name, _ in runs}
    t_ppl, _ = score(teacher_dir, teacher, shards, a.eval_batches)
    base = rows["cross-entropy only"][0]
    for name, (ppl, kl) in rows.items():
        extra = f" (+{t_cache:.0f} s cache)" if "cache" in name else ""
        print(f"| {name} | {ppl:.2f} | {ppl / base:.3f}x | {kl:.4f} | {times[name]:.0f}{extra} |")
    print(f"| (the teacher) | {t_ppl:.2f} | {t_ppl / base:.3f}x | 0 | |")
    best = min(ppl for n, (ppl, _) in rows.items() if n != "cross-entropy only")
    print(f"\nbest distilled / CE-only perplexity: {best / base:.3f}x (target <= 0.95x)")


def _timed(record: Path, reuse: bool, fn) -> float:
    """fn()'s wall time, recorded in `record`; with `reuse`, the recorded time of an earlier run."""
    if reuse and record.exists():
        return float(record.read_text())
    seconds = fn()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"{seconds}\n")
    return seconds


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


if __name__ == "__main__":
    main()
