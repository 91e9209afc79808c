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

from sparsekd.cache_builder.encode import Support
from sparsekd.schemas import format as F
from sparsekd.schemas.manifest import sha256_file, shard_name


def _list_array(values: np.ndarray, lengths: list[int], typ: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=typ))


def encode_table(
    mode: str,
    seq_ids: list[int],
    input_ids: list[np.ndarray],
    next_tokens: list[int],
    token_logprobs: list[np.ndarray],
    supports: list[Support],
    weighted: bool = False,
) -> pa.Table:
    """Rows of a shard: per sequence its tokens, token log-probs [L] and sparse support."""
    L = len(input_ids[0])
    n = len(seq_ids)
    per_row = [len(s.ids) for s in supports]
    cols = {
        F.COL_SEQ_ID: pa.array(seq_ids, type=pa.int64()),
        F.COL_INPUT_IDS: _list_array(np.concatenate(input_ids), [L] * n, pa.int32()),
        F.COL_NEXT_TOKEN: pa.array(next_tokens, type=pa.int32()),
        F.COL_TOKEN_LOGPROB: _list_array(
            F.quantize_logprobs(np.concatenate(token_logprobs)), [L] * n, pa.uint16()
        ),
        F.COL_SUPPORT_SIZE: _list_array(
            np.concatenate([s.support_size for s in supports]).astype(np.uint16),
            [L] * n,
            pa.uint16(),
        ),
        F.COL_IDS: _list_array(
            np.concatenate([s.ids for s in supports]).astype(np.int32), per_row, pa.int32()
        ),
    }
    schema = F.arrow_schema(mode, weighted)
    for col in F.value_columns(mode, weighted):
        typ = schema.field(col).type.value_type
        cols[col] = _list_array(np.concatenate([s.values[col] for s in supports]), per_row, typ)
    return pa.Table.from_pydict(cols, schema=schema)


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
