"""Shard writer: teacher output for one work unit -> one zstd Parquet file, atomically.

Encodings (chosen by measurement, see docs/format.md): ids as int32 sorted within a
position, log-probs as uint16 fixed point, zstd level 9, no dictionary pages. The file is
written to `.shard-NNNNN.parquet.tmp-PID` beside its final name and renamed only once
complete, so a killed job never leaves a half-written file under a shard's name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparsekd.schemas import format as F
from sparsekd.schemas.manifest import sha256_file, shard_name


def _list_array(values: np.ndarray, lengths: list[int], typ: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ))


def encode_topk_table(
    mode: str,
    seq_ids: list[int],
    input_ids: list[np.ndarray],
    next_tokens: list[int],
    topk_ids: list[np.ndarray],
    topk_logprobs: list[np.ndarray],
    token_logprobs: list[np.ndarray],
) -> pa.Table:
    """Rows of a top-K shard. Per sequence: ids/logprobs [L, K], token_logprobs [L]."""
    L = len(input_ids[0])
    K = topk_ids[0].shape[1]
    n = len(seq_ids)
    cols = {
        F.COL_SEQ_ID: pa.array(seq_ids, type=pa.int64()),
        F.COL_INPUT_IDS: _list_array(np.concatenate(input_ids), [L] * n, pa.int32()),
        F.COL_NEXT_TOKEN: pa.array(next_tokens, type=pa.int32()),
        F.COL_TOKEN_LOGPROB: _list_array(
            F.quantize_logprobs(np.concatenate(token_logprobs)), [L] * n, pa.uint16()
        ),
        F.COL_SUPPORT_SIZE: _list_array(np.full(n * L, K, dtype=np.uint16), [L] * n, pa.uint16()),
        F.COL_IDS: _list_array(
            np.concatenate([a.reshape(-1) for a in topk_ids]), [L * K] * n, pa.int32()
        ),
        F.COL_LOGPROBS: _list_array(
            F.quantize_logprobs(np.concatenate([a.reshape(-1) for a in topk_logprobs])),
            [L * K] * n,
            pa.uint16(),
        ),
    }
    return pa.Table.from_pydict(cols, schema=F.arrow_schema(mode))


def write_shard(cache_dir: str | os.PathLike, unit: int, table: pa.Table, meta: dict) -> dict:
    """Write `table` as the shard of `unit`; return its manifest entry."""
    final = Path(cache_dir) / shard_name(unit)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    seq_ids = table.column(F.COL_SEQ_ID).to_numpy()
    L = int(meta["seq_len"])
    meta = {**meta, "unit": unit, "first_seq": int(seq_ids[0]), "rows": table.num_rows}
    table = table.replace_schema_metadata({F.META_KEY: json.dumps(meta, sort_keys=True)})
    try:
        pq.write_table(table, tmp, row_group_size=F.ROW_GROUP_SIZE, **F.PARQUET_OPTIONS)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return {
        "file": final.name,
        "unit": unit,
        "first_seq": int(seq_ids[0]),
        "rows": table.num_rows,
        "tokens": table.num_rows * L,
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final),
    }
