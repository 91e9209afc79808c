"""Shard writer: a unit's teacher view -> one zstd Parquet shard, atomically, beside the teacher.

`ShardWriter` runs encoding, compression, checksums, the write, its fsync and the record
in a background thread fed by a bounded queue: the teacher computes the next unit while
the previous one is written, so a build takes about max(teacher, writer) rather than their
sum, and at most `queue_depth` units wait in memory. An error in the thread is raised in
the caller at its next `put` or at `close`.

A shard is built in memory and published whole under its final name by the store
(sparsekd.storage: on a local disk through this process's private staging folder, fsync
and rename; on an object store one PUT or a multipart upload), so a killed job never
leaves a half-written file under a shard's name, and two writers of the same unit (the
same worker index on two hosts) never touch each other's temporary files. Its footer
holds the cache metadata, its own place (domain, part, first_seq, rows) and the content
checksum of each row group.
"""

from __future__ import annotations

import hashlib
import io
import json
import queue
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparsekd.config import check, setting
from sparsekd.schemas import format as F
from sparsekd.schemas.modes import Support, arrow_schema, get_mode
from sparsekd.storage import Store

DEFAULT_SHARD_TOKENS = 4_194_304  # ~100-150 MB shards at 25-36 bytes/token (docs/scale.md)


@dataclass(frozen=True, kw_only=True)
class WriterConfig:
    out: str = setting(
        doc="Cache folder: a path or a URI (s3://bucket/prefix, gs://...); created, and an "
        "existing cache of this configuration is resumed.",
        flag="--out",
    )
    shard_sequences: int | None = setting(
        None,
        f"Sequences per shard (work unit). Default: {DEFAULT_SHARD_TOKENS} tokens / --seq-len "
        "(tens to hundreds of MB per shard).",
        flag=True,
    )
    num_workers: int | None = setting(
        None,
        "Workers sharing this cache. Default: from SLURM_ARRAY_TASK_COUNT, WORLD_SIZE, or 1.",
        flag=True,
    )
    worker_index: int | None = setting(
        None,
        "This worker's index in 0..num-workers-1. Default: from SLURM_ARRAY_TASK_ID, "
        "JOB_COMPLETION_INDEX (Kubernetes), RANK, or 0.",
        flag=True,
    )
    queue_depth: int = setting(
        2, "Units waiting for the writer thread (0: write in the teacher's thread, serially)."
    )

    def __post_init__(self):
        check(
            self.shard_sequences is None or self.shard_sequences >= 1,
            "writer.shard_sequences must be >= 1",
        )
        check(
            self.num_workers is None or self.num_workers >= 1,
            f"writer.num_workers must be >= 1, got {self.num_workers}",
        )
        if self.num_workers is not None and self.worker_index is not None:
            check(
                0 <= self.worker_index < self.num_workers,
                f"writer.worker_index must be in 0..{self.num_workers - 1}, "
                f"got {self.worker_index}",
            )
        check(self.queue_depth >= 0, "writer.queue_depth must be >= 0")

    def sequences_per_shard(self, seq_len: int) -> int:
        return self.shard_sequences or max(1, DEFAULT_SHARD_TOKENS // seq_len)


def _list_array(values: np.ndarray, lengths, typ: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ))


def encode_table(
    mode: str,
    seq_ids,
    input_ids: list[np.ndarray],
    next_tokens: list[int],
    loss_masks: list[np.ndarray],
    token_logprobs: list[np.ndarray],
    supports: list[Support],
    doc_starts: list[np.ndarray] | None = None,
    weighted: bool = False,
    texts: list[str] | None = None,
) -> pa.Table:
    """Rows of a shard: per sequence its tokens [L], loss mask [L], where its documents
    begin (`doc_starts`; None: each row one document), and at its learnt positions only
    the token log-probs and the sparse support (and, for a generated cache, each row's
    text)."""
    L = len(input_ids[0])
    n = len(seq_ids)
    learnt = [int(m.sum()) for m in loss_masks]
    per_row = [len(s.ids) for s in supports]
    starts = doc_starts if doc_starts is not None else [np.zeros(1, np.int32)] * n
    cols = {
        F.COL_SEQ_ID: pa.array(np.asarray(seq_ids, dtype=np.int64)),
        F.COL_INPUT_IDS: _list_array(np.concatenate(input_ids), [L] * n, pa.int32()),
        F.COL_NEXT_TOKEN: pa.array(next_tokens, type=pa.int32()),
        F.COL_LOSS_MASK: _list_array(np.concatenate(loss_masks), [L] * n, pa.bool_()),
        F.COL_DOC_STARTS: _list_array(np.concatenate(starts), [len(x) for x in starts], pa.int32()),
        F.COL_TOKEN_LOGPROB: _list_array(
            F.quantize_logprobs(np.concatenate(token_logprobs)), learnt, pa.uint16()
        ),
        F.COL_SUPPORT_SIZE: _list_array(
            np.concatenate([s.support_size for s in supports]).astype(np.uint16),
            learnt,
            pa.uint16(),
        ),
        F.COL_IDS: _list_array(
            np.concatenate([s.ids for s in supports]).astype(np.int32), per_row, pa.int32()
        ),
    }
    schema = arrow_schema(mode, weighted, generated=texts is not None)
    for col in get_mode(mode).columns(weighted):
        typ = schema.field(col).type.value_type
        cols[col] = _list_array(np.concatenate([s.values[col] for s in supports]), per_row, typ)
    if texts is not None:
        cols[F.COL_TEXT] = pa.array(texts, pa.string())
    return pa.Table.from_pydict(cols, schema=schema)


def shard_bytes(table: pa.Table, meta: dict) -> tuple[bytes, int]:
    """The shard file's bytes (`meta` plus the row-group checksums in its footer), and the
    crc32 of that footer metadata (recorded in the index, compared at every open)."""
    meta = {**meta, "checksums": F.row_group_checksums(table)}
    footer = json.dumps(meta, sort_keys=True)
    table = table.replace_schema_metadata({F.META_KEY: footer})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=F.ROW_GROUP_SIZE, **F.PARQUET_OPTIONS)
    return buf.getvalue(), zlib.crc32(footer.encode())


def write_shard(store: Store, domain: int, part: int, table: pa.Table, meta: dict) -> dict:
    """Publish `table` as shard (domain, part) of the cache in `store`; return its record
    entry."""
    seq_ids = table.column(F.COL_SEQ_ID).to_numpy()
    place = {"domain": domain, "part": part, "first_seq": int(seq_ids[0]), "rows": table.num_rows}
    data, footer_crc = shard_bytes(table, {**meta, **place})
    relpath = F.shard_relpath(domain, part)
    store.put(relpath, data)
    return {
        **place,
        "file": relpath,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "footer_crc": footer_crc,
    }


class ShardWriter:
    """The background writer: `put(job)` hands a job (a callable returning nothing) to the
    writer thread, blocking while `depth` jobs wait; `close()` drains the queue. Depth 0
    runs each job in the caller, serially (the baseline of benchmarks/bench_scale.py)."""

    def __init__(self, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._error: BaseException | None = None
        self.busy_s = 0.0  # time spent working (encode, compress, write, record)
        self.serial = depth == 0
        self._thread = threading.Thread(target=self._loop, name="sparsekd-writer", daemon=True)
        if not self.serial:
            self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:  # after a failure, drain without working
                t0 = time.perf_counter()
                try:
                    job()
                except BaseException as e:
                    self._error = e
                self.busy_s += time.perf_counter() - t0

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, job) -> None:
        self._raise()
        if self.serial:
            t0 = time.perf_counter()
            job()
            self.busy_s += time.perf_counter() - t0
        else:
            self._queue.put(job)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif self._thread.is_alive():  # let the queued work finish; the caller's error wins
            self._queue.put(None)
            self._thread.join()
