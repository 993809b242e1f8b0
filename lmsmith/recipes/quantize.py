"""`lmsmith quantize MODEL --scheme SCHEME --out PATH` and `--report` (the quality table).

load -> write (GGUF file for block schemes, int8 directory, or an HF directory in
f16/bf16) -> summary paragraph. With --report: every scheme written, read back and
scored on --eval-data; table + size-vs-perplexity PNG.
"""

from __future__ import annotations

from pathlib import Path

HELP = "quantize to fp16/bf16/int8 or GGUF (Q8_0, Q4_K_M, Q3_K_M, ...) and measure the quality"
DESCRIPTION = """Quantize MODEL (an HF directory or .gguf file).

Schemes: f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, q3_k_m (GGUF, llama.cpp's
per-tensor mixes) and int8 (per-channel symmetric weight-only, an lmsmith directory
that `lmsmith.load` runs packed). f16/bf16/f32 with an --out that does not end in
.gguf write a Hugging Face directory instead.

examples:
  lmsmith quantize models/my-model --scheme q4_k_m --out my-model-q4_k_m.gguf
  lmsmith quantize models/my-model --scheme int8 --out models/my-model-int8
  lmsmith quantize models/my-model --report --eval-data held-out.txt --schemes f16,q8_0,q4_k_m,q3_k_m
  lmsmith quantize runs/pretrain/final --report --eval-data runs/pretrain/data   # the run's validation split
  lmsmith quantize models/my-model --scheme q4_k_m --calibration calib.txt --out my-model-q4_k_m.gguf
  lmsmith quantize models/my-model --scheme q3_k_m --imatrix imatrix.gguf --out m.gguf   # llama-imatrix's file

Calibration: --calibration DATA runs the model on that text and measures, for every input
column of every linear layer, the mean squared activation (an importance matrix, as
llama.cpp's llama-imatrix does); the K-quant tensors are then quantized to minimise the
importance-weighted error. The file keeps the same types and sizes and runs in llama.cpp
unchanged. --write-imatrix FILE saves the matrix in llama.cpp's format (llama-quantize
--imatrix reads it); --imatrix FILE uses one measured before (by lmsmith or llama.cpp).
--method gptq (with --calibration) also measures every matrix's input second moments and
rounds block span by block span, moving each span's error onto the columns not yet rounded
(GPTQ): lower output error at the same size, still the standard block formats.
"""

DEFAULT_REPORT_SCHEMES = "f16,q8_0,int8,q6_k,q5_k_m,q4_k_m,q4_0,q3_k_m"


def add_arguments(p) -> None:
    p.add_argument("model", help="model directory (or .gguf file)")
    p.add_argument("--scheme", help="quantization scheme (see above)")
    p.add_argument("--out", help="output .gguf file or directory (never replaced without --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--report", action="store_true", help="measure the quality table over --schemes")
    p.add_argument("--eval-data", nargs="+", metavar="PATH",
                   help="held-out text for --report: files, folders, .jsonl, or a token-shard folder (a pretraining "
                        "run's OUT/data: its validation split, which training never saw)")
    p.add_argument("--schemes", default=DEFAULT_REPORT_SCHEMES, help=f"schemes for --report (default: "
                                                                     f"{DEFAULT_REPORT_SCHEMES})")
    p.add_argument("--seq-len", type=int, default=None, help="eval window length (default: model context)")
    p.add_argument("--max-chars", type=int, default=200_000, help="score at most this much text (default: 200000)")
    p.add_argument("--plot", default=None, help="PNG path of the size-vs-perplexity plot "
                                                "(default: quality.png beside --out, or ./quantize_report.png)")
    p.add_argument("--name", default=None, help="general.name written into a GGUF file")
    p.add_argument("--calibration", nargs="+", metavar="PATH",
                   help="text (files, folders, .jsonl, or a token-shard folder's validation split) to measure the "
                        "importance matrix on; calibrates the K-quant tensors of a GGUF scheme")
    p.add_argument("--calibration-tokens", type=int, default=100_000,
                   help="at most this many calibration tokens (default: 100000)")
    p.add_argument("--calibration-ctx", type=int, default=512,
                   help="tokens per calibration chunk, each run from position 0 (default: 512, as llama-imatrix)")
    p.add_argument("--method", choices=["round", "gptq"], default="round",
                   help="round: each block by its own scale search (default); gptq: error compensation between "
                        "block spans from the calibration activations (needs --calibration)")
    p.add_argument("--imatrix", metavar="FILE", help="use this importance matrix (llama.cpp's .gguf or .dat format)")
    p.add_argument("--write-imatrix", metavar="FILE",
                   help="save the measured importance matrix (llama.cpp's GGUF format)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def known_schemes() -> list[str]:
    from ..quant.mixes import scheme_names

    return [*scheme_names(), "int8"]


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def run(args) -> int:
    from ..errors import LmsmithError

    if not args.report and not (args.scheme and args.out):
        raise LmsmithError("give --scheme SCHEME --out PATH, or --report --eval-data FILE")
    if args.scheme and args.scheme.lower() not in known_schemes():
        raise LmsmithError(f"unknown scheme {args.scheme!r}; known schemes: {', '.join(known_schemes())}")
    if args.report and not args.eval_data:
        raise LmsmithError("--report needs --eval-data FILE (held-out text to measure perplexity on)")

    if (args.calibration or args.imatrix) and not (args.scheme and args.out):
        raise LmsmithError("--calibration / --imatrix calibrate a GGUF scheme: give --scheme (q4_k_m, q3_k_m, ...) "
                           "and --out")
    if args.calibration and args.imatrix:
        raise LmsmithError("give --calibration DATA (measure an importance matrix) or --imatrix FILE (use one), "
                           "not both")
    if args.method == "gptq" and not args.calibration:
        raise LmsmithError("--method gptq needs --calibration DATA: it uses the inputs' second moments, which an "
                           "imatrix file does not hold")
    if args.write_imatrix and not args.calibration:
        raise LmsmithError("--write-imatrix saves the matrix --calibration measures; give --calibration DATA")
    for flag, paths in (("--calibration", args.calibration), ("--eval-data", args.eval_data)):
        for path in paths or ():  # before the model loads: a typo should not cost a model load
            if not Path(path).exists():
                raise LmsmithError(f"{flag} {path}: no such file or folder; give text files, folders, .jsonl or "
                                   "a token-shard folder")
    if args.imatrix and not Path(args.imatrix).exists():
        raise LmsmithError(f"--imatrix {args.imatrix}: no such file; measure one with --calibration DATA "
                           "--write-imatrix FILE, or llama-imatrix")
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise LmsmithError(f"--out {args.out} already exists; pass --overwrite to replace it, or choose another path")
    from ..loader import load

    model, tokenizer = load(args.model)
    if args.scheme and args.out:
        _write(model, tokenizer, args, *_importance(model, tokenizer, args))
    if args.report:
        _report(model, tokenizer, args)
    return 0


def _texts(paths: list[str], tokenizer, max_chars: int | None = None):
    """Document texts of files / folders / .jsonl, or a token-shard folder's validation split."""
    from ..data.sources import Source, iter_documents

    total = 0
    for path in paths:
        docs = _validation_documents(path, tokenizer) if (Path(path) / "manifest.json").is_file() else \
            (text for _, text in iter_documents(Source(name="text", path=path)))
        for text in docs:
            if not text.strip():
                continue
            if max_chars is not None:
                text = text[: max_chars - total]
            total += len(text)
            yield text
            if max_chars is not None and total >= max_chars:
                return


def _importance(model, tokenizer, args):
    """(importance, hessians): the importance matrix --calibration measures (saved with --write-imatrix)
    or --imatrix names, and for --method gptq the inputs' second moments; Nones without calibration."""
    from ..errors import LmsmithError
    from ..quant import imatrix

    if args.imatrix:
        return imatrix.load(args.imatrix), None
    if not args.calibration:
        return None, None
    if tokenizer is None:
        raise LmsmithError(f"{args.model}: --calibration needs the model's tokenizer to read the text")
    ctx = min(args.calibration_ctx, model.config.max_seq_len)
    ids: list[int] = []
    for text in _texts(args.calibration, tokenizer):
        ids += tokenizer.encode(text) + [tokenizer.eos_id]
        if len(ids) >= args.calibration_tokens:
            break
    ids = ids[: args.calibration_tokens]
    chunks = [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)] or ([ids] if ids else [])
    if not chunks:
        raise LmsmithError(f"no calibration text in {', '.join(args.calibration)}")
    from tqdm import tqdm

    bar = tqdm(total=sum(map(len, chunks)), unit="tok", desc="imatrix", disable=args.no_progress)
    stats = imatrix.collect(model, chunks, progress=bar.update, hessians=args.method == "gptq")
    bar.close()
    print(f"Importance matrix: {len(stats)} matrices over {sum(map(len, chunks)):,} tokens "
          f"({len(chunks)} chunks of {len(chunks[0])}).")
    if args.write_imatrix:
        imatrix.save(stats, args.write_imatrix, datasets=[str(p) for p in args.calibration], chunk_size=ctx,
                     chunk_count=len(chunks))
        print(f"Written to {args.write_imatrix} (llama-quantize --imatrix reads it).")
    hessians = {name: s.hessian for name, s in stats.items()} if args.method == "gptq" else None
    return {name: s.importance for name, s in stats.items()}, hessians


def _write(model, tokenizer, args, importance=None, hessians=None) -> None:
    scheme, out = args.scheme.lower(), Path(args.out)
    n_params = model.num_params()
    f32_bytes = 4 * n_params
    if scheme == "int8":
        from ..quant.int8 import save_int8

        save_int8(model, tokenizer, out)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        print(f"int8: {n_params:,} weights, every matrix per-channel symmetric int8 with float32 row scales, "
              f"norms in float32; {_human(size)} of weights (1:{f32_bytes / size:.1f} against f32). "
              f"Written to {out}/ - load it with lmsmith.load (linear layers stay packed).")
        return
    if scheme in ("f16", "bf16", "f32") and out.suffix.lower() != ".gguf":
        from ..checkpoint import save

        save(model, tokenizer, out, dtype={"f16": "fp16", "bf16": "bf16", "f32": "fp32"}[scheme])
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        print(f"{scheme}: {n_params:,} weights as a Hugging Face directory, {_human(size)} "
              f"(1:{f32_bytes / size:.1f} against f32). Written to {out}/ (transformers and lmsmith load it).")
        return
    from ..quant.gguf import export_gguf

    if importance is not None and scheme in ("int8", "f16", "bf16", "f32"):
        from ..errors import LmsmithError

        raise LmsmithError(f"--calibration / --imatrix apply to GGUF block schemes (q4_k_m, q3_k_m, ...), not {scheme}")
    s = export_gguf(model, tokenizer, out, scheme, name=args.name, progress=not args.no_progress, imatrix=importance,
                    hessians=hessians)
    per_type = ", ".join(f"{n} {t}" for t, n in sorted(s.type_counts.items(), key=lambda kv: -kv[1]))
    if s.fallbacks:
        fb = "; fallbacks: " + ", ".join(f"{k} {a.name}->{b.name}" for k, (a, b) in list(s.fallbacks.items())[:6])
        if len(s.fallbacks) > 6:
            fb += f" and {len(s.fallbacks) - 6} more"
    else:
        fb = "; no fallbacks"
    calibrated = "; calibrated with the importance matrix" if importance is not None else ""
    calibrated += " and GPTQ error compensation" if hessians is not None else ""
    print(f"{scheme.upper()} ({s.arch} GGUF): {len(s.types)} tensors - {per_type}{fb}{calibrated}. "
          f"{_human(s.file_bytes)} at {s.bits_per_weight:.2f} bits per weight "
          f"(1:{f32_bytes / max(s.tensor_bytes, 1):.1f} against f32), written in {s.seconds:.1f}s to {out}.")


def _validation_documents(folder: str, tokenizer):
    """The validation split of a token-shard folder (a pretraining run's OUT/data), as document texts."""
    import numpy as np

    from ..data import TokenShards

    shards = TokenShards(folder)
    shards.check_tokenizer(tokenizer)
    for source in shards.sources:
        for m in shards.memmaps(source, "validation"):
            ends = np.flatnonzero(np.asarray(m) == tokenizer.eos_id)  # every document ends with eos
            start = 0
            for end in ends:
                yield tokenizer.decode(m[start:end].tolist())
                start = end + 1


def _report(model, tokenizer, args) -> None:
    from ..errors import LmsmithError
    from ..quant.report import format_table, plot_size_vs_perplexity, quality_table

    texts = list(_texts(args.eval_data, tokenizer, args.max_chars))
    total = sum(map(len, texts))
    if not texts:
        raise LmsmithError(f"no text found in {', '.join(args.eval_data)}")
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    rows = quality_table(model, tokenizer, texts, schemes, seq_len=args.seq_len, progress=not args.no_progress)
    print(format_table(rows))
    png = Path(args.plot) if args.plot else (Path(args.out).with_suffix(".quality.png") if args.out
                                             else Path("quantize_report.png"))
    plot_size_vs_perplexity(rows, png, title=f"{Path(args.model).name}: size vs perplexity")
    best = min((r for r in rows[1:] if r.quality in ("lossless", "excellent")), key=lambda r: r.size_bytes,
               default=None)
    pick = f" The smallest scheme within 1% of f32 is {best.scheme} (1:{best.ratio:.1f})." if best else ""
    print(f"\nMeasured {len(rows) - 1} schemes on {total:,} characters of {', '.join(args.eval_data)}; "
          f"perplexity is lmsmith's, on each file read back.{pick} Plot written to {png}.")
