"""Batches from token shards: the weighted mixture sampler for training, sequential batches for eval.

`MixtureBatches` picks, for every row of every batch, a source with probability
proportional to its weight, then a uniformly random window of `seq_len + 1`
tokens in that source's token stream (documents are separated by EOS; windows
cross document boundaries, as in GPT-style pretraining). The batch at step k is
a pure function of (seed, k), so a resumed run sees exactly the batches an
uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..errors import LmsmithError
from .shards import TokenShards

IGNORE_INDEX = -100  # label value the loss skips (padding in the last evaluation window)


def _open(shards: TokenShards | str) -> TokenShards:
    return shards if isinstance(shards, TokenShards) else TokenShards(shards)


class MixtureBatches:
    """Infinite, deterministic, resumable iterator of training batches from a weighted source mixture.

    Each item is `{"input_ids": LongTensor (B, T), "labels": LongTensor (B, T)}` where a row is a
    window w of T + 1 tokens: input_ids = w[:-1], labels = w[1:].

    Args:
        shards: a `TokenShards` or the path of a shard folder.
        split: "train" (or "validation").
        batch_size: B, rows per batch.
        seq_len: T, tokens per row.
        weights: source name -> weight (sources not named get 0); None = the manifest's weights.
        seed: with the step, decides everything sampled.
        start_step: the step of the first batch yielded.

    `sampled_tokens` / `sampled_rows` count, per source, what this iterator has yielded
    (T tokens per row) since it was created.
    """

    def __init__(
        self,
        shards: TokenShards | str,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 256,
        weights: dict[str, float] | None = None,
        seed: int = 0,
        start_step: int = 0,
    ):
        self.shards = _open(shards)
        if batch_size < 1 or seq_len < 1:
            raise LmsmithError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be >= 1")
        self.split, self.batch_size, self.seq_len = split, int(batch_size), int(seq_len)
        self.seed, self.step = int(seed), int(start_step)
        w = dict(self.shards.weights) if weights is None else dict(weights)
        unknown = sorted(set(w) - set(self.shards.sources))
        if unknown:
            raise LmsmithError(
                f"mixture weights name unknown sources {', '.join(unknown)}; "
                f"sources: {', '.join(self.shards.sources)}"
            )
        names = [n for n in self.shards.sources if w.get(n, 0) > 0]
        bad = [n for n, v in w.items() if not (v >= 0 and np.isfinite(v))]
        if bad or not names:
            raise LmsmithError(f"mixture weights {w} must be >= 0 with at least one positive")
        self.streams = {}
        for n in names:
            s = self.shards.stream(n, split)
            if len(s) < self.seq_len + 1:
                raise LmsmithError(
                    f"source {n!r} has {len(s)} {split} tokens, fewer than seq_len + 1 = {self.seq_len + 1}; "
                    "use a shorter seq_len, add data, or give it weight 0"
                )
            self.streams[n] = s
        self.names = names
        p = np.array([w[n] for n in names], dtype=np.float64)
        self.probs = p / p.sum()  # (n_sources,)
        self.sampled_tokens = {n: 0 for n in names}
        self.sampled_rows = {n: 0 for n in names}

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch at `step` (does not move the iterator): input_ids, labels LongTensor (B, T)."""
        return self._sample(step)[0]

    def _sample(self, step: int) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        # A fresh generator per step from (seed, step): no state carries between steps.
        rng = np.random.default_rng([self.seed, int(step)])
        B, T = self.batch_size, self.seq_len
        which = rng.choice(len(self.names), size=B, p=self.probs)  # (B,)
        rows = np.empty((B, T + 1), dtype=np.int64)
        for r, si in enumerate(which):
            stream = self.streams[self.names[si]]
            start = int(rng.integers(0, len(stream) - (T + 1), endpoint=True))
            rows[r] = stream.read(start, T + 1)
        t = torch.from_numpy(rows)
        return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}, which

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch, which = self._sample(self.step)
        for si in which:
            name = self.names[si]
            self.sampled_rows[name] += 1
            self.sampled_tokens[name] += self.seq_len
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        """What a checkpoint must store to resume: the next step (and the seed, checked on load)."""
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; the seed must match (else the sequence would differ)."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise LmsmithError(
                f"data state was saved with seed {state['seed']} but this sampler uses seed {self.seed}; "
                "resume with the same seed"
            )
        self.step = int(state["step"])


def sequential_batches(
    shards: TokenShards | str,
    split: str = "validation",
    batch_size: int = 8,
    seq_len: int = 256,
    max_batches: int | None = None,
    sources: Sequence[str] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Deterministic evaluation batches that cover each source's `split` stream in order.

    Each source's stream is cut into consecutive windows of T + 1 tokens overlapping by one
    (stride T), so every token after the first is a label exactly once. The last window of a
    source may be shorter: its input is padded with EOS and its labels with -100 (IGNORE_INDEX).
    A batch holds rows of one source only; batches of different sources are interleaved
    round-robin so that `max_batches` samples all sources.

    Yields:
        {"input_ids": LongTensor (b, T), "labels": LongTensor (b, T)} with b <= batch_size
        (only a source's last batch is smaller).
    """
    sh = _open(shards)
    names = list(sh.sources if sources is None else sources)
    gens = [_source_batches(sh, n, split, batch_size, seq_len) for n in names if sh.tokens(n, split) > 1]
    produced = 0
    while gens:
        for g in list(gens):
            if max_batches is not None and produced >= max_batches:
                return
            b = next(g, None)
            if b is None:
                gens.remove(g)
                continue
            produced += 1
            yield b


def _source_batches(
    sh: TokenShards, name: str, split: str, B: int, T: int
) -> Iterator[dict[str, torch.Tensor]]:
    stream = sh.stream(name, split)
    n = len(stream)
    starts = range(0, n - 1, T)  # window i predicts tokens [i*T + 1, min(i*T + T, n - 1)]
    for i in range(0, len(starts), B):
        chunk = starts[i:i + B]
        inp = np.full((len(chunk), T), sh.eos_id, dtype=np.int64)
        lab = np.full((len(chunk), T), IGNORE_INDEX, dtype=np.int64)
        for r, s in enumerate(chunk):
            w = stream.read(s, min(T + 1, n - s))
            inp[r, : len(w) - 1] = w[:-1]
            lab[r, : len(w) - 1] = w[1:]
        yield {"input_ids": torch.from_numpy(inp), "labels": torch.from_numpy(lab)}
