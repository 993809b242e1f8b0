"""`lmsmith data prepare`: text corpora -> token shards for pretraining.

Parse the sources -> load the tokenizer -> read, clean, de-duplicate, tokenize (progress bar)
-> write shards + manifest.json atomically -> summary. The work is `lmsmith.data.prepare`,
which `lmsmith pretrain` calls directly.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

HELP = "prepare token shards from text corpora, or generate synthetic instruction data"
DESCRIPTION = """Prepare token shards from text corpora, or generate synthetic instruction data.

  prepare   read text files, folders, JSONL (.jsonl, .jsonl.gz) or Parquet; normalise (NFC),
            drop short and duplicate documents, tokenize in parallel, and write memory-mappable
            shards per source and split (train / validation) with a manifest.json.
  synth     generate instruction data with exactly checkable answers (arithmetic, reverse, sort,
            convert, lookup, mix): train.jsonl, heldout.jsonl and preference.jsonl for DPO.
"""

SYNTH_DESCRIPTION = """Generate instruction/solution pairs whose answers can be checked exactly.

Tasks: arithmetic ("What is 37 + 45?" -> "82"), reverse (words), sort (words
alphabetically), convert (units, integer results), lookup (capitals of made-up
countries given in the prompt), mix (the tasks in turn: an equal share of each
while it has new questions; convert has only 320 distinct ones, so a larger --n
gives the other tasks more). Writes OUT/train.jsonl
and OUT/heldout.jsonl ({"task", "instruction", "solution"}, disjoint by question)
and OUT/preference.jsonl ({"prompt", "chosen", "rejected"}, a wrong answer as
rejected) from the train split.

example:
  lmsmith data synth --task mix --n 2000 --out synth/
  lmsmith finetune MODEL --data synth/train.jsonl --eval-tasks synth/heldout.jsonl
"""

PREPARE_DESCRIPTION = """Read sources, clean them, tokenize them and write token shards + manifest.json.

Each source is NAME=PATH[:WEIGHT]: a text file (one document), a folder (every text file
in it, recursively; binary files skipped and counted), a .jsonl/.jsonl.gz file (one document
per line, in the field --text-field) or a .parquet file (one document per row; needs
pip install 'lmsmith[parquet]'). WEIGHT (default 1) sets how often training samples the
source. Without --source the embedded corpus is used: the Python standard library's
source ("code", weight 0.7), the interpreter's documentation topics ("docs", 0.3),
worked examples of the synthetic tasks as plain text ("tasks", 0.1) and short English
stories from a grammar with known next-word probabilities ("stories", 0.15).

A source left with no documents is an error if it is the only one, else a warning and it
is left out.

example:
  lmsmith data prepare --source web=data/web.jsonl.gz:3 --source books=books/ \\
      --tokenizer tok/ --out shards/
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `prepare` action and its options."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(parser))
    p = sub.add_parser("prepare", help="text corpora -> token shards + manifest.json",
                       description=PREPARE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", "-s", action="append", default=[], metavar="NAME=PATH[:WEIGHT]",
                   help="a named source (repeatable); default: the embedded stdlib + pydoc corpus")
    p.add_argument("--tokenizer", "-t", required=True, metavar="DIR",
                   help="tokenizer directory (tokenizer.json), e.g. from `lmsmith tokenizer train`")
    p.add_argument("--out", "-o", required=True, metavar="DIR",
                   help="output folder for shards + manifest.json")
    p.add_argument("--text-field", default="text", metavar="FIELD",
                   help="JSONL field / Parquet column holding the text (default: text)")
    p.add_argument("--min-chars", type=int, default=32, metavar="N",
                   help="drop documents shorter than N characters (default 32)")
    p.add_argument("--val-fraction", type=float, default=0.02, metavar="F",
                   help="fraction of each source's documents held out for validation (default 0.02)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip and count malformed JSONL lines instead of stopping")
    p.add_argument("--seed", type=int, default=0, help="changes which documents go to validation (default 0)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                   help="tokens per shard file at most (default 100M)")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    s = sub.add_parser("synth", help="generate instruction data with checkable answers (for fine-tuning demos)",
                       description=SYNTH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--task", default="mix",
                   help="arithmetic | reverse | sort | convert | lookup | mix (default: mix); or stories: simple "
                        "English stories from a grammar whose next-word probabilities are known")
    s.add_argument("--n", type=int, default=2000, help="questions (or stories) in total (default 2000)")
    s.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--held-out-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of questions held out for evaluation (default 0.1)")


def run(args: argparse.Namespace) -> int:
    """Dispatch the action."""
    if args.action == "prepare":
        return _prepare(args)
    if args.action == "synth":
        return _synth(args)
    raise AssertionError(args.action)  # argparse only lets known actions through


def _prepare(args: argparse.Namespace) -> int:
    from ..data import parse_source, prepare
    from ..tokenizer import Tokenizer

    # Sources are parsed and checked before the tokenizer loads, so a typo fails fast.
    sources = [parse_source(s) for s in args.source]
    for s in sources:
        s.check_exists()
    tok = Tokenizer.load(args.tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = prepare(
            sources or None, tok, args.out, text_field=args.text_field, min_chars=args.min_chars,
            val_fraction=args.val_fraction, skip_bad=args.skip_bad, seed=args.seed,
            shard_tokens=args.shard_tokens, progress=not args.no_progress,
        )
    for w in caught:
        print(f"lmsmith: warning: {w.message}", file=sys.stderr)
    print(summary(manifest, args.out))
    return 0


def _synth(args: argparse.Namespace) -> int:
    if args.task == "stories":
        return _stories(args)
    from ..data.synth import write_synth

    r = write_synth(args.task, args.n, args.out, seed=args.seed, heldout_fraction=args.held_out_fraction)
    per = ", ".join(f"{t} {n}" for t, n in sorted(r["tasks"].items()))
    print(f"Generated {r['n_train'] + r['n_heldout']:,} questions ({per}): {r['n_train']:,} in {r['train']}, "
          f"{r['n_heldout']:,} held out in {r['heldout']}, {r['n_train']:,} preference pairs in "
          f"{r['preference']}. Next: `lmsmith finetune MODEL --data {r['train']} --eval-tasks {r['heldout']}`.")
    if r["heldout_in_corpus"]:
        print(f"note: {r['heldout_in_corpus']:,} held-out questions may also appear in the built-in pretraining "
              "corpus (only a fifth of all questions is kept out of it); use a smaller --held-out-fraction")
    return 0


def _stories(args: argparse.Namespace) -> int:
    from ..data.stories import generate_stories
    from ..errors import LmsmithError
    from ..fileio import atomic_file

    if args.n < 1:
        raise LmsmithError(f"--n {args.n} must be >= 1")
    path = Path(args.out) / "stories.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    stories = generate_stories(args.n, seed=args.seed)
    with atomic_file(path, "w") as f:
        for text in stories:
            f.write(json.dumps({"text": text}) + "\n")
    words = sum(len(t.split()) for t in stories)
    print(f"Generated {len(stories):,} stories ({words:,} words) in {path}. Their grammar's exact next-word "
          f"probabilities: lmsmith.data.stories.true_next_word(prefix). Next: `lmsmith data prepare {path} "
          f"--out shards/` or `lmsmith pretrain --source stories={path}`.")
    return 0


def summary(manifest: dict, out: str) -> str:
    """The one-paragraph report of a prepared shard folder."""
    per = []
    for e in manifest["sources"]:
        tr, va = e["splits"]["train"], e["splits"]["validation"]
        per.append(
            f"{e['name']} (weight {e['weight']:g}): {e['documents']:,} documents, {e['tokens']:,} tokens "
            f"({tr['tokens']:,} train / {va['tokens']:,} validation in {va['documents']:,} documents)"
        )
    totals = {k: sum(e[k] for e in manifest["sources"] + manifest["excluded"])
              for k in ("duplicates", "too_short", "skipped_binary", "bad_lines", "replaced_bytes")}
    excluded = ""
    if manifest["excluded"]:
        excluded = f" Left out (no documents): {', '.join(e['name'] for e in manifest['excluded'])}."
    return (
        f"Prepared {manifest['total_documents']:,} documents, {manifest['total_tokens']:,} tokens "
        f"({manifest['dtype']}) from {len(manifest['sources'])} source(s): {'; '.join(per)}. "
        f"Dropped {totals['duplicates']:,} duplicates, {totals['too_short']:,} shorter than "
        f"{manifest['min_chars']} characters, {totals['skipped_binary']:,} binary files and "
        f"{totals['bad_lines']:,} bad lines; replaced {totals['replaced_bytes']:,} undecodable bytes."
        f"{excluded} Wrote shards and manifest.json to {out} "
        f"(tokenizer {manifest['tokenizer']['hash'][:16]}); "
        f"train on it with MixtureBatches/TokenShards from lmsmith.data."
    )
