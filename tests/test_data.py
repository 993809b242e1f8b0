"""Tests of lmsmith.data: sources, cleaning, token shards, the mixture sampler, the default corpus, the CLI."""

from __future__ import annotations

import gzip
import json
import os
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lmsmith.cli import main
from lmsmith.data import (
    IGNORE_INDEX,
    MixtureBatches,
    Source,
    TokenShards,
    default_corpus_sources,
    iter_documents,
    load_manifest,
    parse_source,
    prepare,
    sequential_batches,
    token_dtype,
)
from lmsmith.data.clean import normalize
from lmsmith.data.sources import walk_files
from lmsmith.errors import LmsmithError
from lmsmith.tokenizer import Tokenizer


class ByteTok:
    """A stand-in tokenizer whose ids we control: id = byte + offset, eos = `eos`.

    Used where a test needs ids it can read directly (which source a row came from, ids above
    65535); the real `Tokenizer` is used for the round-trip and CLI tests.
    """

    def __init__(self, offset: int = 0, eos: int = 256, vocab_size: int = 257, name: str = "bytes"):
        self.offset, self.eos_id, self.vocab_size = offset, eos, vocab_size
        self.hash = f"{name}-{offset}-{eos}-{vocab_size}"

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) - self.offset for i in ids if int(i) != self.eos_id).decode("utf-8")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)[:40]]
    t = Tokenizer.train(texts, 400, show_progress=False)
    d = tmp_path_factory.mktemp("tok")
    t.save(d)
    return Tokenizer.load(d)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tokdir")
    tok.save(d)
    return str(d)


def _doc(i: int, word: str = "document") -> str:
    return f"This is {word} number {i:04d}. " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(20 + i % 13))


def _write_docs(folder: Path, docs: list[str], ext: str = ".txt") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"d{i:04d}{ext}").write_text(d, encoding="utf-8")


def _segments(arr: np.ndarray, eos: int) -> list[list[int]]:
    """Split a token stream after each EOS; every document must end with one."""
    ends = np.flatnonzero(arr == eos)
    assert len(arr) == 0 or ends[-1] == len(arr) - 1, "stream must end with eos"
    out, start = [], 0
    for e in ends:
        out.append(arr[start:e].tolist())
        start = e + 1
    return out


def _stream(sh: TokenShards, name: str, split: str) -> np.ndarray:
    s = sh.stream(name, split)
    return s.read(0, len(s)) if len(s) else np.zeros(0, dtype=sh.dtype)


# ----------------------------------------------------------------------------- prepare: content


def test_shards_hold_exactly_tokenizer_doc_plus_eos(tok, tmp_path):
    docs = [_doc(i) for i in range(30)]
    docs[3] = "Cafe\u0301 ole\u0301 -- a decomposed e-acute that NFC must compose, long enough."
    docs[4] = "Windows line ends\r\nshould become unix ones\r\nafter normalisation.\r\n"
    _write_docs(tmp_path / "src", docs)
    m = prepare([Source("a", str(tmp_path / "src"))], tok, tmp_path / "out", val_fraction=0.3, progress=False)
    sh = TokenShards(tmp_path / "out")
    expected = {normalize(d) for d in docs}
    assert "Caf\u00e9 ol\u00e9" in normalize(docs[3]) and "\r" not in normalize(docs[4])
    seen = {}
    for split in ("train", "validation"):
        for seg in _segments(_stream(sh, "a", split), tok.eos_id):
            text = tok.decode(seg)
            assert seg == tok.encode(text), "segment must be exactly the tokenizer's encoding of the doc"
            assert text not in seen, "a document must appear once, in one split"
            seen[text] = split
    assert set(seen) == expected
    assert set(seen.values()) == {"train", "validation"}
    e = m["sources"][0]
    assert e["documents"] == 30
    assert e["tokens"] == sum(len(tok.encode(t)) + 1 for t in expected)
    assert e["splits"]["validation"]["documents"] == sum(v == "validation" for v in seen.values())
    assert m["total_tokens"] == e["tokens"] and m["eos_id"] == tok.eos_id
    assert m["tokenizer"] == {"hash": tok.hash, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}


def test_special_token_text_in_a_document_is_not_an_eos(tok, tmp_path):
    docs = [f"Documents end with <|endoftext|> and chats use <|im_start|>; number {i}." for i in range(4)]
    _write_docs(tmp_path / "src", docs)
    prepare([f"a={tmp_path / 'src'}"], tok, tmp_path / "out", val_fraction=0, progress=False)
    arr = _stream(TokenShards(tmp_path / "out"), "a", "train")
    segs = _segments(arr, tok.eos_id)
    assert len(segs) == 4, "exactly one EOS per document"
    assert sorted(tok.decode(s) for s in segs) == sorted(docs)
    assert tok.encode("<|endoftext|>") == [tok.eos_id], "the tokenizer's own flag is restored"


def test_dtype_uint16_vs_uint32(tmp_path):
    assert token_dtype(400) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    docs = [_doc(i) for i in range(5)]
    _write_docs(tmp_path / "src", docs)
    small, big = ByteTok(), ByteTok(offset=65600, eos=65599, vocab_size=65900)
    for t, dtype, name in ((small, "uint16", "o16"), (big, "uint32", "o32")):
        m = prepare([f"a={tmp_path / 'src'}"], t, tmp_path / name, val_fraction=0, progress=False)
        assert m["dtype"] == dtype
        sh = TokenShards(tmp_path / name)
        arr = _stream(sh, "a", "train")
        assert arr.dtype == np.dtype(dtype)
        files = list((tmp_path / name).glob("train-a-*.bin"))
        assert sum(f.stat().st_size for f in files) == len(arr) * np.dtype(dtype).itemsize
        # ids above 65535 survive (they would wrap if written as uint16)
        assert sorted(t.decode(s) for s in _segments(arr, t.eos_id)) == sorted(docs)


def test_shard_size_limit_splits_stream(tmp_path):
    docs = [_doc(i) for i in range(10)]
    _write_docs(tmp_path / "src", docs)
    t = ByteTok()
    prepare([f"a={tmp_path / 'src'}"], t, tmp_path / "one", val_fraction=0, progress=False)
    prepare([f"a={tmp_path / 'src'}"], t, tmp_path / "many", val_fraction=0, shard_tokens=100, progress=False)
    many = TokenShards(tmp_path / "many")
    assert len(many.memmaps("a")) > 3 and all(m.size <= 100 for m in many.memmaps("a"))
    ref = _stream(TokenShards(tmp_path / "one"), "a", "train")
    assert np.array_equal(_stream(many, "a", "train"), ref)
    s = many.stream("a")
    assert np.array_equal(s.read(95, 30), ref[95:125])  # a window across a shard boundary


# ----------------------------------------------------------------------------- prepare: the split


def _split_sets(out: Path, t: ByteTok, name: str = "a") -> dict[str, set[str]]:
    sh = TokenShards(out)
    return {s: {t.decode(x) for x in _segments(_stream(sh, name, s), t.eos_id)} for s in ("train", "validation")}


def test_val_split_by_document_and_deterministic(tmp_path):
    t = ByteTok()
    docs = [_doc(i) for i in range(60)]
    _write_docs(tmp_path / "s1", docs[:40])
    _write_docs(tmp_path / "s2", docs)
    prepare([f"a={tmp_path / 's1'}"], t, tmp_path / "o1", val_fraction=0.3, seed=5, progress=False)
    prepare([f"a={tmp_path / 's1'}"], t, tmp_path / "o1b", val_fraction=0.3, seed=5, progress=False)
    prepare([f"a={tmp_path / 's2'}"], t, tmp_path / "o2", val_fraction=0.3, seed=5, progress=False)
    prepare([f"a={tmp_path / 's1'}"], t, tmp_path / "o3", val_fraction=0.3, seed=6, progress=False)
    for f in sorted(os.listdir(tmp_path / "o1")):  # a rerun writes identical bytes
        assert (tmp_path / "o1" / f).read_bytes() == (tmp_path / "o1b" / f).read_bytes(), f
    s1, s2, s3 = _split_sets(tmp_path / "o1", t), _split_sets(tmp_path / "o2", t), _split_sets(tmp_path / "o3", t)
    assert s1["train"] | s1["validation"] == set(docs[:40]) and not s1["train"] & s1["validation"]
    assert 3 <= len(s1["validation"]) <= 25
    # a document's split depends on its content, not on the other documents
    assert s1["validation"] <= s2["validation"] and s1["train"] <= s2["train"]
    assert s3["validation"] != s1["validation"]  # the seed changes the split


def test_small_sources_get_one_validation_doc_and_keep_training(tmp_path):
    t = ByteTok()
    _write_docs(tmp_path / "two", [_doc(1), _doc(2)])
    _write_docs(tmp_path / "one", [_doc(3)])
    for seed in range(12):  # different seeds put the two documents in every split combination
        out = tmp_path / f"o{seed}"
        prepare([f"two={tmp_path / 'two'}", f"one={tmp_path / 'one'}"], t, out, val_fraction=0.3,
                seed=seed, progress=False)
        two, one = _split_sets(out, t, "two"), _split_sets(out, t, "one")
        assert len(two["train"]) == 1 and len(two["validation"]) == 1
        assert two["train"] | two["validation"] == {_doc(1), _doc(2)}
        assert one == {"train": {_doc(3)}, "validation": set()}
    m = prepare([f"two={tmp_path / 'two'}"], t, tmp_path / "noval", val_fraction=0, progress=False)
    assert m["sources"][0]["splits"]["validation"]["documents"] == 0


# ----------------------------------------------------------------------------- prepare: dirty input


def test_binary_files_in_folder_are_skipped_and_counted(tmp_path):
    src = tmp_path / "src"
    _write_docs(src, [_doc(1)])
    (src / "sub").mkdir()
    (src / "sub" / "notes.md").write_text(_doc(2, "markdown"))
    (src / "logo.png").write_text(_doc(3, "png-named text"))  # binary by extension
    (src / "blob.dat2").write_bytes(b"header\x00\x01\x02" + b"x" * 100)  # binary by NUL byte
    (src / ".hidden.txt").write_text(_doc(4, "hidden"))  # hidden files are not read
    m = prepare([f"a={src}"], ByteTok(), tmp_path / "out", val_fraction=0, progress=False)
    e = m["sources"][0]
    assert e["skipped_binary"] == 2 and e["documents"] == 2 and e["files"] == 2
    assert _split_sets(tmp_path / "out", ByteTok())["train"] == {_doc(1), _doc(2, "markdown")}


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.txt").write_bytes(b"caf\xe9 and \xff\xfe twice, then enough text to pass the filter")
    (src / "ok.jsonl").write_bytes(b'{"text": "json line with a bad byte \xff in it and more text"}\n')
    m = prepare([f"a={src}"], ByteTok(), tmp_path / "out", val_fraction=0, progress=False)
    assert m["sources"][0]["replaced_bytes"] == 4  # \xe9, \xff\xfe, \xff
    texts = _split_sets(tmp_path / "out", ByteTok())["train"]
    assert "caf\ufffd and \ufffd twice, then enough text to pass the filter" in texts  # one U+FFFD per run
    assert "json line with a bad byte \ufffd in it and more text" in texts


def test_duplicates_are_counted_and_kept_once(tmp_path):
    src = tmp_path / "src"
    base = "Caf\u00e9 table of contents\nline two of a duplicated document"
    variants = [base, base.replace("\n", "\r\n"), unicodedata.normalize("NFD", base), _doc(1)]
    _write_docs(src, variants)
    other = tmp_path / "other.txt"
    other.write_text(_doc(1))  # duplicate across sources
    (src / "short.txt").write_text("tiny")
    with pytest.warns(UserWarning, match="'b' has no documents"):
        m = prepare([f"a={src}", f"b={tmp_path / 'src'}/../other.txt"], ByteTok(), tmp_path / "out",
                    val_fraction=0, progress=False, min_chars=10)
    a = m["sources"][0]
    assert (a["documents"], a["duplicates"], a["too_short"]) == (2, 2, 1)
    assert [e["name"] for e in m["excluded"]] == ["b"] and m["excluded"][0]["duplicates"] == 1
    assert _split_sets(tmp_path / "out", ByteTok())["train"] == {base, _doc(1)}


def test_malformed_jsonl_error_names_file_and_line_or_skips(tmp_path):
    f = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": _doc(1)}),
        "",
        '{"text": "unterminated',
        json.dumps([1, 2]),
        json.dumps({"body": _doc(2)}),
        json.dumps({"text": 5}),
        json.dumps({"text": _doc(3)}),
    ]
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(LmsmithError) as ei:
        prepare([f"j={f}"], ByteTok(), tmp_path / "out", progress=False)
    assert f"{f}:3" in str(ei.value) and "--skip-bad" in str(ei.value)
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")], "temp folder must be removed"
    m = prepare([f"j={f}"], ByteTok(), tmp_path / "out", skip_bad=True, val_fraction=0, progress=False)
    e = m["sources"][0]
    assert (e["bad_lines"], e["documents"]) == (4, 2)
    assert _split_sets(tmp_path / "out", ByteTok(), "j")["train"] == {_doc(1), _doc(3)}
    with pytest.raises(LmsmithError, match=r"data.jsonl:1: .*no field 'body'.*--text-field"):
        prepare([f"j={f}"], ByteTok(), tmp_path / "out2", text_field="body", progress=False)


def test_jsonl_gz_with_text_field(tmp_path):
    f = tmp_path / "data.jsonl.gz"
    docs = [_doc(i) for i in range(6)]
    with gzip.open(f, "wt", encoding="utf-8") as g:
        for d in docs:
            g.write(json.dumps({"content": d, "id": 1}) + "\n")
    m = prepare([f"g={f}:2.5"], ByteTok(), tmp_path / "out", text_field="content", val_fraction=0,
                progress=False)
    assert m["sources"][0]["documents"] == 6 and m["sources"][0]["weight"] == 2.5
    assert _split_sets(tmp_path / "out", ByteTok(), "g")["train"] == set(docs)
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(LmsmithError, match="gzip"):
        prepare([f"g={tmp_path / 'broken.jsonl.gz'}"], ByteTok(), tmp_path / "o2", progress=False)


def test_parquet_source_and_missing_extra(tmp_path, monkeypatch):
    import pyarrow as pa  # a dev dependency: the Parquet path is tested for real
    import pyarrow.parquet as pq

    f = tmp_path / "data.parquet"
    docs = [_doc(i) for i in range(5)]
    pq.write_table(pa.table({"text": docs + [None], "n": list(range(6))}), f)
    with pytest.raises(LmsmithError, match="row 6"):
        prepare([f"p={f}"], ByteTok(), tmp_path / "out", progress=False)
    m = prepare([f"p={f}"], ByteTok(), tmp_path / "out", skip_bad=True, val_fraction=0, progress=False)
    assert m["sources"][0]["documents"] == 5 and m["sources"][0]["bad_lines"] == 1
    assert _split_sets(tmp_path / "out", ByteTok(), "p")["train"] == set(docs)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(LmsmithError, match=r"pip install 'lmsmith\[parquet\]'"):
        prepare([f"p={f}"], ByteTok(), tmp_path / "o2", progress=False)


def test_missing_path_and_empty_sources(tmp_path):
    with pytest.raises(LmsmithError, match="does not exist"):
        prepare([f"a={tmp_path / 'nope'}"], ByteTok(), tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmsmithError, match="no documents left in any source: e "):
        prepare([f"e={tmp_path / 'empty'}"], ByteTok(), tmp_path / "out", progress=False)
    _write_docs(tmp_path / "full", [_doc(1), _doc(2)])
    with pytest.warns(UserWarning, match="'e' has no documents"):
        m = prepare([f"e={tmp_path / 'empty'}", f"f={tmp_path / 'full'}"], ByteTok(), tmp_path / "out",
                    progress=False)
    assert [e["name"] for e in m["sources"]] == ["f"] and [e["name"] for e in m["excluded"]] == ["e"]
    assert TokenShards(tmp_path / "out").sources == ["f"]


def test_out_dir_is_replaced_atomically_and_never_clobbers_other_folders(tmp_path):
    _write_docs(tmp_path / "src", [_doc(1), _doc(2)])
    user = tmp_path / "mine"
    user.mkdir()
    (user / "precious.txt").write_text("keep me")
    with pytest.raises(LmsmithError, match="not a token-shard folder"):
        prepare([f"a={tmp_path / 'src'}"], ByteTok(), user, progress=False)
    assert (user / "precious.txt").read_text() == "keep me"
    prepare([f"a={tmp_path / 'src'}"], ByteTok(), tmp_path / "out", progress=False)
    prepare([f"b={tmp_path / 'src'}"], ByteTok(), tmp_path / "out", progress=False)  # rerun replaces
    assert sorted(p.name for p in (tmp_path / "out").glob("*.bin")) == ["train-b-00000.bin",
                                                                         "validation-b-00000.bin"]
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def test_parse_source_and_check_tokenizer(tmp_path, tok):
    assert (parse_source("a=x/y.txt:2.5").path, parse_source("a=x/y.txt:2.5").weight) == ("x/y.txt", 2.5)
    s = parse_source("w=C:/data/web")
    assert (s.path, s.weight) == ("C:/data/web", 1.0)
    for bad in ("nopath", "a=x:0", "a=x:-1", "=x", "a b=x"):
        with pytest.raises(LmsmithError):
            parse_source(bad)
    _write_docs(tmp_path / "src", [_doc(1), _doc(2)])
    prepare([f"a={tmp_path / 'src'}"], tok, tmp_path / "out", progress=False)
    sh = TokenShards(tmp_path / "out")
    sh.check_tokenizer(tok)
    other = ByteTok()
    with pytest.raises(LmsmithError) as ei:
        sh.check_tokenizer(other)
    assert tok.hash in str(ei.value) and other.hash in str(ei.value)
    with pytest.raises(LmsmithError, match="not a token-shard folder"):
        load_manifest(tmp_path / "src")
    # a truncated shard is detected, not silently read short
    shard = tmp_path / "out" / "train-a-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(LmsmithError, match="truncated"):
        TokenShards(tmp_path / "out").stream("a")


# ----------------------------------------------------------------------------- mixture sampler


@pytest.fixture(scope="module")
def ab_shards(tmp_path_factory) -> TokenShards:
    """Source "a": little text of 'a's (weight 3); "b": ten times more text of 'b's (weight 1)."""
    root = tmp_path_factory.mktemp("ab")
    _write_docs(root / "a", [f"{i:03d}" + "a" * 60 for i in range(10)])
    _write_docs(root / "b", [f"{i:03d}" + "b" * 600 for i in range(10)])
    prepare([f"a={root / 'a'}:3", f"b={root / 'b'}:1"], ByteTok(), root / "out", val_fraction=0.1,
            progress=False)
    return TokenShards(root / "out")


def test_mixture_hits_requested_proportions(ab_shards):
    mb = MixtureBatches(ab_shards, batch_size=64, seq_len=16, seed=3)
    rows_a = rows = 0
    for _ in range(100):
        b = next(mb)
        x = b["input_ids"]
        assert x.shape == (64, 16) and x.dtype == torch.long and b["labels"].shape == (64, 16)
        has_a, has_b = (x == ord("a")).any(1), (x == ord("b")).any(1)
        assert not (has_a & has_b).any(), "a row must come from one source"
        rows_a += int(has_a.sum())
        rows += 64
    # by weight (3:1 -> 75%), not by size (b holds 10x the tokens of a)
    assert abs(rows_a / rows - 0.75) < 0.03
    assert mb.sampled_rows == {"a": rows_a, "b": rows - rows_a}
    assert mb.sampled_tokens == {"a": rows_a * 16, "b": (rows - rows_a) * 16}
    mb2 = MixtureBatches(ab_shards, batch_size=64, seq_len=16, seed=3, weights={"a": 1, "b": 3})
    for _ in range(50):
        next(mb2)
    assert abs(mb2.sampled_rows["a"] / 3200 - 0.25) < 0.03
    only_b = MixtureBatches(ab_shards, batch_size=8, seq_len=16, weights={"b": 1})
    assert not (next(only_b)["input_ids"] == ord("a")).any()
    with pytest.raises(LmsmithError, match="unknown sources"):
        MixtureBatches(ab_shards, weights={"c": 1})
    with pytest.raises(LmsmithError, match="seq_len"):
        MixtureBatches(ab_shards, seq_len=10_000)


def test_mixture_rows_are_windows_of_the_stream(ab_shards):
    streams = {n: _stream(ab_shards, n, "train").astype(np.int64).tobytes() for n in ab_shards.sources}
    mb = MixtureBatches(ab_shards, batch_size=32, seq_len=24, seed=0)
    for _ in range(5):
        b = next(mb)
        x, y = b["input_ids"], b["labels"]
        assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the inputs shifted by one
        for row_x, row_y in zip(x, y):
            window = torch.cat([row_x, row_y[-1:]]).numpy().astype(np.int64).tobytes()
            assert any(window in s for s in streams.values())


def test_mixture_is_deterministic_and_resumable(ab_shards):
    def run(n, **kw):
        mb = MixtureBatches(ab_shards, batch_size=4, seq_len=16, seed=11, **kw)
        return mb, [next(mb)["input_ids"] for _ in range(n)]

    _, full = run(6)
    _, again = run(6)
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    assert not torch.equal(full[0], full[1])
    other = MixtureBatches(ab_shards, batch_size=4, seq_len=16, seed=12)
    assert not torch.equal(next(other)["input_ids"], full[0])
    first, _ = run(3)
    state = first.state_dict()
    assert state["step"] == 3
    resumed = MixtureBatches(ab_shards, batch_size=4, seq_len=16, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert all(torch.equal(next(resumed)["input_ids"], full[k]) for k in range(3, 6))
    _, from_start = run(2, start_step=4)
    assert torch.equal(from_start[0], full[4]) and torch.equal(from_start[1], full[5])
    assert torch.equal(first.batch(1)["input_ids"], full[1])
    with pytest.raises(LmsmithError, match="seed"):
        other.load_state_dict(state)


def test_sequential_batches_cover_the_validation_stream(ab_shards):
    T = 7
    got = {n: [] for n in ab_shards.sources}
    batches = list(sequential_batches(ab_shards, "validation", batch_size=3, seq_len=T))
    order = []
    for b in batches:
        x, y = b["input_ids"], b["labels"]
        assert x.shape == y.shape and x.shape[1] == T and x.shape[0] <= 3
        # one source per batch: identify it by its letter
        src = "a" if (x == ord("a")).any() else "b"
        order.append(src)
        for row_x, row_y in zip(x, y):
            keep = row_y != IGNORE_INDEX
            assert torch.equal(row_x[1:][keep[:-1] & keep[1:]], row_y[:-1][keep[:-1] & keep[1:]])
            got[src].extend(row_y[keep].tolist())
    for n in ab_shards.sources:
        stream = _stream(ab_shards, n, "validation").astype(np.int64)
        assert got[n] == stream[1:].tolist()  # every token after the first is a label once, in order
    assert order[:2] == ["a", "b"]  # round-robin across sources
    assert len(list(sequential_batches(ab_shards, "validation", 3, T, max_batches=2))) == 2
    only_b = list(sequential_batches(ab_shards, "validation", 3, T, sources=["b"]))
    assert all(not (b["input_ids"] == ord("a")).any() for b in only_b)


# ----------------------------------------------------------------------------- default corpus


def test_default_corpus_finds_stdlib_and_pydoc_topics(tmp_path):
    sources = default_corpus_sources()
    code, docs, tasks, stories = sources
    assert [s.name for s in sources] == ["code", "docs", "tasks", "stories"]
    assert code.weight > docs.weight > tasks.weight
    assert 0 < stories.weight < docs.weight
    files = [Path(f).relative_to(code.path).as_posix() for f in walk_files(code)]
    assert "json/__init__.py" in files and "os.py" in files and "asyncio/tasks.py" in files
    assert all(f.endswith(".py") for f in files) and len(files) > 300
    assert not [f for f in files if f.startswith(("test/", "site-packages/", "pydoc_data/", "idlelib/Icons"))]
    assert "encodings/cp1252.py" not in files
    from lmsmith.data import resolve_sources

    assert [s.name for s in resolve_sources(None)] == ["code", "docs", "tasks", "stories"]  # prepare(None) uses it
    tales = dict(iter_documents(stories))
    assert len(tales) == 20_000 and tales["story-00000"].endswith(".")
    topics = dict(iter_documents(docs))
    assert len(topics) > 50 and "assert" in topics and "assert" in topics["assert"]
    # end to end on a slice of it: the docs source through prepare
    m = prepare([docs], ByteTok(), tmp_path / "out", progress=False)
    assert m["sources"][0]["documents"] > 50 and m["sources"][0]["path"] == "<in-memory:docs>"


# ----------------------------------------------------------------------------- the CLI verb


def test_cli_prepare_in_process(tok_dir, tmp_path, capsys):
    _write_docs(tmp_path / "src", [_doc(i) for i in range(8)])
    (tmp_path / "empty").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warnings must come out as lines, not Python warnings
        rc = main(["data", "prepare", "--source", f"a={tmp_path / 'src'}:2", "--tokenizer", tok_dir,
                   "--source", f"e={tmp_path / 'empty'}",
                   "--out", str(tmp_path / "out"), "--val-fraction", "0.2", "--no-progress"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0
    assert captured.err.startswith("lmsmith: warning: source 'e' has no documents")
    assert "Prepared 8 documents" in out and str(tmp_path / "out") in out and "a (weight 2)" in out
    sh = TokenShards(tmp_path / "out")
    sh.check_tokenizer(Tokenizer.load(tok_dir))
    assert sh.weights == {"a": 2.0}


@pytest.mark.parametrize("case", ["missing", "malformed", "bad-weight"])
def test_cli_bad_input_is_one_line_exit_1(case, tok_dir, tmp_path, capsys):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "fine line that is long enough to keep"}\n{oops\n')
    source = {"missing": f"a={tmp_path / 'nope'}", "malformed": f"a={f}", "bad-weight": f"a={f}:-2"}[case]
    rc = main(["data", "prepare", "--source", source, "--tokenizer", tok_dir, "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("lmsmith: error: ") and err.count("\n") == 1, err
    if case == "malformed":
        assert f"{f}:2" in err and "--skip-bad" in err
