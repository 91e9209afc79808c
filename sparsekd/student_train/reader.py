"""Streaming reader over a cache for training: row groups strided by rank, a seeded shuffle
buffer, fixed-size batches, and a state that makes resuming exact.

`keep` (a set of seq_ids) restricts the stream to those sequences: how a refined set's
sequences are read with the targets of the full teacher cache (`train-student --cache
REFINED --teacher-cache FULL`).

The unit of reading is a Parquet row group (`schemas.format.ROW_GROUP_SIZE` sequences);
rank r of R reads row groups r, r + R, ... of the manifest-ordered list, so ranks never
share a sequence. Each epoch visits the rank's row groups in an order drawn from
(seed, epoch, rank) and passes the sequences through a shuffle buffer seeded the same way.
The stream is infinite (epochs follow each other); training is counted in steps.

State is `{"epoch", "consumed"}` (sequences yielded in the current epoch): the stream is a
pure function of (cache, seed, rank, world), so `load_state_dict` replays it to that point
without touching the model, and the next batch is the one an uninterrupted run would get.

    reader = CacheReader(cache, batch_size=8, rank=0, world_size=1, seed=0)
    batch = next(reader)            # Batch of numpy arrays, see `collate`
    state = reader.state_dict()
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from sparsekd.schemas import format as F
from sparsekd.schemas.cache import Cache, Sequence


@dataclass
class Batch:
    """B sequences of L tokens, flattened to rows for the loss. S = widest support."""

    seq_ids: np.ndarray  # int64 [B]
    input_ids: np.ndarray  # int64 [B, L]
    labels: np.ndarray  # int64 [B * L]
    ids: np.ndarray  # int64 [B * L, S], -1 = padding
    probs: np.ndarray  # float32 [B * L, S], 0 on padding


def collate(seqs: list[Sequence]) -> Batch:
    """Stack sequences into a Batch; supports are padded to the widest position's size."""
    L = len(seqs[0].input_ids)
    supports = [s.targets() for s in seqs]
    S = max(1, max(int(np.diff(off).max(initial=0)) for off, _, _ in supports))
    rows = len(seqs) * L
    ids = np.full((rows, S), -1, dtype=np.int64)
    probs = np.zeros((rows, S), dtype=np.float32)
    for b, (off, sid, sp) in enumerate(supports):
        sizes = np.diff(off)
        pos = np.repeat(np.arange(L), sizes)
        col = np.arange(len(sid)) - np.repeat(off[:-1], sizes)
        ids[b * L + pos, col] = sid
        probs[b * L + pos, col] = sp
    return Batch(
        seq_ids=np.array([s.seq_id for s in seqs], dtype=np.int64),
        input_ids=np.stack([s.input_ids for s in seqs]).astype(np.int64),
        labels=np.concatenate([s.labels for s in seqs]).astype(np.int64),
        ids=ids,
        probs=probs,
    )


class CacheReader:
    """Infinite, deterministic, resumable batch stream over this rank's part of a cache."""

    def __init__(
        self,
        cache: Cache,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 256,
        keep: frozenset[int] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cache = cache
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.keep = keep
        groups = []
        for entry in cache.shards:
            pf = pq.ParquetFile(cache.shard_path(entry))
            for g in range(pf.metadata.num_row_groups):
                if keep is None or not keep.isdisjoint(
                    pf.read_row_group(g, columns=[F.COL_SEQ_ID]).column(0).to_pylist()
                ):
                    groups.append((entry, g))
        self.groups = groups[rank::world_size]
        if not self.groups:
            raise ValueError(
                f"rank {rank} of {world_size} gets no data: the cache has {len(groups)} row "
                "groups"
                + (" holding kept sequences" if keep is not None else "")
                + "; use fewer ranks or a larger cache"
            )
        self.epoch = 0
        self.consumed = 0
        self._it = self._stream(self.epoch, 0)

    def _epoch_sequences(self, epoch: int) -> Iterator[Sequence]:
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        buf: list[Sequence] = []
        for gi in rng.permutation(len(self.groups)):
            entry, g = self.groups[gi]
            for seq in self.cache.iter_shard(entry, [g]):
                if self.keep is not None and seq.seq_id not in self.keep:
                    continue
                buf.append(seq)
                if len(buf) >= self.shuffle_buffer:
                    yield buf.pop(int(rng.integers(len(buf))))
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))

    def _stream(self, epoch: int, skip: int) -> Iterator[Sequence]:
        while True:
            for i, seq in enumerate(self._epoch_sequences(epoch)):
                if i >= skip:
                    self.epoch, self.consumed = epoch, i + 1
                    yield seq
            epoch, skip = epoch + 1, 0
            self.epoch, self.consumed = epoch, 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return collate([next(self._it) for _ in range(self.batch_size)])

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"reader state was saved with {key}={state[key]}, "
                    f"this run has {getattr(self, key)}"
                )
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        self._it = self._stream(self.epoch, self.consumed)
