"""lmsmith's GGUF quantizer against llama.cpp's `llama-quantize`, side by side; and packed inference.

Same model for both: a `base`-preset-shaped model (or `--model DIR`) exported as an
f16 GGUF by lmsmith; then each of Q8_0, Q4_K_M, Q3_K_M is produced from that f16
file by lmsmith (load_gguf -> export_gguf) and by llama-quantize, and compared on
file size, quantize time, perplexity (lmsmith's eval on each file read back) and the
RMSE of the weights against the f16 ones. Then greedy decode tokens/s and resident
parameter memory of lmsmith's packed int8 / Q4_K inference against its bf16 path.

llama-quantize is not in the llama-cpp-python wheel; build it from the sdist (~3 min):

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/lq
    cd /tmp/lq && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
          -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build --target llama-quantize -j2     # -> build/bin/llama-quantize

usage:
    python bench/quantize_vs_llamacpp.py [--model DIR] [--llama-quantize PATH] [--preset base]
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SCHEMES = ("q8_0", "q4_k_m", "q3_k_m")


def build_default(preset_name: str, seed: int = 0):
    """A preset-shaped random model with a tokenizer trained on Python's docs (no download)."""
    import pydoc_data.topics

    from lmsmith.config import preset
    from lmsmith.model import build_model
    from lmsmith.tokenizer import Tokenizer

    tok = Tokenizer.train(list(pydoc_data.topics.topics.values()), 4096, show_progress=False)
    vocab = 256 * math.ceil(tok.vocab_size / 256)
    return build_model(preset(preset_name, vocab_size=vocab), seed=seed), tok


def eval_texts(max_chars: int, paths: list[str] | None = None) -> list[str]:
    """Held-out text: the given files/folders/.jsonl (read as `lmsmith eval --data` reads them),
    else the last 10 pydoc topics (which a model pretrained on the default corpus has seen)."""
    if paths:
        from lmsmith.data.sources import Source, iter_documents

        docs = [t for p in paths for _, t in iter_documents(Source(name="eval", path=p))]
        text = "\n".join(docs)
    else:
        import pydoc_data.topics

        text = "\n".join(list(pydoc_data.topics.topics.values())[-10:])
    return [text[:max_chars]]


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized by lmsmith (names as in the file)."""
    from lmsmith.quant.gguf import _dequant_tensor, read_gguf

    r = read_gguf(path)
    out = {}
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        out[t.name] = _dequant_tensor(t.data, int(t.tensor_type), shape)
    return out


def weight_rmse(ref: dict[str, np.ndarray], path: Path) -> float:
    got = tensors_of(path)
    se, n = 0.0, 0
    for name, a in ref.items():
        if a.ndim == 2:
            se += float(((got[name].astype(np.float64) - a) ** 2).sum())
            n += a.size
    return math.sqrt(se / n)


def ppl_of(path: Path, tok, texts, seq_len: int) -> float:
    from lmsmith.eval.perplexity import perplexity
    from lmsmith.loader import load as load_gguf

    m, _ = load_gguf(path)
    return perplexity(m, tok, texts, seq_len=seq_len, batch_size=4).perplexity


def decode_speed(model, tok, n_new: int) -> float:
    from lmsmith.model import KVCache

    ids = torch.tensor([tok.encode("def main():\n    ")])
    cache = KVCache(model.config, 1, ids.shape[1] + n_new + 1, dtype=model.model.embed_tokens.weight.dtype)
    with torch.no_grad():
        out = model(ids, cache=cache, last_only=True)
        nxt = out.argmax(-1)
        t0 = time.perf_counter()
        for _ in range(n_new):
            nxt = model(nxt, cache=cache).argmax(-1)
    return n_new / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a trained model directory (default: build a preset-shaped one)")
    ap.add_argument("--preset", default="base", help="preset shape when no --model (default: base)")
    ap.add_argument("--llama-quantize", help="path of llama.cpp's llama-quantize binary")
    ap.add_argument("--max-chars", type=int, default=20000, help="eval text length (default: 20000)")
    ap.add_argument("--eval-text", nargs="+", metavar="PATH",
                    help="held-out text files/folders/.jsonl (default: the last 10 pydoc topics)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from lmsmith.loader import load as load_gguf
    from lmsmith.quant.gguf import export_gguf
    from lmsmith.quant.linear import apply_quantization, resident_bytes

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.model:
        import lmsmith.checkpoint

        model, tok = lmsmith.load(args.model)
        what = args.model
    else:
        model, tok = build_default(args.preset)
        what = f"random {args.preset}-shaped model"
    print(f"model: {what}, {model.num_params() / 1e6:.1f}M params, vocab {model.config.vocab_size}")
    lq = args.llama_quantize or shutil.which("llama-quantize")
    if lq and not Path(lq).is_file():
        lq = None
    if not lq:
        print("llama-quantize not found (give --llama-quantize PATH; see the docstring to build it): "
              "its column is skipped")
    texts = eval_texts(args.max_chars, args.eval_text)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qbench-"))
    work.mkdir(parents=True, exist_ok=True)

    f16 = work / "f16.gguf"
    export_gguf(model, tok, f16, "f16", progress=False)
    ref = tensors_of(f16)
    base_ppl = ppl_of(f16, tok, texts, args.seq_len)
    print(f"f16 GGUF: {f16.stat().st_size / 1e6:.1f} MB, perplexity {base_ppl:.3f}\n")

    rows = []
    src, _ = load_gguf(f16)
    for scheme in SCHEMES:
        ours = work / f"lmsmith-{scheme}.gguf"
        t0 = time.perf_counter()
        export_gguf(src, tok, ours, scheme, progress=False)
        t_ours = time.perf_counter() - t0
        row = {"scheme": scheme.upper(), "ours": (ours.stat().st_size, t_ours, ppl_of(ours, tok, texts, args.seq_len),
                                                  weight_rmse(ref, ours))}
        if lq:
            theirs = work / f"llamacpp-{scheme}.gguf"
            t0 = time.perf_counter()
            subprocess.run([lq, str(f16), str(theirs), scheme.upper(), "2"], check=True, capture_output=True)
            t_theirs = time.perf_counter() - t0
            row["theirs"] = (theirs.stat().st_size, t_theirs, ppl_of(theirs, tok, texts, args.seq_len),
                             weight_rmse(ref, theirs))
        rows.append(row)
        print(f"  {scheme} done", file=sys.stderr)

    head = f"{'scheme':8} {'tool':9} {'size MB':>8} {'time s':>7} {'perplexity':>11} {'Δppl%':>7} {'weight RMSE':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        for tool, key in (("lmsmith", "ours"), ("llama.cpp", "theirs")):
            if key not in r:
                continue
            size, sec, ppl, rmse = r[key]
            print(f"{r['scheme']:8} {tool:9} {size / 1e6:8.2f} {sec:7.1f} {ppl:11.3f} "
                  f"{100 * (ppl - base_ppl) / base_ppl:+7.2f} {rmse:12.3e}")
        if "theirs" in r:
            o, t = r["ours"], r["theirs"]
            print(f"{'':8} {'ratio':9} {o[0] / t[0]:8.3f} {o[1] / t[1]:7.1f}x {'':11} {'':7} {o[3] / t[3]:12.3f}")

    print("\npacked inference (greedy decode, batch 1, bf16 activations):")
    bf16 = copy.deepcopy(src).to(torch.bfloat16)
    base_speed, base_mem = decode_speed(bf16, tok, args.decode_tokens), resident_bytes(bf16)
    print(f"  {'path':8} {'tokens/s':>9} {'resident MB':>12} {'vs bf16':>8}")
    print(f"  {'bf16':8} {base_speed:9.1f} {base_mem / 1e6:12.1f} {'1.00x':>8}")
    del bf16
    for scheme in ("int8", "q4_k"):
        m = copy.deepcopy(src).to(torch.bfloat16)
        apply_quantization(m, scheme)
        sp, mem = decode_speed(m, tok, args.decode_tokens), resident_bytes(m)
        print(f"  {scheme:8} {sp:9.1f} {mem / 1e6:12.1f} {sp / base_speed:7.2f}x  (memory {mem / base_mem:.2f}x)")
        del m
    print(f"\nfiles in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
