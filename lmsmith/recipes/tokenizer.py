"""`lmsmith tokenizer train`: train a byte-level BPE tokenizer on text files and folders.

Read the inputs (folders recursively, binary files skipped) -> train with a progress bar
-> save tokenizer.json + tokenizer_config.json -> measure bytes per token on the input -> summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import LmsmithError

HELP = "train a byte-level BPE tokenizer on text files"
DESCRIPTION = """Train a byte-level BPE tokenizer (Qwen2 pre-tokenizer: digits one by one, every byte
representable) on text files and folders, and save it as a Hugging Face tokenizer directory
(tokenizer.json + tokenizer_config.json with a ChatML chat template).

example:
  lmsmith tokenizer train --input my_corpus/ notes.txt --vocab-size 8192 --out tok/
"""

# Folders we never descend into: version control, caches, virtual environments.
_SKIP_DIRS = {"__pycache__", "node_modules", ".git", ".hg", ".svn", ".venv", "venv", ".tox", ".mypy_cache"}
_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a file as binary (the same test git uses)
_MEASURE_BYTES = 64 << 20  # bytes-per-token is measured on at most this much of the input


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `train` action and its options."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=type(parser))
    train = sub.add_parser(
        "train",
        help="train a byte-level BPE tokenizer on text files/folders",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--input",
        "-i",
        nargs="+",
        required=True,
        metavar="PATH",
        help="text files or folders (read recursively; binary files are skipped)",
    )
    train.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help="tokens in the vocabulary, special tokens included (e.g. 8192)",
    )
    train.add_argument("--out", "-o", required=True, metavar="DIR", help="directory to write the tokenizer to")
    train.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        metavar="K",
        help="a pair must occur at least K times to be merged (default 2)",
    )
    train.add_argument("--no-progress", action="store_true", help="do not show progress bars")


def run(args: argparse.Namespace) -> int:
    """Train, save, measure and print a summary."""
    from ..tokenizer import Tokenizer

    files = collect_files(args.input)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LmsmithError(f"--out {out} exists and is not a directory; choose a directory path")
    if not any(_is_text(f) for f in files):  # fail before training, not after
        raise LmsmithError(
            f"no text files among the {len(files)} file(s) in {' '.join(args.input)} "
            "(all are binary or not UTF-8); point --input at text files"
        )
    stats = {"files": 0, "skipped": 0, "bytes": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a vocabulary smaller than asked is reported in the summary instead
        tok = Tokenizer.train(
            _read_texts(files, stats),
            args.vocab_size,
            min_frequency=args.min_frequency,
            show_progress=not args.no_progress,
        )
    tok.save(out)

    # Bytes per token on (a bounded prefix of) the training input: the compression the tokenizer achieves.
    measured_bytes = measured_tokens = 0
    batch: list[str] = []
    for text in _read_texts(files, {"files": 0, "skipped": 0, "bytes": 0}):
        batch.append(text)
        measured_bytes += len(text.encode("utf-8"))
        if len(batch) >= 64 or measured_bytes >= _MEASURE_BYTES:
            measured_tokens += sum(map(len, tok.encode_batch(batch)))
            batch = []
        if measured_bytes >= _MEASURE_BYTES:
            break
    measured_tokens += sum(map(len, tok.encode_batch(batch)))
    ratio = measured_bytes / measured_tokens if measured_tokens else 0.0
    on = "the input" if measured_bytes >= stats["bytes"] else f"the first {measured_bytes / 1e6:.1f} MB of the input"

    short = ""
    if tok.vocab_size < args.vocab_size:
        short = (
            f" (fewer than the {args.vocab_size} requested: the corpus has too few distinct pairs at "
            f"--min-frequency {args.min_frequency}; add text or lower it)"
        )
    skipped = f", {stats['skipped']} binary/non-UTF-8 file(s) skipped" if stats["skipped"] else ""
    print(
        f"Trained a byte-level BPE tokenizer with {tok.vocab_size} tokens{short} "
        f"(special: {', '.join(t.content for t in tok.backend.get_added_tokens_decoder().values())}) "
        f"on {stats['files']} file(s), {_human(stats['bytes'])}{skipped}. "
        f"Average {ratio:.2f} bytes per token on {on}. "
        f"Wrote {out / 'tokenizer.json'} and {out / 'tokenizer_config.json'} (ChatML chat template); "
        f"load it with lmsmith.Tokenizer.load('{out}') or "
        f"transformers' AutoTokenizer.from_pretrained('{out}'). "
        f"sha256 {tok.hash[:16]}.",
        file=sys.stdout,
    )
    return 0


def collect_files(inputs: list[str]) -> list[Path]:
    """Files named, plus every file under the folders named (sorted, hidden/cache folders skipped)."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
                found += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
            if not found:
                raise LmsmithError(f"--input folder {p} has no files; point it at a folder of text files")
            files += found
        else:
            raise LmsmithError(f"--input {p} does not exist; check the path")
    return files


def _read_texts(files: list[Path], stats: dict) -> Iterator[str]:
    """Contents of the text files (strict UTF-8, no NUL in the first 8 KiB); counts into `stats`."""
    for f in files:
        try:
            data = f.read_bytes()
        except OSError as e:
            raise LmsmithError(f"cannot read {f} ({e.strerror}); check its permissions") from None
        if b"\0" in data[:_SNIFF_BYTES]:
            stats["skipped"] += 1
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            stats["skipped"] += 1
            continue
        stats["files"] += 1
        stats["bytes"] += len(data)
        yield text


def _is_text(f: Path) -> bool:
    """Cheap sniff: no NUL and valid UTF-8 in the first 8 KiB (a cut multi-byte character is allowed)."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # only the last, truncated character failed
    return True


def _human(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
