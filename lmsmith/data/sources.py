"""Reading corpora into documents.

A *source* is a named, weighted collection of documents: a text file, a folder
(walked recursively), a `.jsonl` / `.jsonl.gz` file (one document per line, the
text in a field), a `.parquet` file (one document per row; needs pyarrow), or
an in-memory iterable of `(doc_id, text)` pairs (the default corpus's docs).

Reading never crashes on bad bytes: undecodable bytes become U+FFFD and are
counted; binary files inside folders (known binary extension or a NUL byte in
the first 8 KiB) are skipped and counted. Malformed JSONL lines raise an
`LmsmithError` naming file and line, or are skipped and counted with
`skip_bad=True`.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

from ..errors import LmsmithError

# Extensions that are never text. Anything else is read as text unless it holds a NUL byte.
BINARY_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".ico", ".icns", ".tif", ".tiff", ".webp", ".pdf", ".ps",
    ".eps", ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".tar", ".rar", ".whl", ".egg",
    ".jar", ".class", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll", ".exe", ".o", ".a", ".lib",
    ".bin", ".dat", ".db", ".sqlite", ".npy", ".npz", ".pt", ".pth", ".safetensors", ".gguf", ".onnx",
    ".pkl", ".pickle", ".wav", ".mp3", ".ogg", ".flac", ".mp4", ".mov", ".avi", ".mkv", ".ttf", ".otf",
    ".woff", ".woff2", ".eot", ".icc", ".xlsx", ".docx", ".pptx", ".odt", ".msi", ".deb", ".rpm",
    ".dmg", ".iso",
})
_SNIFF_BYTES = 8192
# surrogateescape turns each undecodable byte into one lone surrogate U+DC80..U+DCFF; a run of them
# becomes one U+FFFD (what errors="replace" does for a bad sequence) and the bytes are counted.
_ESCAPED = re.compile("[\udc80-\udcff]+")
# Lone surrogates can also arrive through JSON escapes ("\ud800"); they cannot be encoded as UTF-8.
_SURROGATES = re.compile("[\ud800-\udfff]+")


@dataclass
class SourceStats:
    """What reading and cleaning one source found. Counts are documents unless named otherwise."""

    documents: int = 0  # kept: decoded, long enough, not a duplicate
    tokens: int = 0  # including one EOS per document
    files: int = 0  # files opened (text, jsonl, parquet)
    skipped_binary: int = 0  # binary files skipped
    replaced_bytes: int = 0  # undecodable bytes replaced by U+FFFD
    duplicates: int = 0  # exact duplicates of an earlier document (any source)
    too_short: int = 0  # shorter than min_chars after normalisation
    bad_lines: int = 0  # malformed JSONL lines / null parquet rows skipped (skip_bad)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Source:
    """A named, weighted document collection.

    Exactly one of `path` (file or folder) or `documents` (in-memory `(doc_id, text)`
    pairs, or a zero-argument callable returning them, so the source can be read again)
    is given. `include` / `exclude` are glob patterns for folder walks: a file is read if
    its name matches one of `include` (all files when None); a file or folder is skipped
    if its name or its path relative to `path` matches one of `exclude`.
    `max_file_bytes` skips (and counts as binary) files larger than this.
    """

    name: str
    path: str | None = None
    weight: float = 1.0
    documents: Callable[[], Iterable[tuple[str, str]]] | Iterable[tuple[str, str]] | None = None
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    max_file_bytes: int | None = None
    stats: SourceStats = field(default_factory=SourceStats, repr=False)

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", self.name):
            raise LmsmithError(
                f"source name {self.name!r} must be non-empty letters, digits, '_', '-' or '.' "
                "(it names the shard files)"
            )
        if not (isinstance(self.weight, (int, float)) and self.weight > 0 and self.weight < float("inf")):
            raise LmsmithError(f"source {self.name!r}: weight {self.weight!r} must be a positive number")
        if (self.path is None) == (self.documents is None):
            raise LmsmithError(f"source {self.name!r}: give exactly one of a path or in-memory documents")
        if self.documents is not None and not callable(self.documents):
            # Materialise a one-shot iterable so the source can be read more than once.
            self.documents = tuple(self.documents)
        if self.path is not None:
            self.path = str(self.path)

    def check_exists(self) -> None:
        """Raise `LmsmithError` if the source's path does not exist."""
        if self.path is not None and not os.path.exists(self.path):
            raise LmsmithError(
                f"source {self.name!r}: path {self.path} does not exist; check the --source value"
            )


def parse_source(spec: str) -> Source:
    """Parse `NAME=PATH[:WEIGHT]` (the `--source` flag) into a `Source`.

    The weight is taken from the last `:` only if what follows is a number, so paths that
    contain colons still work (`a=C:/data` or `a=/x:y/z`).
    """
    name, eq, rest = spec.partition("=")
    if not eq or not name or not rest:
        raise LmsmithError(
            f"--source {spec!r}: expected NAME=PATH[:WEIGHT], e.g. --source web=data/web.jsonl:2"
        )
    path, weight = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass  # the colon belongs to the path
    return Source(name=name.strip(), path=path, weight=weight)


def decode_bytes(data: bytes) -> tuple[str, int]:
    """Decode UTF-8 (a BOM is dropped) replacing undecodable bytes by U+FFFD.

    Returns (text, number of bytes replaced).
    """
    return _replace_counting(_ESCAPED, data.decode("utf-8-sig", errors="surrogateescape"))


def fix_surrogates(text: str) -> tuple[str, int]:
    """Replace lone surrogates (unencodable in UTF-8) by U+FFFD; returns (text, code points replaced)."""
    return _replace_counting(_SURROGATES, text)


def _replace_counting(pattern: re.Pattern, text: str) -> tuple[str, int]:
    """Replace each run matching `pattern` by one U+FFFD; return (text, code points replaced)."""
    if not pattern.search(text):
        return text, 0
    n = 0

    def _sub(m: re.Match) -> str:
        nonlocal n
        n += len(m.group(0))
        return "\ufffd"

    return pattern.sub(_sub, text), n


def is_binary(path: str | os.PathLike, head: bytes | None = None) -> bool:
    """A file is binary if its extension says so (except `.jsonl.gz`) or its first 8 KiB hold a NUL byte."""
    p = str(path).lower()
    if p.endswith(".jsonl.gz"):
        return False
    if os.path.splitext(p)[1] in BINARY_EXTENSIONS:
        return True
    if head is None:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    return b"\x00" in head[:_SNIFF_BYTES]


def _kind(path: str) -> str:
    p = path.lower()
    if p.endswith(".jsonl.gz") or p.endswith(".ndjson.gz"):
        return "jsonl.gz"
    if p.endswith(".jsonl") or p.endswith(".ndjson"):
        return "jsonl"
    if p.endswith(".parquet"):
        return "parquet"
    return "text"


def _excluded(rel: str, name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(rel, pat) for pat in patterns)


def walk_files(source: Source, skip_dirs: Iterable[str] = ()) -> Iterator[str]:
    """The files of a folder source in sorted (reproducible) order.

    Hidden files and folders (name starts with '.') and `__pycache__` are skipped, as are
    folders in `skip_dirs` (e.g. the output folder when it lies inside the source).
    """
    root = source.path
    assert root is not None
    skip = {os.path.realpath(d) for d in skip_dirs}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        keep = []
        for d in sorted(dirnames):
            rel = f"{rel_dir}/{d}" if rel_dir else d
            if d.startswith(".") or d in ("__pycache__", "node_modules") or _excluded(rel, d, source.exclude):
                continue
            if os.path.realpath(os.path.join(dirpath, d)) in skip:
                continue
            keep.append(d)
        dirnames[:] = keep  # os.walk descends only into these, in this order
        for fn in sorted(filenames):
            rel = f"{rel_dir}/{fn}" if rel_dir else fn
            if fn.startswith(".") or _excluded(rel, fn, source.exclude):
                continue
            if source.include is not None and not any(fnmatch.fnmatchcase(fn, p) for p in source.include):
                continue
            yield os.path.join(dirpath, fn)


def iter_documents(
    source: Source, *, text_field: str = "text", skip_bad: bool = False, skip_dirs: Iterable[str] = ()
) -> Iterator[tuple[str, str]]:
    """Yield `(doc_id, raw_text)` for every document of `source`, updating `source.stats`.

    Text is decoded (bad bytes replaced and counted in `stats.replaced_bytes`) but not yet
    normalised or filtered; see `clean.py`.
    """
    st = source.stats
    if source.documents is not None:
        docs = source.documents() if callable(source.documents) else source.documents
        for doc_id, text in docs:
            text, n = fix_surrogates(text)
            st.replaced_bytes += n
            yield str(doc_id), text
        return
    source.check_exists()
    path = source.path
    assert path is not None
    files = walk_files(source, skip_dirs) if os.path.isdir(path) else iter([path])
    for fp in files:
        yield from _read_file(source, fp, text_field=text_field, skip_bad=skip_bad)


def _read_file(source: Source, fp: str, *, text_field: str, skip_bad: bool) -> Iterator[tuple[str, str]]:
    st = source.stats
    kind = _kind(fp)
    if kind == "jsonl":
        st.files += 1
        with open(fp, "rb") as f:
            yield from _read_jsonl(source, fp, f, text_field=text_field, skip_bad=skip_bad)
        return
    if kind == "jsonl.gz":
        st.files += 1
        try:
            with gzip.open(fp, "rb") as f:
                yield from _read_jsonl(source, fp, f, text_field=text_field, skip_bad=skip_bad)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise LmsmithError(
                f"{fp}: not a readable gzip file ({e}); re-compress it or pass it uncompressed"
            ) from None
        return
    if kind == "parquet":
        st.files += 1
        yield from _read_parquet(source, fp, text_field=text_field, skip_bad=skip_bad)
        return
    if source.max_file_bytes is not None and os.path.getsize(fp) > source.max_file_bytes:
        st.skipped_binary += 1  # too big to be a useful single document
        return
    with open(fp, "rb") as f:
        data = f.read()
    if is_binary(fp, data[:_SNIFF_BYTES]):
        st.skipped_binary += 1
        return
    st.files += 1
    text, n = decode_bytes(data)
    st.replaced_bytes += n
    rel = os.path.relpath(fp, source.path) if source.path and os.path.isdir(source.path) else fp
    yield rel.replace(os.sep, "/"), text


def _bad(source: Source, where: str, reason: str, text_field: str, skip_bad: bool) -> None:
    if not skip_bad:
        hint = " (set the field with --text-field)" if "field" in reason else ""
        raise LmsmithError(
            f"{where}: malformed JSONL line: {reason}{hint}; "
            "fix it, or pass --skip-bad to skip and count such lines"
        )
    source.stats.bad_lines += 1


def _read_jsonl(source: Source, fp: str, f, *, text_field: str, skip_bad: bool) -> Iterator[tuple[str, str]]:
    st = source.stats
    for lineno, raw in enumerate(f, start=1):
        if not raw.strip():
            continue  # blank lines (often a trailing newline) are not documents
        where = f"{fp}:{lineno}"
        line, n = decode_bytes(raw)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            _bad(source, where, f"invalid JSON ({e.msg} at column {e.colno})", text_field, skip_bad)
            continue
        if not isinstance(obj, dict):
            _bad(source, where, f"expected a JSON object, got {type(obj).__name__}", text_field, skip_bad)
            continue
        if text_field not in obj:
            keys = ", ".join(list(obj)[:8])
            _bad(source, where, f"no field {text_field!r} (fields: {keys})", text_field, skip_bad)
            continue
        text = obj[text_field]
        if not isinstance(text, str):
            _bad(source, where, f"field {text_field!r} is {type(text).__name__}, not a string",
                 text_field, skip_bad)
            continue
        text, m = fix_surrogates(text)
        st.replaced_bytes += n + m
        yield where, text


def _read_parquet(source: Source, fp: str, *, text_field: str, skip_bad: bool) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmsmithError(
            f"{fp}: reading Parquet needs pyarrow; install it with: pip install 'lmsmith[parquet]'"
        ) from None
    try:
        pf = pq.ParquetFile(fp)
    except Exception as e:  # pyarrow raises ArrowInvalid & co. for a file that is not Parquet
        raise LmsmithError(f"{fp}: not a readable Parquet file ({e})") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise LmsmithError(
            f"{fp}: no column {text_field!r} (columns: {', '.join(columns[:12])}); "
            "choose one with --text-field"
        )
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                where = f"{fp}: row {row}"
                if not skip_bad:
                    raise LmsmithError(
                        f"{where}: column {text_field!r} is {type(text).__name__}, not a string; "
                        "pass --skip-bad to skip and count such rows"
                    )
                source.stats.bad_lines += 1
                continue
            text, n = fix_surrogates(text)
            source.stats.replaced_bytes += n
            yield f"{fp}:{row}", text
