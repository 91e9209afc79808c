"""Streaming reader: each rank reads only its own part of a cache, in a seeded order that a
resume reaches by seeking, with batches prepared ahead in a background thread.

Streams. The cache's row groups (from the shard index: no shard is opened to list them)
are cut into `streams` contiguous ranges; stream i (a rank, or a (rank, DataLoader
worker) pair) reads only range i, so it opens about 1/streams of the shards. `keep` (a
sorted array of seq_ids) restricts the stream to those sequences: how a refined set's
sequences are read with the targets of the full teacher cache; row groups holding none
are dropped before the cut, from the index alone.

Order. Epoch e of stream i visits its row groups in an order drawn from (seed, e, i), in
windows of `shuffle_buffer` sequences' worth of groups; each window's sequences are
shuffled by (seed, e, i, window). The stream is a pure function of (cache, seed, i,
streams), so the position `{"epoch", "window", "offset"}` names the next sequence exactly:
resuming decodes one window (at most `shuffle_buffer` sequences plus a row group) and
skips `offset` of them, whatever the number of sequences consumed before.

Reading. A stream's row groups are read in the order it consumes them, across window
boundaries; from an object store `read_ahead` of them are in flight at once (default: the
cache's, 0 on a local disk), which hides the store's latency.

Batches (`CacheReader`): B sequences collated into numpy arrays (`collate`), converted to
torch tensors (pinned on CUDA for one non-blocking copy per step) by a background thread
`prefetch` batches ahead. `state_dict()` is the position after the last batch handed out,
not after the ones prepared; `wait_s` is the time `next()` waited for the thread.

    reader = CacheReader(cache, batch_size=8, rank=0, world_size=1, seed=0)
    batch = next(reader)            # dict of tensors, see `collate`
    state = reader.state_dict()
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from sparsekd.errors import CacheError
from sparsekd.schemas.cache import Cache, Sequence, in_sorted

IGNORE = -100  # the label of a position the student does not learn (transformers' value)


BATCH_KEYS = (
    "seq_id",
    "input_ids",
    "position_ids",
    "labels",
    "teacher_ids",
    "teacher_probs",
    "teacher_label_logprob",
)
# what the loss module takes (student_train.model.DistillModule.forward)
LOSS_KEYS = ("input_ids", "position_ids", "labels", "teacher_ids", "teacher_probs")


@dataclass
class Batch:
    """B sequences of L tokens; S = the widest support. The one batch layout: the trainer,
    evaluation and the public `integrations.torch.collate` all hand these keys on
    (`BATCH_KEYS`); the model takes `input_ids` with `position_ids` (restarting at each
    document of a row: with them, and no attention mask, transformers keeps the documents
    apart), the loss takes `labels`, `teacher_ids` and `teacher_probs` flattened to
    B * L rows."""

    seq_id: np.ndarray  # int64 [B]
    input_ids: np.ndarray  # int64 [B, L]
    position_ids: np.ndarray  # int64 [B, L]: index of each position in its document
    labels: np.ndarray  # int64 [B, L]: the token each position predicts, IGNORE = not learnt
    teacher_ids: np.ndarray  # int64 [B, L, S], -1 = padding
    teacher_probs: np.ndarray  # float32 [B, L, S], 0 on padding
    teacher_label_logprob: np.ndarray  # float32 [B, L]: the teacher's log p(label), 0 unlearnt

    def tensors(self, pin: bool = False) -> dict:
        import torch

        out = {k: torch.from_numpy(v) for k, v in vars(self).items()}
        return {k: v.pin_memory() for k, v in out.items()} if pin else out


def collate(seqs: list[Sequence]) -> Batch:
    """Stack sequences into a Batch; supports are padded to the widest position's size, and
    positions the student does not learn get the label IGNORE and no support (so both the
    CE and the KD means run over learnt positions only)."""
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
        seq_id=np.array([s.seq_id for s in seqs], dtype=np.int64),
        input_ids=np.stack([s.input_ids for s in seqs]).astype(np.int64),
        position_ids=np.stack([s.position_ids for s in seqs]),
        labels=np.stack([np.where(s.loss_mask, s.labels, IGNORE) for s in seqs]).astype(np.int64),
        teacher_ids=ids.reshape(len(seqs), L, S),
        teacher_probs=probs.reshape(len(seqs), L, S),
        teacher_label_logprob=np.stack(
            [np.where(s.loss_mask, s.token_logprobs, 0.0) for s in seqs]
        ).astype(np.float32),
    )


def _cut(n: int, parts: int, i: int) -> slice:
    return slice(n * i // parts, n * (i + 1) // parts)


class SequenceStream:
    """Stream i of `streams` over a cache: its row groups, its windows, its sequences."""

    def __init__(
        self,
        cache: Cache,
        *,
        stream: int = 0,
        streams: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 256,
        shuffle: bool = True,
        keep: np.ndarray | None = None,
        read_ahead: int | None = None,
        allow_empty: bool = False,
        whole: bool = False,
    ):
        if not 0 <= stream < streams:
            raise ValueError(f"stream {stream} is outside 0..{streams - 1}")
        self.cache, self.stream, self.streams = cache, stream, streams
        self.seed, self.shuffle, self.keep = seed, shuffle, keep
        self.read_ahead = read_ahead  # row groups in flight (None: the cache's default)
        shard, group, rows = cache.row_groups()
        first = cache.index.first_seq[shard] + group * cache.row_group_size  # ids consecutive
        kept = rows
        if keep is not None:  # only groups holding a kept sequence
            lo = np.searchsorted(keep, first)
            hi = np.searchsorted(keep, first + rows)
            has = hi > lo
            shard, group, rows, first, kept = (
                shard[has], group[has], rows[has], first[has], (hi - lo)[has]
            )  # fmt: skip
        mine = slice(None) if whole else _cut(len(shard), streams, stream)  # whole: `keep`
        self.shard, self.group = shard[mine], group[mine]  # is already this stream's own
        self._first, self._rows = first[mine], rows[mine]  # each group's seq_ids, from the index
        self.sequences = int(kept[mine].sum())  # in one epoch of this stream
        if not len(self.shard) and not allow_empty:
            raise CacheError(
                f"stream {stream} of {streams} gets no data: the cache has {len(shard)} row "
                "groups"
                + (" holding kept sequences" if keep is not None else "")
                + "; use fewer ranks or DataLoader workers, or a larger cache"
            )
        self.window_groups = max(1, -(-shuffle_buffer // cache.row_group_size))
        self._order_epoch, self._order = None, np.arange(0)

    @property
    def num_windows(self) -> int:
        return -(-len(self.shard) // self.window_groups)

    def _rng(self, *key) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, *key])

    def _group_order(self, epoch: int) -> np.ndarray:
        """This stream's row groups in the epoch's order (drawn once per epoch, not per
        window: a rank of a 10^11-token cache holds ~10^5 groups)."""
        if self._order_epoch != epoch:
            n = len(self.shard)
            self._order = self._rng(epoch).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        return self._order

    def _window_groups(self, epoch: int, w: int) -> list[tuple[int, int]]:
        order = self._group_order(epoch)[w * self.window_groups : (w + 1) * self.window_groups]
        return [(int(self.shard[gi]), int(self.group[gi])) for gi in order]

    def _window_sequences(self, epoch: int, w: int, groups: list[list[Sequence]]):
        """A window's sequences from its decoded row groups, in the order the stream yields
        them."""
        seqs = [s for g in groups for s in g]
        if self.keep is not None and seqs:
            kept = in_sorted(np.array([s.seq_id for s in seqs]), self.keep)
            seqs = [s for s, k in zip(seqs, kept) if k]
        if self.shuffle:
            seqs = [seqs[i] for i in self._rng(epoch, w).permutation(len(seqs))]
        return seqs

    def _group_ids(self, gis) -> np.ndarray:
        """The seq_ids of this stream's groups `gis` (positions in its lists), in order,
        from the index alone; without the `keep` filter."""
        gis = np.asarray(gis, dtype=np.int64)
        n = self._rows[gis]
        starts = np.repeat(self._first[gis], n)
        return starts + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)

    def _kept(self, ids: np.ndarray) -> np.ndarray:
        return ids if self.keep is None else ids[in_sorted(ids, self.keep)]

    def unread(self, state: dict) -> np.ndarray:
        """The seq_ids this stream has yet to yield in the epoch of `state` (sorted), from
        the index alone: what a run resumed on another number of ranks must still read."""
        epoch, w, offset = state["epoch"], state["window"], state["offset"]
        if w >= self.num_windows:
            return np.zeros(0, dtype=np.int64)
        order = self._group_order(epoch)
        wg = self.window_groups
        window = self._kept(self._group_ids(order[w * wg : (w + 1) * wg]))
        if self.shuffle:  # the order `_window_sequences` yields them in
            window = window[self._rng(epoch, w).permutation(len(window))]
        later = self._kept(self._group_ids(order[(w + 1) * wg :]))
        return np.sort(np.concatenate([window[offset:], later]))

    def window(self, epoch: int, w: int) -> list[Sequence]:
        """The sequences of window w of an epoch, in the order the stream yields them."""
        groups = list(self.cache.read_groups(self._window_groups(epoch, w), self.read_ahead))
        return self._window_sequences(epoch, w, groups)

    def _windows(self, epoch: int, w: int, epochs: int | None):
        """(epoch, window) from the given one on, through `epochs` (None: forever)."""
        while epochs is None or epoch < epochs:
            while w < self.num_windows:
                yield epoch, w
                w += 1
            epoch, w = epoch + 1, 0

    def iterate(self, state: dict | None = None, epochs: int | None = None):
        """Yield `(sequence, state after it)` from `state` on; `epochs` bounds the epoch
        number (None: forever). Row groups are read ahead across window boundaries."""
        state = state or {}
        epoch, w, offset = state.get("epoch", 0), state.get("window", 0), state.get("offset", 0)
        plan = self._windows(epoch, w, epochs)
        sizes: deque = deque()  # groups per planned window, in order

        def pairs():
            for e, wi in plan:
                groups = self._window_groups(e, wi)
                sizes.append((e, wi, len(groups)))
                yield from groups

        groups = self.cache.read_groups(pairs(), self.read_ahead)
        try:
            for g0 in groups:
                e, wi, n = sizes.popleft()
                window = [g0, *(next(groups) for _ in range(n - 1))]
                seqs = self._window_sequences(e, wi, window)
                start = offset if (e, wi) == (epoch, w) else 0
                for i in range(start, len(seqs)):
                    nxt = {"epoch": e, "window": wi, "offset": i + 1}
                    if i + 1 == len(seqs):
                        nxt = {"epoch": e, "window": wi + 1, "offset": 0}
                    yield seqs[i], nxt
        finally:
            groups.close()


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
        keep: np.ndarray | None = None,
        prefetch: int = 4,
        pin_memory: bool = False,
        read_ahead: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.stream = SequenceStream(
            cache,
            stream=rank,
            streams=world_size,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            keep=keep,
            read_ahead=read_ahead,
        )
        if batch_size > self.stream.sequences:
            raise CacheError(
                f"--batch-size {batch_size} is more than the {self.stream.sequences} sequences "
                f"rank {rank} of {world_size} reads from {cache.path}: a batch would repeat "
                "sequences; use a smaller batch, fewer ranks or a larger cache"
            )
        self.batch_size, self.prefetch, self.pin = batch_size, prefetch, pin_memory
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self._args = {"seed": seed, "shuffle_buffer": shuffle_buffer, "read_ahead": read_ahead}
        self.cache, self.keep = cache, keep
        self.carry, self.carry_stream = None, None  # see `load_state_dicts`
        self.state = {"epoch": 0, "window": 0, "offset": 0}
        self.wait_s = 0.0
        self._start(self.state)

    def _sequences(self, state: dict):
        c = self.carry
        if c is not None and state["epoch"] < c["next_epoch"]:  # the carry pass first
            yield from self.carry_stream.iterate(state, epochs=c["next_epoch"])
            state = {"epoch": c["next_epoch"], "window": 0, "offset": 0}
        yield from self.stream.iterate(state)

    def _batches(self, state: dict) -> Iterator[tuple[dict, dict]]:
        seqs: list[Sequence] = []
        for seq, after in self._sequences(state):
            seqs.append(seq)
            if len(seqs) == self.batch_size:
                yield collate(seqs).tensors(self.pin), after
                seqs = []

    def _start(self, state: dict) -> None:
        self._stop()
        it = self._batches(state)
        self._it = it
        if not self.prefetch:
            self._next = lambda: next(it)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for item in it:
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as e:  # handed to the consumer, raised there
                q.put(e)
            finally:
                it.close()  # stops its row-group reads in flight

        thread = threading.Thread(target=produce, name="sparsekd-reader", daemon=True)
        thread.start()

        def take():
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            return item

        self._next, self._thread, self._stop_event = take, thread, stop

    def _stop(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._stop_event.set()
            self._thread.join()
            self._thread = None
        elif getattr(self, "_it", None) is not None:
            self._it.close()
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        t0 = time.perf_counter()
        batch, self.state = self._next()
        self.wait_s += time.perf_counter() - t0
        return batch

    def close(self) -> None:
        self._stop()

    def state_dict(self) -> dict:
        out = {**self.state, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}
        return out if self.carry is None else {**out, "carry": self.carry}

    def load_state_dict(self, state: dict) -> None:
        """Continue from this rank's own saved position (same seed, rank and world size)."""
        for key in ("seed", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"reader state was saved with {key}={state[key]}, this run has "
                    f"{getattr(self, key)}"
                )
        self._set_carry(state.get("carry"))
        self.state = {k: state[k] for k in ("epoch", "window", "offset")}
        self._start(self.state)

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue from the positions of every rank of the run saved (`states[r]` is rank
        r's), on this run's number of ranks, which may differ.

        Same number: each rank continues its own stream. Another number: first a *carry
        pass*, in which this run's ranks share out the sequences that the saved ranks had
        yet to read in their epochs (each read once, in a seeded order); then epochs
        continue as usual, cut for this run's ranks. The pass is a pure function of the
        saved positions, which the state carries, so a run resumed again (on any number of
        ranks, even during the pass) continues it exactly."""
        if len(states) == self.world_size:
            self.load_state_dict(states[self.rank])
            return
        if {st["seed"] for st in states} != {self.seed}:
            raise ValueError(f"reader states were saved with another seed than {self.seed}")
        prev = states[0].get("carry")
        inside = [prev is not None and st["epoch"] < prev["next_epoch"] for st in states]
        carry = {
            "world": len(states),
            "positions": [{k: st[k] for k in ("epoch", "window", "offset")} for st in states],
            "carry": prev if any(inside) else None,  # a pass under way when resized again
            "next_epoch": max(
                prev["next_epoch"] if i else st["epoch"] + 1 for st, i in zip(states, inside)
            ),
        }
        self._set_carry(carry)
        self.state = {"epoch": carry["next_epoch"] - 1, "window": 0, "offset": 0}
        self._start(self.state)

    def _set_carry(self, carry: dict | None) -> None:
        self.carry, self.carry_stream = carry, None
        if carry is not None:
            a = self._args
            keep = carry_sequences(
                self.cache, self.keep, carry, seed=a["seed"], shuffle_buffer=a["shuffle_buffer"]
            )
            self.carry_stream = _carry_stream(
                self.cache, keep, self.rank, self.world_size, **self._args
            )


def carry_sequences(
    cache: Cache, keep, carry: dict, *, seed: int, shuffle_buffer: int
) -> np.ndarray:
    """The seq_ids a carry pass reads (sorted): those the saved ranks of `carry` had yet to
    read in their epochs, found from the cache's index (no shard is opened)."""
    prev = carry["carry"]
    base = None
    parts = []
    for i, pos in enumerate(carry["positions"]):
        inside = prev is not None and pos["epoch"] < prev["next_epoch"]
        if inside and base is None:
            base = carry_sequences(cache, keep, prev, seed=seed, shuffle_buffer=shuffle_buffer)
        if inside:  # a rank of the earlier carry pass
            stream = _carry_stream(cache, base, i, carry["world"], seed, shuffle_buffer)
        else:
            stream = SequenceStream(
                cache, stream=i, streams=carry["world"], seed=seed,
                shuffle_buffer=shuffle_buffer, keep=keep,
            )  # fmt: skip
        parts.append(stream.unread(pos))
    return np.unique(np.concatenate(parts))


def _carry_stream(
    cache: Cache, sequences: np.ndarray, rank: int, world: int, seed: int, shuffle_buffer: int,
    read_ahead=None,
) -> SequenceStream:  # fmt: skip
    """Rank `rank`'s part of a carry pass over `sequences`: an equal share of them (cut by
    count, not by row group, so that every rank's pass ends at about the same step)."""
    mine = sequences[_cut(len(sequences), world, rank)]
    return SequenceStream(
        cache, stream=rank, streams=world, seed=seed, shuffle_buffer=shuffle_buffer,
        keep=mine, read_ahead=read_ahead, allow_empty=True, whole=True,
    )  # fmt: skip
