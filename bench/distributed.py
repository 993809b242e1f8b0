"""Distributed training on this machine: memory per rank as FSDP2 shards over N ranks, against
`lmsmith plan`'s prediction, and tokens/s per layout (one process, DDP, FSDP, TP+SP, PP 1F1B and
interleaved).

Each row launches `tests/dist_memory.py` under torchrun (gloo, one thread per rank) on the same
global batch; memory is the mean over ranks of the resident-set peak of the training steps (freed
tensors returned to the OS: MALLOC_MMAP_THRESHOLD_), the speed the median step after the first.
On 2 cores 4 ranks share the cores, so their speed is not meaningful; their memory is.

    python bench/distributed.py [--preset small] [--batch 8] [--seq 256] [--steps 6] [--max-ranks 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from machine import cpu_description

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dist_memory.py"


def launch(nproc: int, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, str(WORKER), *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        str(WORKER), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-ranks", type=int, default=4)
    a = ap.parse_args()
    common = [f"preset={a.preset}", f"batch={a.batch}", f"seq={a.seq}", f"steps={a.steps}"]
    print(f"{a.preset}, global batch {a.batch} x {a.seq}, fp32, {a.steps} steps; CPU: {cpu_description()}\n")
    print("FSDP2 memory per rank (weights + gradients + AdamW + activations), measured vs `lmsmith plan`:")
    print(f"  {'ranks':>5} {'measured':>10} {'predicted':>10} {'pred/meas':>10} {'state (plan)':>13}")
    one = None
    n = 1
    while n <= a.max_ranks:
        r = launch(n, *common)
        state = sum(v for k, v in r["parts"].items() if k in ("weights", "gradients", "optimizer"))
        one = one or state
        ratio = r["predicted"] / r["measured"]
        print(f"  {n:>5} {r['measured'] / 1e6:>8.0f} MB {r['predicted'] / 1e6:>8.0f} MB {ratio:>10.2f} "
              f"{state / 1e6:>8.0f} MB (1/{one / state:.1f})")
        n *= 2
    print("\nTokens/s per layout on 2 ranks (global batch, same steps):")
    base = launch(1, *common)["tokens_per_s"]
    print(f"  {'one process':<28} {base:>9,.0f} tok/s  1.00x")
    for name, args in (("DDP (--dp-replicate 2)", ["dp_replicate=2", "dp_shard=1"]),
                       ("FSDP2 (--dp-shard 2)", ["dp_shard=2"]), ("TP+SP (--tp 2)", ["tp=2", "dp_shard=1"]),
                       ("PP 1F1B (--pp 2)", ["pp=2", "dp_shard=1"]),
                       ("PP interleaved (--pp 2)", ["pp=2", "dp_shard=1", "schedule=interleaved"])):
        r = launch(2, *common, *args)
        print(f"  {name:<28} {r['tokens_per_s']:>9,.0f} tok/s  {r['tokens_per_s'] / base:.2f}x")


if __name__ == "__main__":
    main()
