"""`CacheDataset` and `collate`: a sparsekd cache for a plain PyTorch DataLoader.

    ds = CacheDataset("cache/", seed=0)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate)
    for batch in loader:
        ds.observe(batch)             # what was consumed: makes ds.state_dict() exact
        hidden = model.get_decoder()(input_ids=batch["input_ids"],
                                     position_ids=batch["position_ids"],  # documents apart
                                     use_cache=False).last_hidden_state
        loss = sparse_kl_loss(hidden.flatten(0, 1), head.weight,
                              batch["teacher_ids"].flatten(0, 1),
                              batch["teacher_probs"].flatten(0, 1),
                              batch["labels"].flatten(), divergence="fkl",
                              kd_weight=0.9, ce_weight=0.1)

Streams. Each (distributed rank, DataLoader worker) pair reads one stream of the trainer's
reader (`student_train.reader.SequenceStream`): rank r, worker w of W workers reads
stream r * W + w of world * W contiguous parts of the cache, so that under any world size
and any number of workers every sequence is yielded exactly once per pass. One pass (one
`iter`) is one epoch; `set_epoch(e)` picks the epoch's order (seeded by seed and e).

Resume. Each batch carries, per row, its stream and the stream position after it
(`positions`). `observe(batch)` in the training process records the newest position of
every stream and the number of batches seen; `state_dict()` returns them, and a new
`CacheDataset(..., state=...)` (same world size and workers) continues every stream
exactly, each decoding one shuffle window to get there. The batches come out in the same
order too: the DataLoader serves workers round robin, so the resumed workers take the
streams rotated by the number of batches already consumed.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsekd.errors import CacheError
from sparsekd.schemas.cache import Sequence, open_cache
from sparsekd.student_train.reader import SequenceStream
from sparsekd.student_train.reader import collate as collate_batch


def _world() -> tuple[int, int]:
    from sparsekd.student_train.parallel import env_rank_world

    return env_rank_world()


class _Example:
    """One sequence and where its stream stands after it (collated in the worker)."""

    __slots__ = ("seq", "stream", "after")

    def __init__(self, seq: Sequence, stream: int, after: dict):
        self.seq, self.stream, self.after = seq, stream, after


class CacheDataset(torch.utils.data.IterableDataset):
    """The sequences of a cache (with their teacher targets), one epoch per pass."""

    def __init__(
        self,
        path,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 256,
        teacher_cache=None,
        state: dict | None = None,
    ):
        super().__init__()
        self.path, self.teacher_cache = str(path), teacher_cache
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        cache = open_cache(self.path)
        targets = open_cache(teacher_cache) if teacher_cache else cache
        self.meta, self.manifest = targets.meta, targets.manifest
        self.epoch = 0
        self._progress: dict[int, list[int]] = {}  # stream -> [epoch, window, offset]
        self._batches = 0
        self._layout: tuple[int, int] | None = None  # (world, workers) the state belongs to
        if state is not None:
            self.load_state_dict(state)

    def _open(self):
        cache = open_cache(self.teacher_cache or self.path)
        keep = open_cache(self.path).kept_seq_ids() if self.teacher_cache else None
        return cache, keep

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._progress = {s: p for s, p in self._progress.items() if p[0] >= epoch}

    def __iter__(self):
        rank, world = _world()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self._layout is not None and self._layout != (world, workers):
            raise CacheError(
                f"this dataset state was saved with {self._layout[0]} ranks x "
                f"{self._layout[1]} workers, not {world} x {workers}"
            )
        stream = rank * workers + (worker + self._batches) % workers
        cache, keep = self._open()
        st = SequenceStream(
            cache,
            stream=stream,
            streams=world * workers,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            shuffle=self.shuffle,
            keep=keep,
        )
        pos = self._progress.get(stream, [self.epoch, 0, 0])
        start = dict(zip(("epoch", "window", "offset"), pos))
        for seq, after in st.iterate(start, epochs=self.epoch + 1):
            yield _Example(seq, stream, after)

    def observe(self, batch: dict) -> None:
        """Record that the training process consumed `batch` (call once per batch)."""
        rank, world = _world()
        info_workers = int(batch["positions"][0, 4])
        self._layout = (world, info_workers)
        for row in batch["positions"].tolist():
            stream, epoch, window, offset = row[:4]
            self._progress[stream] = max(
                self._progress.get(stream, [-1, 0, 0]), [epoch, window, offset]
            )
        self._batches += 1

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "batches": self._batches,
            "layout": list(self._layout) if self._layout else None,
            "streams": {str(s): p for s, p in sorted(self._progress.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise CacheError(
                f"this dataset state was saved with seed {state['seed']}, not {self.seed}"
            )
        self.epoch = state["epoch"]
        self._batches = state["batches"]
        self._layout = tuple(state["layout"]) if state["layout"] else None
        self._progress = {int(s): list(p) for s, p in state["streams"].items()}


def collate(examples: list) -> dict:
    """Examples -> dict of tensors: `input_ids` [B, L], `position_ids` [B, L] (each
    position's index in its document: pass them to the model, with no attention mask, and
    transformers keeps the documents of a row apart as the teacher read them),
    `labels` [B, L] (the token each
    position predicts: already shifted, the last one is the sequence's next token; -100
    where the student learns nothing, as transformers and TRL expect),
    `teacher_ids` [B, L, S] (-1 padded) and `teacher_probs` [B, L, S] (0 padded), ready for
    `sparse_kl_loss` once flattened to rows; `teacher_label_logprob` [B, L] (the teacher's
    log-prob of each label, 0 where not learnt); `seq_id` [B]; `positions` [B, 5] (stream,
    epoch, window, offset after the row, workers) for `CacheDataset.observe`."""
    b = collate_batch([e.seq for e in examples])
    info = torch.utils.data.get_worker_info()
    workers = info.num_workers if info is not None else 1
    positions = np.array(
        [
            [e.stream, e.after["epoch"], e.after["window"], e.after["offset"], workers]
            for e in examples
        ],
        dtype=np.int64,
    )
    return {**b.tensors(), "positions": torch.from_numpy(positions)}
