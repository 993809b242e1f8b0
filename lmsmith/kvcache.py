"""The KV cache: every layer's keys and values, with a length per row.

A row is one sequence (a serving slot, a beam, a batch row). Row b holds its tokens in
columns [0, lengths[b]) and the rotary position of a token is its column, so rows of
different lengths share one tensor without padding: a forward writes row b's T new
tokens at columns lengths[b] .. lengths[b] + T - 1 and masks the columns past each
row's end (`Transformer.hidden_states` builds that mask from `begin`'s lengths).

The protocol the model calls, once per forward: `begin(T)` (the lengths before it),
`update(layer, k, v)` for each layer, then `end(T)`. Everything else is for the
callers that manage sequences: `rows` (a view on some rows, sharing storage),
`truncate` (keep a row's first n tokens: prompt caching), `swap_rows` (slot
compaction), `reorder` (beam search).

`floor` columns at the front of every row belong to the model, not to the caller's
tokens: prompt tuning keeps its virtual tokens' keys/values there (written once, see
`PromptTunedModel.make_cache`). `tokens(row)` and `truncate` count tokens after it.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Preallocated keys/values (L, B, K, max_len, Dh) each, and `lengths` (B,) int64 on the CPU.

    Args:
        cfg: the model's config (layers, kv heads, head dim).
        batch_size: rows B.
        max_len: columns per row (default the model's context), `floor` included.
        floor: columns reserved in front of every row (they count as already filled).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *, floor: int = 0):
        self.max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.full((batch_size,), floor, dtype=torch.long)
        self.floor = floor
        self.ragged = False
        self._past: list[int] = []
        self._flat: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        """The common length of all rows (an error when rows differ: use `lengths`)."""
        lens = self.lengths.tolist()
        if min(lens) != max(lens):
            raise ValueError(f"rows have different lengths {lens}; read cache.lengths")
        return lens[0]

    def tokens(self, row: int) -> int:
        """How many of the caller's tokens row `row` holds (the floor not counted)."""
        return int(self.lengths[row]) - self.floor

    # ---- the protocol the model calls ----------------------------------------------------------

    def begin(self, T: int) -> list[int]:
        """Start a forward of T new tokens per row; return each row's length before it."""
        past = self.lengths.tolist()
        if max(past) + T > self.max_len:
            raise ValueError(f"KV cache is full: {max(past) + T} positions requested, {self.max_len} allocated")
        self._past = past
        self.ragged = min(past) != max(past)
        self._flat = None  # update's write offsets for this forward, computed once
        return past

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, K, T, Dh) at each row's end; return keys/values (B, K, S, Dh), S = max end.

        Columns past a shorter row's end hold stale values: the model's mask hides them.
        """
        T, past = k.shape[2], self._past
        end = max(past) + T
        if not self.ragged:
            self.k[layer, :, :, past[0]:end] = k
            self.v[layer, :, :, past[0]:end] = v
        elif T == 1:  # decoding: one index_copy per tensor into the layer's (B*K*max_len, Dh) view
            if self._flat is None or self._flat.device != k.device:
                B, K, M = len(past), k.shape[1], self.max_len
                base = (torch.arange(B)[:, None] * K + torch.arange(K)[None, :]) * M  # (B, K) row starts
                self._flat = (base + torch.tensor(past)[:, None]).reshape(-1).to(k.device)  # (B*K,)
            Dh, dt = k.shape[-1], self.k.dtype  # (index_copy_ does not cast as slice assignment does)
            self.k[layer].view(-1, Dh).index_copy_(0, self._flat, k.reshape(-1, Dh).to(dt))
            self.v[layer].view(-1, Dh).index_copy_(0, self._flat, v.reshape(-1, Dh).to(dt))
        else:
            for b, p in enumerate(past):
                self.k[layer, b, :, p:p + T] = k[b]
                self.v[layer, b, :, p:p + T] = v[b]
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def end(self, T: int) -> None:
        """Finish the forward: every row is T tokens longer."""
        self.lengths += T

    # ---- managing rows -------------------------------------------------------------------------

    def rows(self, start: int, stop: int) -> KVCache:
        """A cache over rows [start, stop) that shares this one's storage and lengths."""
        view = object.__new__(KVCache)
        view.max_len, view.floor, view.ragged, view._past, view._flat = self.max_len, self.floor, False, [], None
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.lengths = self.lengths[start:stop]
        return view

    def truncate(self, row: int, n: int) -> None:
        """Keep the first n tokens of row `row` (the next forward overwrites from there)."""
        if not 0 <= n <= self.tokens(row):
            raise ValueError(f"row {row} holds {self.tokens(row)} tokens; cannot keep {n}")
        self.lengths[row] = self.floor + n

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange two rows (their keys, values and lengths)."""
        if a == b:
            return
        n = int(max(self.lengths[a], self.lengths[b]))
        for t in (self.k, self.v):
            tmp = t[:, a, :, :n].clone()
            t[:, a, :, :n] = t[:, b, :, :n]
            t[:, b, :, :n] = tmp
        self.lengths[[a, b]] = self.lengths[[b, a]]

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i], for all rows (beam search reorders hypotheses every step).

        Same row count: copies only the filled columns, in place (no new buffers per step).
        """
        if len(index) != self.batch_size:  # a different row count: new buffers
            self.k = self.k.index_select(1, index.to(self.k.device))
            self.v = self.v.index_select(1, index.to(self.v.device))
            self.lengths = self.lengths.index_select(0, index.cpu())
            return
        n = int(self.lengths.max())
        self.k[:, :, :, :n] = self.k[:, :, :, :n].index_select(1, index.to(self.k.device))
        self.v[:, :, :, :n] = self.v[:, :, :, :n].index_select(1, index.to(self.v.device))
        self.lengths.copy_(self.lengths.index_select(0, index.cpu()))


class PackedStep:
    """One forward over several rows' new tokens packed into one sequence (1, N).

    Decode rows (one token each) and prompt chunks run together, so every linear layer runs
    once over all N tokens (one large matmul instead of a small one per row); attention is
    then done per segment against its own row of `cache`. Pass it as the model's `cache`.

    Args:
        cache: the KVCache the rows live in.
        segments: (row, n) in packing order: the next n tokens of the sequence go to `row`.
    """

    packed = True
    ragged = True  # never trim keys to the window by column: each segment has its own

    def __init__(self, cache: KVCache, segments: list[tuple[int, int]]):
        self.cache, self.segments = cache, segments
        self.floor = cache.floor
        self.past = [int(cache.lengths[row]) for row, _ in segments]
        for (row, n), p in zip(segments, self.past):
            if p + n > cache.max_len:
                raise ValueError(f"KV cache is full: row {row} needs {p + n} positions, {cache.max_len} allocated")
        self.starts, total = [], 0
        for _, n in segments:
            self.starts.append(total)
            total += n
        self.ends = [s + n - 1 for s, (_, n) in zip(self.starts, segments)]  # each segment's last token

    def positions(self, device) -> torch.Tensor:
        """Rotary positions (1, N): each segment continues its row."""
        return torch.cat([torch.arange(p, p + n, device=device) for p, (_, n) in zip(self.past, self.segments)])[None]

    def write(self, layer: int, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store segment i's keys/values (K, n, Dh); return its row's keys/values so far (K, S, Dh)."""
        row, n = self.segments[i]
        p = self.past[i]
        self.cache.k[layer, row, :, p:p + n] = k
        self.cache.v[layer, row, :, p:p + n] = v
        return self.cache.k[layer, row, :, :p + n], self.cache.v[layer, row, :, :p + n]

    def end(self, T: int = 0) -> None:
        for row, n in self.segments:
            self.cache.lengths[row] += n
