"""Offline teacher targets: the teacher run once, its top-K next-token distribution kept on disk.

    write_cache(teacher, shards, out, top_k=, seq_len=, tokens=, ...)   -> folder below
    TeacherCache(path)                                                   validated, memory-mapped
    cache.batches(split, batch_size, seed)                               resumable training batches
    cache.eval_batches(split, batch_size)                                one pass in order

A cache folder holds, per split, fixed windows of seq_len + 1 tokens cut from the token shards (a
window's teacher distribution depends on its context, so the windows are fixed when the teacher runs)
and for each of the seq_len positions the teacher's K most likely next tokens:

    manifest.json             what made it: teacher, shards, tokenizer hash, K, temperature, windows
    {split}.tokens.bin        (W, T + 1) int32  the windows
    {split}.ids.bin           (W, T, K)  uint16 | int32  top-K token ids, most likely first
    {split}.logp.bin          (W, T, K)  float16  their log-probabilities at the cache's temperature
    {split}.rest.bin          (W, T)     float32  log of the probability outside the K ids

Cost on disk per position: K * (2 + 2) + 4 bytes with a vocabulary under 65,536 (K = 64: 260 bytes; a
window of 256 positions, 65 KB). Training compares the student with these K + 1 buckets
(`train.distill`): exact masses, no renormalisation, and K = V equals online distillation.
Every file's size is checked against the manifest before it is mapped; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import LmsmithError
from ..fileio import atomic_file

FORMAT = "lmsmith-teacher-cache"
VERSION = 1
_ARRAYS = ("tokens", "ids", "logp", "rest")


def _shapes(windows: int, seq_len: int, k: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {"tokens": ((windows, seq_len + 1), np.dtype("<i4")),
            "logp": ((windows, seq_len, k), np.dtype("<f2")),
            "rest": ((windows, seq_len), np.dtype("<f4"))}


def _ids_dtype(vocab: int) -> np.dtype:
    return np.dtype("<u2") if vocab <= 65536 else np.dtype("<i4")


def fingerprint(model_dir: str | Path) -> str:
    """A short hash of a teacher's config.json and weight file names and sizes (cheap, no full read)."""
    p = Path(model_dir)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.name == "config.json":
                h.update(f.read_bytes())
            elif f.suffix in (".safetensors", ".gguf", ".bin"):
                h.update(f"{f.name}:{f.stat().st_size}".encode())
    else:
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _windows(shards, split: str, seq_len: int, tokens: int | None, seed: int) -> np.ndarray:
    """(W, T + 1) windows: every source's stream cut at stride T, then a seeded sample if `tokens` caps it."""
    rows = []
    for name in shards.sources:
        stream = shards.stream(name, split)
        for s in range(0, len(stream) - seq_len - 1 + 1, seq_len):
            rows.append(stream.read(s, seq_len + 1).astype(np.int32))
    if not rows:
        raise LmsmithError(f"{shards.path}: no {split} stream holds seq_len + 1 = {seq_len + 1} tokens; "
                           "use a shorter --seq-len or more data")
    windows = np.stack(rows)
    if tokens is not None and len(windows) * seq_len > tokens:
        keep = max(1, math.ceil(tokens / seq_len))
        pick = np.random.default_rng(seed).choice(len(windows), size=keep, replace=False)
        windows = windows[np.sort(pick)]
    return windows


@torch.no_grad()
def _top_k(teacher, ids: torch.Tensor, k: int, temperature: float, chunk: int = 1 << 22
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-K of every position of `ids` (B, T): ids (B, T, K), logp (B, T, K), rest (B, T)."""
    h = teacher.hidden_states(ids)  # (B, T, D)
    B, T, _ = h.shape
    flat = h.reshape(B * T, -1)
    rows = max(1, chunk // teacher.config.vocab_size)
    out_i, out_l, out_r = [], [], []
    for s in range(0, flat.shape[0], rows):
        lp = torch.log_softmax(teacher.lm_head(flat[s:s + rows]).float() / temperature, dim=-1)  # (n, V)
        top, idx = lp.topk(min(k, lp.shape[-1]), dim=-1)
        if top.shape[-1] < lp.shape[-1]:  # the log-mass outside the K ids, as a logsumexp (stable near 1)
            rest = lp.scatter(1, idx, float("-inf")).logsumexp(-1)
        else:
            rest = top.new_full(top.shape[:1], float("-inf"))
        out_i.append(idx)
        out_l.append(top)
        out_r.append(rest)
    cat = torch.cat
    return (cat(out_i).reshape(B, T, -1), cat(out_l).reshape(B, T, -1), cat(out_r).reshape(B, T))


def write_cache(teacher, shards, out: str | Path, *, top_k: int, seq_len: int, tokens: int | None,
                val_tokens: int | None, temperature: float = 1.0, batch_size: int = 16, seed: int = 0,
                teacher_path: str = "", progress: bool = True, policy: str = "auto") -> Path:
    """Run `teacher` over windows of `shards` (train and validation) and write a cache folder at `out`.

    Args:
        teacher: the teacher model (any form lmsmith loads); shards: a `TokenShards`.
        top_k: K ids kept per position (at most the vocabulary); seq_len: T, positions per window.
        tokens / val_tokens: cap on the positions of the train / validation windows (a seeded sample).
        temperature: the teacher's log-probabilities are those of softmax(logits / temperature).

    The arrays are written first and manifest.json last (atomically): an interrupted run leaves a folder
    that `TeacherCache` refuses (no manifest), never a half cache it would read.
    """
    vocab = int(teacher.config.vocab_size)
    if not 1 <= top_k <= vocab:
        raise LmsmithError(f"--top-k {top_k}: must be between 1 and the vocabulary ({vocab})")
    teacher.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # the old cache is invalid from the first byte written
    splits = {}
    for split, cap in (("train", tokens), ("validation", val_tokens)):
        try:
            windows = _windows(shards, split, seq_len, cap, seed)
        except LmsmithError:
            if split == "validation":  # a corpus without a validation split: train only
                continue
            raise
        _fill(out, split, windows, teacher, top_k, temperature, batch_size, policy, progress)
        splits[split] = {"windows": len(windows)}
    manifest = {
            "format": FORMAT, "version": VERSION, "top_k": top_k, "seq_len": seq_len, "vocab_size": vocab,
            "temperature": temperature, "teacher": teacher_path,
            "teacher_fingerprint": fingerprint(teacher_path) if teacher_path and Path(teacher_path).exists() else "",
            "shards": str(Path(shards.path).resolve()), "tokenizer_hash": shards.tokenizer_hash,
            "eos_id": shards.eos_id, "seed": seed, "splits": splits}
    with atomic_file(out / "manifest.json") as fh:
        fh.write(json.dumps(manifest, indent=2) + "\n")
    return out


def _fill(out: Path, split: str, windows: np.ndarray, teacher, top_k: int, temperature: float,
          batch_size: int, policy: str, progress: bool) -> None:
    """Write one split's windows (W, T + 1) and the teacher's top-K of each of their positions."""
    from ..precision import autocast
    from ..train.metrics import progress_bar

    device = next(teacher.parameters()).device
    seq_len = windows.shape[1] - 1
    arrays = _open_arrays(out, split, len(windows), seq_len, top_k, int(teacher.config.vocab_size), "w+")
    arrays["tokens"][:] = windows
    bar = progress_bar(len(windows), 0, progress)
    if hasattr(bar, "set_description"):
        bar.set_description(f"teacher top-{top_k}, {split}")
        bar.unit = "window"
    for s in range(0, len(windows), batch_size):
        ids = torch.from_numpy(windows[s:s + batch_size, :-1].astype(np.int64)).to(device)
        with autocast(policy, device):
            i, lp, rest = _top_k(teacher, ids, top_k, temperature)
        arrays["ids"][s:s + len(ids)] = i.cpu().numpy()
        arrays["logp"][s:s + len(ids)] = lp.cpu().numpy()
        arrays["rest"][s:s + len(ids)] = rest.cpu().numpy()
        bar.update(len(ids))
    bar.close()
    for a in arrays.values():
        a.flush()


def _open_arrays(folder: Path, split: str, windows: int, seq_len: int, k: int, vocab: int, mode: str
                 ) -> dict[str, np.memmap]:
    shapes = _shapes(windows, seq_len, k)
    shapes["ids"] = ((windows, seq_len, k), _ids_dtype(vocab))
    out = {}
    for name in _ARRAYS:
        shape, dtype = shapes[name]
        f = folder / f"{split}.{name}.bin"
        if mode == "r":
            expected = int(np.prod(shape)) * dtype.itemsize
            size = f.stat().st_size if f.exists() else -1
            if size != expected:
                raise LmsmithError(f"{f}: {size if size >= 0 else 'missing'} bytes, the manifest's {windows} "
                                   f"windows x {seq_len} positions x top-{k} need {expected}; the cache is "
                                   "truncated or stale: re-run `lmsmith distill cache`")
        out[name] = np.memmap(f, dtype=dtype, mode=mode, shape=shape)
    return out


class TeacherCache:
    """A cache folder, validated (format, sizes) and memory-mapped read-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise LmsmithError(f"{self.path}: no manifest.json; make a cache with `lmsmith distill cache`")
        try:
            m = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            raise LmsmithError(f"{mf}: not a readable JSON manifest ({e})") from None
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise LmsmithError(f"{mf}: not a teacher cache (format {m.get('format') if isinstance(m, dict) else m!r})")
        if m.get("version") != VERSION:
            raise LmsmithError(f"{mf}: cache version {m.get('version')}, this lmsmith reads {VERSION}; remake it")
        try:
            self.top_k, self.seq_len, self.vocab_size = int(m["top_k"]), int(m["seq_len"]), int(m["vocab_size"])
            self.temperature = float(m["temperature"])
            splits = {s: int(v["windows"]) for s, v in m["splits"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise LmsmithError(f"{mf}: field {e} missing or malformed; remake the cache") from None
        if not (1 <= self.top_k <= self.vocab_size and self.seq_len >= 1 and all(w >= 0 for w in splits.values())):
            raise LmsmithError(f"{mf}: top_k / seq_len / windows out of range; remake the cache")
        self.manifest = m
        self.tokenizer_hash = m.get("tokenizer_hash", "")
        self.arrays = {s: _open_arrays(self.path, s, w, self.seq_len, self.top_k, self.vocab_size, "r")
                       for s, w in splits.items()}

    def windows(self, split: str) -> int:
        return len(self.arrays[split]["tokens"]) if split in self.arrays else 0

    def batch(self, split: str, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch of these window indices: input_ids, labels (B, T); teacher_ids, teacher_logp (B, T, K);
        teacher_rest (B, T)."""
        a = self.arrays[split]
        w = torch.from_numpy(np.asarray(a["tokens"][rows], dtype=np.int64))
        return {"input_ids": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous(),
                "teacher_ids": torch.from_numpy(np.asarray(a["ids"][rows]).astype(np.int64)),
                "teacher_logp": torch.from_numpy(np.asarray(a["logp"][rows], dtype=np.float32)),
                "teacher_rest": torch.from_numpy(np.asarray(a["rest"][rows], dtype=np.float32))}

    def batches(self, split: str = "train", batch_size: int = 16, seed: int = 0) -> CachedBatches:
        return CachedBatches(self, split, batch_size, seed)

    def eval_batches(self, split: str = "validation", batch_size: int = 16,
                     max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        n = self.windows(split)
        for b, s in enumerate(range(0, n, batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield self.batch(split, np.arange(s, min(s + batch_size, n)))


class CachedBatches:
    """Infinite, resumable training batches of cached windows: batch k is drawn from (seed, k) alone."""

    def __init__(self, cache: TeacherCache, split: str, batch_size: int, seed: int):
        if cache.windows(split) == 0:
            raise LmsmithError(f"{cache.path}: no {split} windows in the cache")
        self.cache, self.split, self.batch_size, self.seed, self.step = cache, split, batch_size, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        return self.cache.batch(self.split, np.sort(rng.integers(0, self.cache.windows(self.split),
                                                                 self.batch_size)))

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise LmsmithError(f"data state was saved with seed {state['seed']}; resume with the same seed")
        self.step = int(state["step"])
