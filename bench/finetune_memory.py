"""Peak memory and step time: full fine-tuning against LoRA (r=8, r=16), prompt and prefix tuning.

Each configuration runs in its own subprocess so its peak RSS is clean: build the model
(random init), apply the method, then a few SFT steps (the loop's `accumulate_gradients`
+ AdamW) on the same batch. Printed as a table with ratios to full fine-tuning.
Target: LoRA's peak memory at most 50% of full fine-tuning's.

    python bench/finetune_memory.py                 # base preset (fp32) + llama-3.2-1b shape (bf16, LoRA)
    python bench/finetune_memory.py --quick         # base preset only
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

RUNS = [
    ("base", "fp32", "full", 0), ("base", "fp32", "lora", 8), ("base", "fp32", "lora", 16),
    ("base", "fp32", "prompt", 20), ("base", "fp32", "prefix", 20),
    ("llama-3.2-1b", "bf16", "lora", 8), ("llama-3.2-1b", "bf16", "lora", 16),
]


def child(preset_name: str, dtype: str, method: str, size: int, batch: int, seq: int, steps: int) -> dict:
    import torch

    from lmsmith.config import preset
    from lmsmith.model import build_model
    from lmsmith.train import accumulate_gradients, build_optimizer, param_groups
    from lmsmith.train.dpo import sft_objective

    torch.manual_seed(0)
    cfg = preset(preset_name, max_seq_len=max(seq, 64))
    model = build_model(cfg, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, seed=0)
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if method == "lora":
        from lmsmith.adapters import LoraConfig, apply_lora

        params = apply_lora(model, LoraConfig(r=size, alpha=2 * size))
    elif method in ("prompt", "prefix"):
        from lmsmith.adapters import PromptTuningConfig, apply_prompt_tuning

        model = apply_prompt_tuning(model, PromptTuningConfig(n_virtual_tokens=size, deep=method == "prefix"))
        params = model.prompt_parameters()
    else:
        params = list(model.parameters())
    groups = param_groups(model, 0.0, params)
    opt = build_optimizer(groups, 1e-4, (0.9, 0.95), 1e-8)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    labels = torch.roll(ids, -1, 1)
    labels[:, : seq // 2] = -100  # prompt half masked, as in SFT
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        accumulate_gradients(model, [{"input_ids": ids, "labels": labels}], sft_objective,
                             params=[p for g in groups for p in g["params"]], policy="fp32")
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"preset": preset_name, "dtype": dtype, "method": method if method == "full" else f"{method}-{size}",
            "trainable": sum(p.numel() for p in params), "peak_mb": peak, "model_mb": rss_model,
            "step_s": min(times[1:] or times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="base preset only")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        p, d, m, s = a.child
        print(json.dumps(child(p, d, m, int(s), a.batch, a.seq, a.steps)))
        return
    results = []
    for p, d, m, s in RUNS:
        if a.quick and p != "base":
            continue
        steps, seq = (a.steps, a.seq) if p == "base" else (2, min(a.seq, 64))  # keep the 1B shape short on CPU
        cmd = [sys.executable, __file__, "--child", p, d, m, str(s), "--batch", str(a.batch), "--seq", str(seq),
               "--steps", str(steps)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{p} {m}-{s}: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    full = {r["preset"]: r for r in results if r["method"] == "full"}
    print(f"batch {a.batch} x seq {a.seq} (1B shape: seq {min(a.seq, 64)}), peak RSS per subprocess")
    print(f"{'model':<14}{'dtype':<6}{'method':<11}{'trainable':>14}{'weights MB':>12}{'peak MB':>10}"
          f"{'vs full':>9}{'step s':>9}")
    for r in results:
        f = full.get(r["preset"])
        ratio = f"{r['peak_mb'] / f['peak_mb']:.0%}" if f else "-"
        print(f"{r['preset']:<14}{r['dtype']:<6}{r['method']:<11}{r['trainable']:>14,}{r['model_mb']:>12,.0f}"
              f"{r['peak_mb']:>10,.0f}{ratio:>9}{r['step_s']:>9.2f}")
    lora = [r for r in results if r["preset"] in full and r["method"].startswith("lora")]
    if lora:
        worst = max(r["peak_mb"] / full[r["preset"]]["peak_mb"] for r in lora)
        print(f"target LoRA peak <= 50% of full: {'met' if worst <= 0.5 else 'NOT met'} (worst {worst:.0%})")


if __name__ == "__main__":
    main()
