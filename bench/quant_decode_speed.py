"""Decode speed and resident memory of quantized weights: lmsmith's packed inference vs llama.cpp.

One `base`-shaped model (random weights, or `--model DIR`; decode speed does not depend on the
values, and every run decodes exactly `--new` tokens with EOS ignored) is exported by lmsmith as
Q8_0, Q4_K_M and Q3_K_M GGUF files. Then, for each, greedy decode tokens/s at batch 1 and 8 and
resident parameter memory:

- lmsmith: fp32 (the decode layout `generate` uses), bf16, int8 (per-row, packed), and each GGUF
  file loaded with `lmsmith.load(path, packed=True)` (the file's bytes stay resident);
- llama.cpp (llama-cpp-python, same file, same threads, batch 1): prompt once, then `--new`
  tokens; its tokens/s is the decode part only (prompt time measured apart and subtracted).

Ratios: each path against lmsmith's fastest unquantized one, and lmsmith against llama.cpp on the
same file. Run it alone on the machine (two torch processes slow each other down 10x).

    python bench/quant_decode_speed.py [--preset base] [--model DIR] [--new 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    return f"{name} ({'AVX512-BF16' if 'avx512_bf16' in info else 'AVX2, no AVX512-BF16'})"


def decode_time(model, prompts: list[list[int]], new: int) -> float:
    """Seconds of greedy decoding of `new` tokens per prompt, the prefill subtracted."""
    from lmsmith.decoding import GenerationConfig, generate_ids

    def run(n):
        t0 = time.perf_counter()
        generate_ids(model, prompts, GenerationConfig(max_new_tokens=n, eos_ids=[]))
        return time.perf_counter() - t0

    return run(new + 1) - run(1)


def llamacpp_timer(path: Path, prompt: list[int], threads: int):
    """`time(new) -> seconds` of llama.cpp decoding `new` greedy tokens after `prompt` (prefill
    subtracted), or None without llama-cpp-python."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)

    def run(n):
        llm.reset()
        t0 = time.perf_counter()
        for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
            if i + 1 >= n:
                break
        return time.perf_counter() - t0

    return lambda new: run(new + 1) - run(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--model", help="a model directory instead of random weights")
    ap.add_argument("--new", type=int, default=64, help="tokens decoded per sequence")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--schemes", default="q8_0,q4_k_m,q3_k_m")
    ap.add_argument("--rounds", type=int, default=3, help="measurement rounds over all paths (best of each)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import lmsmith
    from lmsmith.config import preset
    from lmsmith.decoding.layout import use_decode_layout
    from lmsmith.model import build_model
    from lmsmith.quant.gguf import export_gguf
    from lmsmith.quant.kernels import library
    from lmsmith.quant.linear import apply_quantization, resident_bytes
    from lmsmith.tokenizer import Tokenizer

    if args.model:
        model, tok = lmsmith.load(args.model)
    else:
        model = build_model(preset(args.preset), seed=0).eval()
        import pydoc_data.topics

        tok = Tokenizer.train(list(pydoc_data.topics.topics.values()), model.config.vocab_size,
                              show_progress=False)
    cfg = model.config
    print(f"CPU: {cpu_name()}; {args.threads} threads; torch {torch.__version__}; kernels: "
          f"{'built' if library() else 'NOT AVAILABLE (torch fallback)'}")
    print(f"model: {args.model or 'preset ' + args.preset} ({model.num_params() / 1e6:.1f}M params), prompt "
          f"{args.prompt_len} tokens, {args.new} new tokens, greedy, EOS ignored\n")
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, cfg.vocab_size, (b, args.prompt_len), generator=g).tolist() for b in (1, 8)}

    paths = {}  # name -> (model, llama.cpp tok/s at batch 1)
    paths["fp32 (decode layout)"] = (use_decode_layout(copy.deepcopy(model)), None)
    paths["bf16"] = (copy.deepcopy(model).to(torch.bfloat16), None)
    q = copy.deepcopy(model)
    apply_quantization(q, "int8")
    paths["int8 (per row)"] = (q, None)
    tmp = tempfile.TemporaryDirectory()
    for scheme in args.schemes.split(","):
        path = Path(tmp.name) / f"model-{scheme}.gguf"
        export_gguf(model, tok, path, scheme)
        packed, _ = lmsmith.load(path, packed=True)
        timer = llamacpp_timer(path, prompts[1][0], args.threads)
        paths[f"{scheme.upper()} packed ({os.path.getsize(path) / 1e6:.0f} MB file)"] = (packed, timer)
    # Rounds over every path, best of each: a noisy minute on a shared VM then hits all paths alike.
    best = {(name, b): float("inf") for name in paths for b in (1, 8, "llama.cpp")}
    for r in range(args.rounds):
        for name, (m, timer) in paths.items():
            for b in (1, 8):
                decode_time(m, prompts[b], 2)  # warm-up
                best[name, b] = min(best[name, b], decode_time(m, prompts[b], args.new))
            if timer is not None:
                timer(2)
                best[name, "llama.cpp"] = min(best[name, "llama.cpp"], timer(args.new))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    rows = [(name, args.new / best[name, 1], 8 * args.new / best[name, 8], resident_bytes(m),
             args.new / best[name, "llama.cpp"] if timer is not None else None)
            for name, (m, timer) in paths.items()]
    best = max(r[1] for r in rows[:2])
    print(f"\n{'path':<32} {'tok/s b=1':>10} {'tok/s b=8':>10} {'resident MB':>12} {'vs best float':>14} "
          f"{'llama.cpp b=1':>14} {'vs llama.cpp':>13}")
    for name, b1, b8, mem, lc in rows:
        lc_s = f"{lc:14.1f} {b1 / lc:12.2f}x" if lc else f"{'-':>14} {'-':>13}"
        print(f"{name:<32} {b1:10.1f} {b8:10.1f} {mem / 1e6:12.1f} {b1 / best:13.2f}x {lc_s}")


if __name__ == "__main__":
    main()
