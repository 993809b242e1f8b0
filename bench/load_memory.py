"""Peak resident memory of loading a llama-3.2-1b-shaped bf16 checkpoint: lmsmith vs transformers.

    /work/venv/bin/python bench/load_memory.py [--preset llama-3.2-1b] [--keep DIR]

Writes a random-weight model directory in bf16 (built directly in bf16 by
`lmsmith init`, never an fp32 copy) into a temporary folder, then loads it in a
fresh subprocess per loader. Each subprocess imports its libraries, records
`ru_maxrss` as its baseline, loads the model, runs one short forward pass (so
lazily memory-mapped weights are really paged in, as any use would), and
reports its peak `ru_maxrss` minus the baseline. The ratio is that extra peak
over the size of the weights on disk: 1.00x means the weights were never held
twice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
loader, path = sys.argv[1], sys.argv[2]
if loader.startswith("lmsmith"):
    import lmsmith
else:
    import transformers
torch.set_num_threads(2)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
if loader == "lmsmith":
    model, _ = lmsmith.load(path)
elif loader == "lmsmith-fp32":
    model, _ = lmsmith.load(path, dtype=torch.float32)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
load_s = time.perf_counter() - t0
model.eval()
with torch.no_grad():
    x = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    out = model(x)
    logits = out if torch.is_tensor(out) else out.logits
    assert torch.isfinite(logits.float()).all()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
print(json.dumps({"baseline": base, "peak": peak, "load_s": load_s, "dtype": dtype}))
"""


def _run_child(loader: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, loader, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{loader} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--keep", metavar="DIR", help="write the model here and keep it (default: a temp dir)")
    ap.add_argument("--no-fp32", action="store_true", help="skip the bf16 -> fp32 conversion row")
    args = ap.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lmsmith-bench-"))
    model_dir = root / "model"
    try:
        if not (model_dir / "config.json").is_file():
            print(f"writing a random {args.preset} in bf16 to {model_dir} ...", flush=True)
            # A subprocess, so this process never holds the weights.
            subprocess.run([sys.executable, "-m", "lmsmith", "init", "--preset", args.preset, "--dtype", "bf16",
                            "--out", str(model_dir)], check=True, stderr=subprocess.DEVNULL)
        size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        n_params = size // 2

        loaders = ["lmsmith", "transformers"] + ([] if args.no_fp32 else ["lmsmith-fp32"])
        rows = []
        for loader in loaders:
            print(f"loading with {loader} ...", flush=True)
            r = _run_child(loader, model_dir)
            weights = size * (2 if loader == "lmsmith-fp32" else 1)
            rows.append((loader, r, weights))

        print()
        print(f"{args.preset}: {n_params / 1e9:.2f}B params, {size / 1e9:.2f} GB of bf16 safetensors; "
              "peak RSS above an interpreter that imported the loader's libraries, "
              "incl. one 8-token forward pass")
        header = f"{'loader':<28} {'dtype':>9} {'weights':>9} {'peak extra':>11} {'ratio':>7} {'load s':>7}"
        print(header)
        print("-" * len(header))
        for loader, r, weights in rows:
            extra = r["peak"] - r["baseline"]
            name = {"lmsmith": "lmsmith.load", "transformers": "transformers from_pretrained",
                    "lmsmith-fp32": "lmsmith.load(dtype=fp32)"}[loader]
            print(f"{name:<28} {r['dtype']:>9} {weights / 1e9:>7.2f}GB {extra / 1e9:>9.2f}GB "
                  f"{extra / weights:>6.2f}x {r['load_s']:>7.2f}")
        lm = next(r for n, r, _ in rows if n == "lmsmith")
        hf = next(r for n, r, _ in rows if n == "transformers")
        print(f"\nlmsmith peak extra / transformers peak extra: "
              f"{(lm['peak'] - lm['baseline']) / (hf['peak'] - hf['baseline']):.2f}x; "
              f"load time ratio {lm['load_s'] / hf['load_s']:.2f}x")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
