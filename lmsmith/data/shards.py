"""Token shards: writing them from sources (`prepare`) and reading them back (`TokenShards`).

Layout of a shard folder::

    manifest.json
    train-{source}-00000.bin        flat token ids, uint16 (vocab <= 65536) or uint32,
    train-{source}-00001.bin        little-endian, no header: np.memmap-able
    validation-{source}-00000.bin

For each source and split the shards, concatenated in order, are one token
stream: every kept document's `tokenizer.encode(text) + [eos_id]`. A document
may straddle two shards; readers treat the stream as one array.

The split is by document: a document goes to validation when a hash of its
content and the seed falls below `val_fraction`, so reruns agree and a document
keeps its split when other documents are added. Small sources get at least one
validation document when they have two or more (and always keep one for
training): the most borderline document is moved.

Empty sources (no document left after filtering): an error if every source is
empty; otherwise a warning, and the source is left out of the manifest (listed
under `excluded` with its counts).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..errors import LmsmithError
from ..tokenizer import PIECE_CHARS, text_pieces
from .clean import Deduper, content_hash, normalize, split_score, too_short
from .sources import Source, SourceStats, iter_documents, parse_source

SPLITS = ("train", "validation")
MANIFEST = "manifest.json"
FORMAT = "lmsmith-token-shards"
VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536, ids 0..65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends token arrays to `{split}-{source}-{i:05d}.bin`, starting a new file every `shard_tokens`."""

    def __init__(self, folder: Path, split: str, source: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.source = folder, split, source
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.shards: list[dict] = []  # [{"file", "tokens"}]
        self._f = None
        self._in_current = 0

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._f is None or self._in_current >= self.shard_tokens:
                self._open_next()
            take = min(tokens.size, self.shard_tokens - self._in_current)
            self._f.write(tokens[:take].astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
            self._in_current += take
            self.shards[-1]["tokens"] += take
            tokens = tokens[take:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{self.source}-{len(self.shards):05d}.bin"
        self._f = open(self.folder / name, "wb")  # noqa: SIM115 (stays open across write() calls)
        self.shards.append({"file": name, "tokens": 0})
        self._in_current = 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class _SplitRouter:
    """Sends each tokenized document to train or validation, with the small-source guarantees.

    While one split is still empty, the other holds back its most borderline document
    (train: lowest score, validation: highest) instead of writing it; at the end a held
    document moves to the empty split (train first: a source must keep training data).
    """

    def __init__(self, writers: dict[str, _ShardWriter], val_fraction: float):
        self.writers = writers
        self.val_fraction = val_fraction
        self.docs = {s: 0 for s in SPLITS}
        self.tokens = {s: 0 for s in SPLITS}
        self.held: dict[str, tuple[float, np.ndarray] | None] = {s: None for s in SPLITS}

    def _write(self, split: str, toks: np.ndarray) -> None:
        self.writers[split].write(toks)
        self.docs[split] += 1
        self.tokens[split] += int(toks.size)
        other = _other(split)
        if self.held[other] is not None:  # the other split no longer needs to lend a document
            _, held = self.held[other]
            self.held[other] = None
            self._write(other, held)

    def add(self, score: float, toks: np.ndarray) -> None:
        split = "validation" if score < self.val_fraction else "train"
        if self.val_fraction <= 0 or self.docs[_other(split)] > 0:
            self._write(split, toks)
            return
        held = self.held[split]
        # Borderline = closest to the val_fraction threshold: the one whose move is least arbitrary.
        closer = held is None or (score < held[0] if split == "train" else score > held[0])
        if held is None:
            self.held[split] = (score, toks)
        elif closer:
            self.held[split] = (score, toks)
            self._write(split, held[1])
        else:
            self._write(split, toks)

    def finish(self) -> None:
        for split in ("train", "validation"):  # train first: it must not end up empty
            other = _other(split)
            lend = self.held[other] is not None and (split == "train" or self.docs[other] > 0)
            if self.docs[split] == 0 and self.held[split] is None and lend:
                _, toks = self.held[other]
                self.held[other] = None
                self._write(split, toks)
        for split in SPLITS:
            if self.held[split] is not None:
                _, toks = self.held[split]
                self.held[split] = None
                self._write(split, toks)


def _other(split: str) -> str:
    return "validation" if split == "train" else "train"


def resolve_sources(sources: Sequence[Source | str] | None) -> list[Source]:
    """`Source`s (or NAME=PATH[:WEIGHT] strings; None = the built-in corpus) checked: every path exists,
    names are unique."""
    if sources is None or len(sources) == 0:
        from .corpus import default_corpus_sources

        sources = default_corpus_sources()
    out = [parse_source(s) if isinstance(s, str) else s for s in sources]
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LmsmithError(f"source names must be unique; repeated: {', '.join(dup)}")
    for s in out:
        s.check_exists()
    return out


def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise LmsmithError(
            f"output {out} exists and is not a token-shard folder; choose another --out or remove it"
        )


def prepare(
    sources: Sequence[Source | str] | None,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    text_field: str = "text",
    min_chars: int = 32,
    val_fraction: float = 0.02,
    skip_bad: bool = False,
    seed: int = 0,
    shard_tokens: int = 100_000_000,
    batch_docs: int = 256,
    progress: bool = True,
) -> dict:
    """Read, clean, de-duplicate and tokenize `sources` into token shards in `out_dir`.

    Args:
        sources: `Source` objects or `NAME=PATH[:WEIGHT]` strings; None or empty = the
            embedded default corpus (`default_corpus_sources()`).
        tokenizer: an `lmsmith.Tokenizer` (needs `encode_batch`, `eos_id`, `vocab_size`, `hash`).
        out_dir: the shard folder; replaced atomically (written to a temporary sibling,
            then renamed). An existing folder that is not a shard folder is an error.
        text_field: the JSONL field / Parquet column holding the text.
        min_chars: documents shorter than this (after strip) are dropped and counted.
        val_fraction: expected fraction of each source's documents in the validation split.
        skip_bad: skip and count malformed JSONL lines instead of raising.
        seed: changes which documents land in validation.
        shard_tokens: tokens per `.bin` file at most.
        batch_docs: documents per `encode_batch` call (the tokenizer parallelises inside one).
        progress: show a tqdm bar (documents, tokens).

    Returns:
        The manifest dict (also written to `out_dir/manifest.json`).
    """
    if not 0 <= val_fraction < 0.5:
        raise LmsmithError(f"val_fraction {val_fraction} must be in [0, 0.5)")
    if min_chars < 0:
        raise LmsmithError(f"min_chars {min_chars} must be >= 0")
    if shard_tokens < 1:
        raise LmsmithError(f"shard_tokens {shard_tokens} must be >= 1")
    srcs = resolve_sources(sources)
    out = Path(out_dir)
    _check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..fileio import atomic_dir

    # Written under a temporary sibling name and renamed into place: a crash never leaves half a folder.
    with atomic_dir(out) as tmp:
        manifest = _prepare_into(
            srcs, tokenizer, tmp, skip_dirs=(str(out), str(tmp)), text_field=text_field,
            min_chars=min_chars, val_fraction=val_fraction, skip_bad=skip_bad, seed=seed,
            shard_tokens=shard_tokens, batch_docs=batch_docs, progress=progress,
        )
    return manifest


def _prepare_into(
    srcs: list[Source], tok, folder: Path, *, skip_dirs: Iterable[str], text_field: str, min_chars: int,
    val_fraction: float, skip_bad: bool, seed: int, shard_tokens: int, batch_docs: int, progress: bool,
) -> dict:
    from tqdm.auto import tqdm

    vocab_size = int(tok.vocab_size)
    eos = tok.eos_id
    if eos is None:
        raise LmsmithError("the tokenizer has no EOS token; documents must end with one (use one with eos)")
    dtype = token_dtype(vocab_size)
    limit = np.iinfo(dtype).max
    dedup = Deduper()
    entries, excluded = [], []
    # Raw text that spells a special token ("<|endoftext|>" in a document about tokenizers) must be
    # encoded as plain text: otherwise it becomes a real EOS inside a document. HF `tokenizers` has a
    # switch for that on the backend; it is set only while we encode and restored afterwards.
    backend = getattr(tok, "backend", None)
    literal_specials = backend is not None and hasattr(backend, "encode_special_tokens")
    if literal_specials:
        saved_flag = backend.encode_special_tokens
        backend.encode_special_tokens = True
    bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    total_tokens = 0
    try:
        for src in srcs:
            src.stats = SourceStats()
            st = src.stats
            writers = {s: _ShardWriter(folder, s, src.name, dtype, shard_tokens) for s in SPLITS}
            router = _SplitRouter(writers, val_fraction)
            batch: list[tuple[float, str]] = []

            def flush(batch=batch, router=router, st=st, name=src.name) -> None:
                nonlocal total_tokens
                if not batch:
                    return
                short = [t for _, t in batch if len(t) <= PIECE_CHARS]
                ids = iter(tok.encode_batch(short) if short else [])
                for score, text in batch:
                    # A long document is encoded piece by piece straight into an array: memory a few bytes
                    # per token, not the encoder's ~160 per character (see tokenizer.text_pieces).
                    if len(text) <= PIECE_CHARS:
                        parts = [np.asarray(next(ids), dtype=np.int64)]
                    else:
                        parts = [np.asarray(tok.encode(p), dtype=np.int64) for p in text_pieces(text)]
                    arr = np.concatenate([*parts, np.array([eos], dtype=np.int64)])
                    doc = arr[:-1]
                    if len(doc) and (arr.max() > limit or arr.min() < 0):
                        raise LmsmithError(
                            f"token id {int(arr.max())} does not fit {dtype.name} for a tokenizer reporting "
                            f"vocab_size {vocab_size}; the tokenizer's vocab_size is wrong"
                        )
                    router.add(score, arr)
                    st.tokens += arr.size
                    total_tokens += arr.size
                bar.update(len(batch))
                bar.set_postfix_str(f"{name}, {total_tokens:,} tokens", refresh=False)
                batch.clear()

            docs = iter_documents(src, text_field=text_field, skip_bad=skip_bad, skip_dirs=skip_dirs)
            for _doc_id, raw in docs:
                text = normalize(raw)
                if too_short(text, min_chars):
                    st.too_short += 1
                    continue
                digest = content_hash(text)
                if dedup.seen(digest):
                    st.duplicates += 1
                    continue
                st.documents += 1
                batch.append((split_score(digest, seed), text))
                if len(batch) >= batch_docs:
                    flush()
            flush()
            router.finish()
            for w in writers.values():
                w.close()
            entry = {
                "name": src.name,
                # absolute, so a run resumed from another directory can tell whether these are its sources
                "path": os.path.abspath(src.path) if src.path is not None else f"<in-memory:{src.name}>",
                "weight": float(src.weight),
                **st.as_dict(),
                "splits": {
                    s: {"documents": router.docs[s], "tokens": router.tokens[s], "shards": writers[s].shards}
                    for s in SPLITS
                },
            }
            if st.documents == 0:
                excluded.append(entry)
            else:
                entries.append(entry)
    finally:
        bar.close()
        if literal_specials:
            backend.encode_special_tokens = saved_flag
    if not entries:
        why = "; ".join(f"{e['name']} ({_why_empty(e)})" for e in excluded)
        raise LmsmithError(f"no documents left in any source: {why}")
    for e in excluded:
        warnings.warn(f"source {e['name']!r} has no documents ({_why_empty(e)}); it is left out",
                      stacklevel=3)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "tokenizer": {"hash": tok.hash, "vocab_size": vocab_size, "eos_id": int(eos)},
        "eos_id": int(eos),
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "min_chars": int(min_chars),
        "text_field": text_field,
        "sources": entries,
        "excluded": excluded,
        "total_tokens": int(sum(e["tokens"] for e in entries)),
        "total_documents": int(sum(e["documents"] for e in entries)),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _why_empty(e: dict) -> str:
    parts = [f"{e['files']} files read"]
    for key, label in (("too_short", "too short"), ("duplicates", "duplicates"),
                       ("skipped_binary", "binary skipped"), ("bad_lines", "bad lines")):
        if e[key]:
            parts.append(f"{e[key]} {label}")
    return ", ".join(parts) + f"; path {e['path']}"


# ---------------------------------------------------------------------------------------------- reading


def load_manifest(path: str | os.PathLike) -> dict:
    """Read `manifest.json` of a shard folder (or the file itself)."""
    p = Path(path)
    mf = p / MANIFEST if p.is_dir() else p
    if not mf.exists():
        raise LmsmithError(
            f"{p} is not a token-shard folder (no {MANIFEST}); create one with `lmsmith data prepare`"
        )
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise LmsmithError(f"{mf}: not valid JSON ({e}); re-run `lmsmith data prepare`") from None
    if manifest.get("format") != FORMAT:
        raise LmsmithError(f"{mf}: not an lmsmith token-shard manifest")
    return manifest


class TokenStream:
    """One source's split as a single read-only token array over its memory-mapped shards.

    `len(stream)` tokens; `stream.read(start, n) -> np.ndarray (n,)` may cross shard boundaries.
    """

    def __init__(self, memmaps: list[np.ndarray]):
        self.memmaps = memmaps
        self.offsets = np.cumsum([0] + [m.size for m in memmaps])  # (n_shards + 1,)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as a new array of the shard dtype, shape (n,)."""
        if start < 0 or start + n > len(self):
            raise IndexError(f"window [{start}, {start + n}) outside a stream of {len(self)} tokens")
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        local = start - int(self.offsets[i])
        m = self.memmaps[i]
        if local + n <= m.size:  # the common case: inside one shard
            return np.array(m[local:local + n])
        parts, need = [], n
        while need:
            m = self.memmaps[i]
            take = min(need, m.size - local)
            parts.append(np.asarray(m[local:local + take]))
            need -= take
            i, local = i + 1, 0
        return np.concatenate(parts)


class TokenShards:
    """A prepared shard folder: manifest plus memory-mapped token streams per source and split."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.eos_id: int = int(self.manifest["eos_id"])
        self.vocab_size: int = int(self.manifest["tokenizer"]["vocab_size"])
        self.tokenizer_hash: str = self.manifest["tokenizer"]["hash"]
        self._entries = {e["name"]: e for e in self.manifest["sources"]}
        self._streams: dict[tuple[str, str], TokenStream] = {}

    @property
    def sources(self) -> list[str]:
        """Source names in manifest order."""
        return list(self._entries)

    @property
    def weights(self) -> dict[str, float]:
        """The manifest's mixture weights, name -> weight."""
        return {n: float(e["weight"]) for n, e in self._entries.items()}

    def tokens(self, source: str, split: str = "train") -> int:
        """Number of tokens of `source` in `split`."""
        return int(self._entry(source)["splits"][split]["tokens"])

    def memmaps(self, source: str, split: str = "train") -> list[np.ndarray]:
        """The read-only np.memmap of each shard of `source`/`split`, in stream order."""
        return self.stream(source, split).memmaps

    def stream(self, source: str, split: str = "train") -> TokenStream:
        """`source`'s `split` as one `TokenStream` (opened once, then cached)."""
        if split not in SPLITS:
            raise LmsmithError(f"split {split!r} must be one of {', '.join(SPLITS)}")
        key = (source, split)
        if key not in self._streams:
            maps = []
            for sh in self._entry(source)["splits"][split]["shards"]:
                fp = self.path / sh["file"]
                if not fp.exists():
                    raise LmsmithError(f"shard {fp} is missing; re-run `lmsmith data prepare`")
                size = fp.stat().st_size
                if size != sh["tokens"] * self.dtype.itemsize:
                    raise LmsmithError(
                        f"shard {fp} has {size} bytes, the manifest says {sh['tokens']} tokens of "
                        f"{self.dtype.name}; it is truncated or stale, re-run `lmsmith data prepare`"
                    )
                if sh["tokens"]:
                    maps.append(np.memmap(fp, dtype=self.dtype.newbyteorder("<"), mode="r"))
            self._streams[key] = TokenStream(maps)
        return self._streams[key]

    def check_tokenizer(self, tokenizer) -> None:
        """Raise `LmsmithError` unless `tokenizer` is the one the shards were made with (by hash)."""
        if tokenizer.hash != self.tokenizer_hash:
            raise LmsmithError(
                f"the shards in {self.path} were tokenized with tokenizer {self.tokenizer_hash}, "
                f"but this tokenizer is {tokenizer.hash}; re-run `lmsmith data prepare` with it"
            )

    def _entry(self, source: str) -> dict:
        if source not in self._entries:
            raise LmsmithError(f"no source {source!r} in {self.path}; sources: {', '.join(self._entries)}")
        return self._entries[source]

    def __repr__(self) -> str:
        total = self.manifest["total_tokens"]
        return f"TokenShards({str(self.path)!r}, sources={self.sources}, tokens={total:,})"
