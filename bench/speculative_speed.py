"""Speculative decoding at batch 1: the target alone, with a draft model (a student distilled from it),
and with prompt lookup; greedy (the outputs asserted identical to the target's) and sampling.

Prints tokens/s, the speed-up, the draft acceptance rate and tokens per target forward, and the cost of
one draft decode step relative to one target step (what decides whether drafting pays).

    python bench/speculative_speed.py [--target DIR] [--draft DIR] [--max-new-tokens 128]

Defaults: the small teacher and its fkl student that `bench/distill_quality.py` leaves in its work folder.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_description

WORK = Path("/tmp/lmsmith-distill-bench")
PROMPTS = ["def parse_args(argv):\n    ", "class Config:\n    def __init__(self",
           "import os\nimport sys\n\n\ndef main(", "    for key, value in", "The cat sat on the",
           "def __repr__(self):\n        return"]


def step_seconds(model, tokens: int = 64) -> float:
    """Median seconds of one single-token decode step of `model` at batch 1 (engine, greedy)."""
    from lmsmith.decoding import Engine, GenerationConfig, Request

    engine = Engine(model, max_batch=1)
    engine.submit(Request([1, 2, 3], GenerationConfig(max_new_tokens=tokens, eos_ids=None)))
    times = []
    while engine.busy:
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def run(target, tok, prompts, config, draft, gamma) -> tuple[list[list[int]], float, dict]:
    from lmsmith.decoding import encode_prompt, generate_ids

    ids, stats, seconds = [], {}, 0.0
    for p in prompts:
        step = {}
        t0 = time.perf_counter()
        c = generate_ids(target, [encode_prompt(tok, p)], config, draft=draft, draft_tokens=gamma, stats=step)[0]
        seconds += time.perf_counter() - t0
        ids.append(c.ids)
        stats = {k: stats.get(k, 0) + v for k, v in step.items()}
    return ids, seconds, stats


def main() -> None:
    from lmsmith.decoding import GenerationConfig
    from lmsmith.decoding.layout import use_decode_layout
    from lmsmith.loader import load

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(WORK / "teacher" / "final"))
    ap.add_argument("--draft", default=str(WORK / "fkl--online" / "final"))
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--gamma", type=int, default=None, help="fixed draft tokens (default: adaptive)")
    a = ap.parse_args()
    torch.manual_seed(0)
    target, tok = load(a.target)
    draft, _ = load(a.draft)
    target, draft = use_decode_layout(target.eval()), use_decode_layout(draft.eval())
    t_step, d_step = step_seconds(target), step_seconds(draft)
    print(f"target {a.target} ({target.num_params() / 1e6:.1f}M), draft {a.draft} ({draft.num_params() / 1e6:.1f}M); "
          f"{len(PROMPTS)} prompts x {a.max_new_tokens} tokens, batch 1, fp32; CPU: {cpu_description()}")
    print(f"one decode step: target {1e3 * t_step:.1f} ms, draft {1e3 * d_step:.1f} ms "
          f"(draft / target = {d_step / t_step:.2f})\n")
    print("| decoding | draft | tokens/s | vs target alone | acceptance | tokens per target forward |")
    print("|---|---|---|---|---|---|")
    configs = {"greedy": GenerationConfig(max_new_tokens=a.max_new_tokens, eos_ids=None),
               "sampling T=0.8": GenerationConfig(strategy="sample", temperature=0.8, seed=0,
                                                  max_new_tokens=a.max_new_tokens, eos_ids=None)}
    for name, config in configs.items():
        run(target, tok, PROMPTS[:1], config, None, None)  # warm-up
        ref, t_ref, s_ref = run(target, tok, PROMPTS, config, None, None)
        n = sum(len(x) for x in ref)
        print(f"| {name} | (target alone) | {n / t_ref:.1f} | 1.00x | | 1.00 |")
        for label, d in (("distilled student", draft), ("prompt lookup", "prompt-lookup")):
            ids, secs, st = run(target, tok, PROMPTS, config, d, a.gamma)
            if name == "greedy":
                assert ids == ref, f"greedy output with {label} differs from the target's"
            m = sum(len(x) for x in ids)
            rate = st["draft_accepted"] / max(st["draft_tokens"], 1)
            per = st["generated_tokens"] / max(st["decode_steps"], 1)
            print(f"| {name} | {label} | {m / secs:.1f} | {(m / secs) / (n / t_ref):.2f}x | {rate:.0%} | {per:.2f} |")
    print("\ngreedy outputs with both drafts are token-identical to the target's (asserted)")


if __name__ == "__main__":
    main()
