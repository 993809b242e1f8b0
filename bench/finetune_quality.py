"""Fine-tuning quality: full fine-tuning against LoRA and prompt tuning, same model, data and steps.

What it measures. On one base model and one synthetic instruction set (`lmsmith data synth`,
tasks with exactly checkable answers), each method trains for the SAME number of optimizer
steps through the real CLI (`lmsmith finetune ... --eval-tasks heldout.jsonl --ref-data REF`),
one subprocess after another. One table compares:

    method · trainable params · steps · wall time (whole subprocess, and the training loop
    alone from metrics.jsonl) · held-out exact-match accuracy before -> after · reference
    perplexity before -> after (change in %, i.e. forgetting of the pretraining domain)

Methods (each with its own learning rate, since adapters need larger steps; all flags below):
  full    every weight (fp32 master weights)
  lora    r=16, alpha=32, on all linear layers (q,k,v,o,gate,up,down) by default
  prompt  20 virtual tokens (soft prompt) and the rows of the chat template's special tokens
          (`--train-tokens auto`: a base that never saw <|im_end|> cannot learn to emit it otherwise),
          base frozen
  prefix  the 20 virtual tokens' keys/values in every layer (prefix tuning) + the same token rows
  prompt-only  the soft prompt alone (`--train-tokens none`, what peft's prompt tuning trains)

Reference text (forgetting). By default the documents the pretraining run held out for
validation: when MODEL sits in an `lmsmith pretrain` run folder (MODEL/../data/manifest.json with
validation shards, same tokenizer), those shards are decoded to REF (text the model never trained
on, from its own domain; the built-in corpus's worked task examples are left out). Otherwise
pass --ref-data (a text file, folder or .jsonl); as a last resort the interpreter's pydoc topics
are used, which an `lmsmith pretrain` model has trained on.

The machine-readable parts come from each run's metrics.jsonl (training-loop time, final loss);
accuracy, perplexity and parameter counts from the finetune summary (there is no JSON summary),
parsed with regular expressions; a run whose summary cannot be parsed is reported, not guessed.

    python bench/finetune_quality.py --model runs/pretrain/final
    python bench/finetune_quality.py --model runs/pretrain/final --steps 300 --methods full,lora
    python bench/finetune_quality.py --model M --ref-data some_heldout_dir/ --task reverse
    python bench/finetune_quality.py --model M --threads 1     # on a machine shared with other jobs

Takes about 3 minutes on 2 CPU cores with the tiny preset, the defaults and --threads 1 (several times
longer with 2 threads when other jobs compete for the cores: OpenMP threads then wait on each other);
--steps 3000 takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LMSMITH = [sys.executable, "-m", "lmsmith"]
ENV = dict(os.environ)
PCT = r"(\d+(?:\.\d+)?)% \((\d+)/(\d+)\)"


def run_cli(args: list[str], log) -> tuple[int, str, float]:
    """Run `lmsmith ARGS`, echo its output to `log`, return (exit code, output, wall seconds)."""
    t = time.perf_counter()
    p = subprocess.run([*LMSMITH, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    wall = time.perf_counter() - t
    log(f"$ lmsmith {' '.join(args)}")
    for line in p.stdout.splitlines():
        if "\r" in line:  # progress bars (should be off with --no-progress): keep only the last state
            line = line.rsplit("\r", 1)[-1]
        log("  | " + line)
    return p.returncode, p.stdout, wall


def held_out_reference(model: Path, out: Path) -> str | None:
    """Decode the pretraining run's validation shards (MODEL/../data) to OUT (.jsonl, one doc a line).

    The built-in corpus's "tasks" source (worked examples of the very tasks being fine-tuned on) is left
    out: forgetting is about the rest of what pretraining taught.

    Returns a description, or None when MODEL is not in a pretrain run folder with a matching tokenizer."""
    import numpy as np

    from lmsmith import Tokenizer

    manifest_path = model.resolve().parent / "data" / "manifest.json"
    if not manifest_path.exists() or not (model / "tokenizer.json").exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    tok = Tokenizer.load(model)
    if manifest.get("tokenizer", {}).get("hash") != tok.hash:
        return None
    dtype = np.dtype(manifest.get("dtype", "uint16"))
    eos = int(manifest["eos_id"])
    docs = []
    for src in manifest["sources"]:
        if src["name"] == "tasks" and src["path"] == "<in-memory:tasks>":
            continue
        for shard in src.get("splits", {}).get("validation", {}).get("shards", []):
            ids = np.fromfile(manifest_path.parent / shard["file"], dtype=dtype)
            start = 0
            for cut in np.flatnonzero(ids == eos).tolist() + [len(ids)]:
                if cut > start:
                    docs.append(tok.decode(ids[start:cut].tolist()))
                start = cut + 1
    docs = [d for d in docs if d.strip()]
    if not docs:
        return None
    with open(out, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    n_tok = sum(len(tok.encode(d)) for d in docs)
    return (f"the pretraining run's validation split ({manifest_path.parent}), worked tasks left out: "
            f"{len(docs)} documents, {n_tok:,} tokens, never trained on")


def pydoc_reference(out: Path) -> str:
    from pydoc_data.topics import topics

    with open(out, "w") as f:
        for name in sorted(topics)[:40]:
            f.write(json.dumps({"text": topics[name]}) + "\n")
    return "40 pydoc topics (pydoc_data.topics): NOTE an `lmsmith pretrain` model may have trained on these"


def parse_summary(text: str) -> dict:
    """Numbers from the finetune summary; missing ones are None."""
    r: dict = {}
    m = re.search(r"accuracy before: " + PCT, text)
    r["acc_before"] = (float(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None
    m = re.search(r"Task accuracy (.*?)\. (?:Reference|Wrote|Interrupted|$)", text, re.S)
    after = re.findall(PCT, m.group(1)) if m else []
    r["acc_after"] = (float(after[-1][0]), int(after[-1][1]), int(after[-1][2])) if after else None
    r["per_task_after"] = None
    if m and " -> " in m.group(1):
        tail = m.group(1).rsplit(" -> ", 1)[1]
        r["per_task_after"] = tail.split("; ", 1)[1] if "; " in tail else None
    m = re.search(r"Reference perplexity ([\d.]+) -> ([\d.]+) \(([+-][\d.]+)%\)", text)
    r["ppl"] = (float(m.group(1)), float(m.group(2)), float(m.group(3))) if m else None
    m = re.search(r"([\d,]+) trainable of ([\d,]+) parameters", text)
    r["trainable"] = int(m.group(1).replace(",", "")) if m else None
    r["total"] = int(m.group(2).replace(",", "")) if m else None
    m = re.search(r"([\d,]+) steps in [\d.]+ min", text)
    r["steps"] = int(m.group(1).replace(",", "")) if m else None
    m = re.search(r"final loss (\d+(?:\.\d+)?)", text)
    r["final_loss"] = float(m.group(1)) if m else None
    return r


def loop_seconds(run_dir: Path) -> float | None:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return None
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    times = [r["elapsed"] for r in rows if "elapsed" in r]
    return max(times) if times else None


def fmt_params(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model (HF directory with tokenizer and chat template)")
    ap.add_argument("--task", default="mix", help="`lmsmith data synth --task` (default: mix)")
    ap.add_argument("--n", type=int, default=2000, help="synthetic questions in total (10%% held out)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps, the same for every method")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=96, help="tokens per row (prompt tuning's virtual tokens "
                                                            "come out of it)")
    ap.add_argument("--methods", default="full,lora,prompt,prefix,prompt-only")
    ap.add_argument("--lr-full", type=float, default=1e-3)
    ap.add_argument("--lr-lora", type=float, default=2e-3)
    ap.add_argument("--lr-prompt", type=float, default=3e-2)
    ap.add_argument("--lr-prefix", type=float, default=2e-2)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-targets", default="all-linear", help="all-linear or e.g. q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--virtual-tokens", type=int, default=20)
    ap.add_argument("--ref-data", help="reference text for forgetting (default: the pretraining run's "
                                       "validation split when found, else pydoc topics)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs (default: torch's own; 1 keeps "
                                                "timings stable on a machine shared with other jobs)")
    ap.add_argument("--workdir", help="keep runs here (default: a temporary folder, deleted)")
    args = ap.parse_args()

    if args.threads:
        ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    model = Path(args.model)
    if not (model / "config.json").exists():
        ap.error(f"--model {model}: not an HF model directory (no config.json)")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ftq-"))
    work.mkdir(parents=True, exist_ok=True)

    def log(s: str = "") -> None:
        print(s, flush=True)

    try:
        log(f"finetune_quality: model {model}, task {args.task}, {args.steps} steps x batch {args.batch_size} "
            f"x seq {args.seq_len}, OMP_NUM_THREADS={ENV.get('OMP_NUM_THREADS', 'default')}, "
            f"{os.cpu_count()} CPUs")
        # ---- data --------------------------------------------------------------------------------
        synth = work / "synth"
        rc, _, _ = run_cli(["data", "synth", "--task", args.task, "--n", str(args.n), "--out", str(synth)], log)
        if rc:
            log("data synth failed")
            return 1
        if args.ref_data:
            ref, ref_desc = args.ref_data, f"{args.ref_data} (given)"
        else:
            ref = str(work / "ref.jsonl")
            ref_desc = held_out_reference(model, Path(ref)) or pydoc_reference(Path(ref))
        log(f"reference text: {ref_desc}")

        # ---- the runs ------------------------------------------------------------------------------
        results = []
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            out = work / f"run-{method}"
            flags = ["finetune", str(model), "--data", str(synth / "train.jsonl"),
                     "--eval-tasks", str(synth / "heldout.jsonl"), "--ref-data", ref,
                     "--method", "prompt" if method == "prompt-only" else method,
                     "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
                     "--seq-len", str(args.seq_len), "--out", str(out), "--overwrite", "--no-progress",
                     "--save-every", "0", "--seed", "0",
                     "--val-fraction", "0"]  # every example trains, as when the README's figures were taken
            if method == "full":
                flags += ["--lr", str(args.lr_full)]
                desc = f"full (lr {args.lr_full:g})"
            elif method == "lora":
                flags += ["--lr", str(args.lr_lora), "--lora-r", str(args.lora_r),
                          "--lora-alpha", str(2 * args.lora_r), "--lora-targets", args.lora_targets]
                desc = f"LoRA r={args.lora_r} {args.lora_targets} (lr {args.lr_lora:g})"
            elif method == "prefix":
                flags += ["--lr", str(args.lr_prefix), "--virtual-tokens", str(args.virtual_tokens)]
                desc = f"prefix {args.virtual_tokens} tok + template token rows (lr {args.lr_prefix:g})"
            elif method in ("prompt", "prompt-only"):
                rows = "none" if method == "prompt-only" else "auto"
                flags += ["--lr", str(args.lr_prompt), "--virtual-tokens", str(args.virtual_tokens),
                          "--train-tokens", rows]
                desc = (f"prompt {args.virtual_tokens} tok{' + template token rows' if rows == 'auto' else ''} "
                        f"(lr {args.lr_prompt:g})")
            else:
                log(f"unknown method {method!r}; skipped")
                continue
            log()
            rc, text, wall = run_cli(flags, log)
            r = parse_summary(text) if rc == 0 else {}
            r.update(method=desc, rc=rc, wall=wall, loop=loop_seconds(out))
            if rc == 0 and (r["acc_after"] is None or r["ppl"] is None):
                log(f"WARNING: could not parse the {method} summary (accuracy {r['acc_after']}, ppl {r['ppl']})")
            results.append(r)

        # ---- table -------------------------------------------------------------------------------------
        log()
        log(f"Model {model}; data: `lmsmith data synth --task {args.task} --n {args.n}` "
            f"(train/held-out split by question); {args.steps} steps x {args.batch_size} x seq {args.seq_len} "
            "for every method.")
        log(f"Reference perplexity on {ref_desc}.")
        head = ("method", "trainable", "steps", "wall (loop)", "final loss", "held-out acc before -> after",
                "ref ppl before -> after (Δ)")
        rows = []
        for r in results:
            if r["rc"] != 0:
                rows.append((r["method"], "-", "-", f"{r['wall']:.0f}s", "-", f"FAILED (exit {r['rc']})", "-"))
                continue
            ab, aa, ppl = r["acc_before"], r["acc_after"], r["ppl"]
            acc = (f"{ab[0]:.1f}% -> {aa[0]:.1f}% ({aa[1]}/{aa[2]})" if ab and aa else "?")
            pp = f"{ppl[0]:.2f} -> {ppl[1]:.2f} ({ppl[2]:+.1f}%)" if ppl else "?"
            share = f" ({100 * r['trainable'] / r['total']:.3g}%)" if r["trainable"] and r["total"] else ""
            loop = f" ({r['loop']:.0f}s)" if r["loop"] is not None else ""
            loss = f"{r['final_loss']:.3f}" if r["final_loss"] is not None else "?"
            rows.append((r["method"], fmt_params(r["trainable"]) + share, str(r["steps"] or "?"),
                         f"{r['wall']:.0f}s{loop}", loss, acc, pp))
        widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
        log(line(head))
        log(line(["-" * w for w in widths]))
        for row in rows:
            log(line(row))
        log()
        log("Per-task accuracy after training:")
        for r in results:
            if r.get("per_task_after"):
                log(f"  {r['method']}: {r['per_task_after']}")
        log("wall = the whole `lmsmith finetune` subprocess (load, accuracy/perplexity before and after, save); "
            "loop = the training loop alone (metrics.jsonl).")
        return 0 if all(r["rc"] == 0 for r in results) else 1
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
