"""`lmsmith distill cache`: run the teacher once over token windows and keep its top-K targets on disk.

Read top to bottom: the teacher -> the token shards (--data DIR, --source, the teacher's own shards,
or the built-in corpus tokenized into OUT/data) -> `data.teacher_cache.write_cache` -> summary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

_DEFAULT_TOKENS = 2_000_000


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    """Run TEACHER once over fixed windows of the token shards and store, per position, its
top-K next-token ids and log-probabilities plus the log of the remaining mass
(memory-mapped arrays + manifest.json tying them to the shards and the teacher).
`lmsmith distill --teacher-cache OUT` then trains without loading the teacher.

Disk: K x 4 + 4 bytes per position (K = 64: 260 bytes; 2M tokens: 520 MB).
With K = the vocabulary the cached loss equals online distillation.

example:
  lmsmith distill cache --teacher runs/pretrain/final --top-k 64 --tokens 2e6 --out runs/teacher-cache"""
    p.add_argument("--teacher", metavar="MODEL", help="teacher: HF directory, .gguf file or int8 directory "
                                                      "(default: runs/pretrain/final)")
    p.add_argument("--out", required=True, help="the cache folder to write")
    p.add_argument("--data", metavar="DIR", help="token shards from `lmsmith data prepare` (default: the shards next "
                                                 "to the teacher, else the built-in corpus)")
    p.add_argument("--source", action="append", metavar="NAME=PATH[:WEIGHT]", help="a text source (repeatable)")
    p.add_argument("--top-k", type=int, default=64, help="token ids kept per position (default: 64)")
    p.add_argument("--tokens", type=float, default=_DEFAULT_TOKENS,
                   help=f"train positions to cache, a seeded sample of windows (default: {_DEFAULT_TOKENS:.0e})")
    p.add_argument("--val-tokens", type=float, default=81920,
                   help="validation positions to cache (default: 81920 = 20 batches of 16 x 256)")
    p.add_argument("--seq-len", type=int, default=256, help="positions per window (default: 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="the teacher's softmax temperature (default: 1)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per teacher forward (default: 16)")
    p.add_argument("--dtype", default="auto", help="the teacher's precision policy (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="which windows a --tokens cap keeps (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache in --out")


def run_cache(args: argparse.Namespace) -> int:
    from ..data import TokenShards, parse_source, prepare, resolve_sources
    from ..data.teacher_cache import write_cache
    from ..errors import LmsmithError
    from .distill import DEFAULTS, _load_teacher
    from .pretrain import _shards

    t0 = time.time()
    out = Path(args.out)
    teacher_path = args.teacher or DEFAULTS["teacher"]
    if (out / "manifest.json").exists() and not args.overwrite:
        raise LmsmithError(f"{out} already holds a teacher cache; pass --overwrite to replace it or --out NEWDIR")
    for flag in ("seq_len", "batch_size", "top_k"):
        if getattr(args, flag) < 1:
            raise LmsmithError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be a positive integer")
    if not args.tokens >= 1:
        raise LmsmithError(f"--tokens {args.tokens}: must be a positive number of positions")
    teacher, tokenizer = _load_teacher(teacher_path)
    if args.data:
        shards = TokenShards(args.data)
        shards.check_tokenizer(tokenizer)
    elif not args.source and (Path(teacher_path).parent / "data" / "manifest.json").exists() and \
            TokenShards(Path(teacher_path).parent / "data").tokenizer_hash == tokenizer.hash:
        shards = TokenShards(Path(teacher_path).parent / "data")
    else:
        corpus = resolve_sources([parse_source(s) for s in args.source] if args.source else None)
        shards = _shards(out / "data", tokenizer, corpus, prepare, TokenShards, resume=False)
    print(f"lmsmith distill cache: teacher {teacher_path}, shards {shards.path}, top-{args.top_k} of "
          f"{teacher.config.vocab_size:,} at T={args.temperature:g}, windows of {args.seq_len}")
    write_cache(teacher, shards, out, top_k=args.top_k, seq_len=args.seq_len, tokens=int(args.tokens),
                val_tokens=int(args.val_tokens), temperature=args.temperature, batch_size=args.batch_size,
                seed=args.seed, teacher_path=str(Path(teacher_path).resolve()), policy=args.dtype)
    from ..data.teacher_cache import TeacherCache

    cache = TeacherCache(out)
    size = sum(f.stat().st_size for f in out.glob("*.bin"))
    print(f"\nCached the teacher's top-{cache.top_k} at {cache.windows('train'):,} train and "
          f"{cache.windows('validation'):,} validation windows of {cache.seq_len} in {time.time() - t0:.0f} s: "
          f"{size / 1e6:,.1f} MB in {out}.\nNext: `lmsmith distill --teacher-cache {out} --student nano "
          f"--out runs/distill-cached`.")
    return 0
