"""lmsmith's GGUF quantizer against llama.cpp's `llama-quantize`, side by side, without and with
calibration.

Same model for both: a `base`-preset-shaped model (or `--model DIR`) exported as an
f16 GGUF by lmsmith; then each of Q8_0, Q4_K_M, Q3_K_M is produced from that f16
file by lmsmith (load_gguf -> export_gguf) and by llama-quantize, and compared on
file size, quantize time, perplexity (lmsmith's eval on each file read back) and the
RMSE of the weights against the f16 ones. With `--calibration TEXT`, Q4_K_M and Q3_K_M
are also made calibrated: lmsmith measures its importance matrix on TEXT
(`quant.imatrix.collect`), llama.cpp's `llama-imatrix` measures its own on the same TEXT
for `llama-quantize --imatrix`; the table then compares the perplexity increases.
(Decode speed of the packed files: bench/quant_decode_speed.py.)

llama-quantize is not in the llama-cpp-python wheel; build it from the sdist (~3 min):

    pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d /tmp/lq
    cd /tmp/lq && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
          -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build --target llama-quantize llama-imatrix -j2   # -> build/bin/

usage:
    python bench/quantize_vs_llamacpp.py [--model DIR] [--llama-quantize PATH] [--preset base]
        [--calibration TEXT --llama-imatrix PATH]
"""

from __future__ import annotations

import argparse
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


def calibrated_pair(src, tok, f16: Path, scheme: str, work: Path, args, texts, lq: str | None) -> dict:
    """Q-scheme files made with an importance matrix by both tools, on the same calibration text."""
    from lmsmith.quant import imatrix
    from lmsmith.quant.gguf import export_gguf

    calib = "\n".join(eval_texts(args.calibration_chars, args.calibration))
    ids = tok.encode(calib)
    ctx = min(512, src.config.max_seq_len)
    chunks = [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]
    out = {}
    t0 = time.perf_counter()
    stats = imatrix.collect(src, chunks, hessians=True)
    imp = {n: st.importance for n, st in stats.items()}
    t_collect = time.perf_counter() - t0
    for key, hess in (("ours+imatrix", None), ("ours+gptq", {n: st.hessian for n, st in stats.items()})):
        t0 = time.perf_counter()
        ours = work / f"lmsmith-{scheme}-{key.split('+')[1]}.gguf"
        export_gguf(src, tok, ours, scheme, progress=False, imatrix=imp, hessians=hess)
        out[key] = (ours.stat().st_size, t_collect + time.perf_counter() - t0, ppl_of(ours, tok, texts, args.seq_len),
                    weight_rmse(tensors_of(f16), ours))
    li = args.llama_imatrix or (str(Path(lq).with_name("llama-imatrix")) if lq else None)
    if lq and li and Path(li).is_file():
        (work / "calib.txt").write_text(calib)
        mat = work / "llamacpp.imatrix.gguf"
        t0 = time.perf_counter()
        if not mat.exists():
            subprocess.run([li, "-m", str(f16), "-f", str(work / "calib.txt"), "-o", str(mat), "-c", str(ctx),
                            "-t", str(torch.get_num_threads())], check=True, capture_output=True)
        theirs = work / f"llamacpp-{scheme}-imatrix.gguf"
        subprocess.run([lq, "--imatrix", str(mat), str(f16), str(theirs), scheme.upper(), "2"], check=True,
                       capture_output=True)
        out["theirs+imatrix"] = (theirs.stat().st_size, time.perf_counter() - t0,
                                 ppl_of(theirs, tok, texts, args.seq_len), weight_rmse(tensors_of(f16), theirs))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a trained model directory (default: build a preset-shaped one)")
    ap.add_argument("--preset", default="base", help="preset shape when no --model (default: base)")
    ap.add_argument("--llama-quantize", help="path of llama.cpp's llama-quantize binary")
    ap.add_argument("--max-chars", type=int, default=20000, help="eval text length (default: 20000)")
    ap.add_argument("--eval-text", nargs="+", metavar="PATH",
                    help="held-out text files/folders/.jsonl (default: the last 10 pydoc topics)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calibration", nargs="+", metavar="PATH",
                    help="calibration text for the importance matrices (Q4_K_M and Q3_K_M calibrated rows)")
    ap.add_argument("--calibration-chars", type=int, default=200_000)
    ap.add_argument("--llama-imatrix", help="path of llama.cpp's llama-imatrix (default: beside llama-quantize)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from lmsmith.loader import load as load_gguf
    from lmsmith.quant.gguf import export_gguf

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
        if args.calibration and scheme != "q8_0":
            row.update(calibrated_pair(src, tok, f16, scheme, work, args, texts, lq))
        rows.append(row)
        print(f"  {scheme} done", file=sys.stderr)

    head = f"{'scheme':8} {'tool':12} {'size MB':>8} {'time s':>7} {'perplexity':>11} {'Δppl%':>7} {'weight RMSE':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        for tool, key in (("lmsmith", "ours"), ("llama.cpp", "theirs"), ("lmsmith+im", "ours+imatrix"),
                          ("lmsmith+gptq", "ours+gptq"), ("llama.cpp+im", "theirs+imatrix")):
            if key not in r:
                continue
            size, sec, ppl, rmse = r[key]
            print(f"{r['scheme']:8} {tool:12} {size / 1e6:8.2f} {sec:7.1f} {ppl:11.3f} "
                  f"{100 * (ppl - base_ppl) / base_ppl:+7.2f} {rmse:12.3e}")
        if "theirs" in r:
            o, t = r["ours"], r["theirs"]
            print(f"{'':8} {'ratio':12} {o[0] / t[0]:8.3f} {o[1] / t[1]:7.1f}x {'':11} {'':7} {o[3] / t[3]:12.3f}")
        if "ours+imatrix" in r and "theirs+imatrix" in r:
            dt = r["theirs+imatrix"][2] - base_ppl
            for key in ("ours+imatrix", "ours+gptq"):
                do = r[key][2] - base_ppl
                print(f"{'':8} {key}: perplexity increase / llama.cpp+imatrix's = {do / dt:.2f}x" if dt > 0 else
                      f"{'':8} llama.cpp's calibrated file does not raise perplexity (delta {dt:+.3f})")

    print(f"\nfiles in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
