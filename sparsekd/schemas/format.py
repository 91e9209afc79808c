"""The shard format: column names, Arrow schema, metadata keys, log-prob quantisation.

Both sides of sparsekd (the cache builder that writes shards and every reader) import
their column names and encodings from here; nothing else defines them. `docs/format.md`
documents the same thing for people and for foreign readers (DuckDB, Polars, datasets).

One Parquet row is one packed sequence of `L = seq_len` tokens:

    seq_id          int64          position of the sequence in the packed corpus stream
    input_ids       list<int32>[L] the tokens the teacher saw
    next_token      int32          the token after the last one (stream[(seq_id+1)*L])
    token_logprob   list<uint16>[L] q(-log p(actual next token)), see LOGPROB_SCALE
    support_size    list<uint16>[L] ids stored for each position (CSR counts)
    ids             list<int32>    concatenated sorted ids of every position
    logprobs        list<uint16>   topk: q(-log p(id)) aligned with `ids`
    counts          list<uint16>   sample: how many of the N draws gave each id
    weights         list<float32>  sample with proposal temperature != 1: p(id) / r(id)

Mode logprob stores no support (support_size all 0, ids empty) and neither value column.

Position p (0 <= p < L) holds the teacher's distribution over the token that follows
input_ids[p], i.e. input_ids[p + 1] for p < L - 1 and `next_token` for p = L - 1.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
FORMAT_NAME = "sparsekd-cache"

MODES = ("topk", "sample", "logprob")

# Log-probs are stored as unsigned fixed point: q = round(-logprob * LOGPROB_SCALE), clamped
# to the uint16 range. The absolute error in log p is at most 0.5 / LOGPROB_SCALE
# (4.9e-4 nats, i.e. 0.05 % relative error in p); log-probs below LOGPROB_MIN clamp to it
# (p < 1.6e-28, which no loss can tell from zero). Measured against float16 and float32
# in docs/format.md.
LOGPROB_SCALE = 1024.0
LOGPROB_MAX_Q = np.iinfo(np.uint16).max
LOGPROB_MIN = -LOGPROB_MAX_Q / LOGPROB_SCALE

# Column names: the only place they are spelled.
COL_SEQ_ID = "seq_id"
COL_INPUT_IDS = "input_ids"
COL_NEXT_TOKEN = "next_token"
COL_TOKEN_LOGPROB = "token_logprob"
COL_SUPPORT_SIZE = "support_size"
COL_IDS = "ids"
COL_LOGPROBS = "logprobs"
COL_COUNTS = "counts"
COL_WEIGHTS = "weights"
# A refined set (`sparsekd refine`) adds two columns to its teacher cache's rows:
COL_SCORE = "score"  # float32: MiniPLM difference score of the sequence
COL_TEXT = "text"  # string: the decoded input_ids

# Key-value metadata stored in every shard under this key (one JSON document).
META_KEY = b"sparsekd"

# Rows per Parquet row group: the unit that training readers stride by (rank, worker).
ROW_GROUP_SIZE = 16


def quantize_logprobs(lp: np.ndarray) -> np.ndarray:
    """float log-probs (<= 0) -> uint16 fixed point (see LOGPROB_SCALE)."""
    q = np.rint(-np.asarray(lp, dtype=np.float64) * LOGPROB_SCALE)
    return np.clip(q, 0, LOGPROB_MAX_Q).astype(np.uint16)


def dequantize_logprobs(q: np.ndarray) -> np.ndarray:
    """uint16 fixed point -> float32 log-probs."""
    return (np.asarray(q, dtype=np.float32) * np.float32(-1.0 / LOGPROB_SCALE)).astype(np.float32)


def value_columns(mode: str, weighted: bool = False) -> tuple[str, ...]:
    """The per-id value columns of a mode, aligned with `ids`."""
    return {
        "topk": (COL_LOGPROBS,),
        "sample": (COL_COUNTS,) + ((COL_WEIGHTS,) if weighted else ()),
        "logprob": (),
    }[mode]


_VALUE_TYPES = {COL_LOGPROBS: pa.uint16(), COL_COUNTS: pa.uint16(), COL_WEIGHTS: pa.float32()}


def arrow_schema(mode: str, weighted: bool = False, refined: bool = False) -> pa.Schema:
    """The Arrow schema of a shard of the given mode (`weighted`: sample with tau != 1;
    `refined`: a refined set's shard, with `score` and `text` after the cache columns)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fields = [
        pa.field(COL_SEQ_ID, pa.int64(), nullable=False),
        pa.field(COL_INPUT_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(COL_NEXT_TOKEN, pa.int32(), nullable=False),
        pa.field(COL_TOKEN_LOGPROB, pa.list_(pa.uint16()), nullable=False),
        pa.field(COL_SUPPORT_SIZE, pa.list_(pa.uint16()), nullable=False),
        pa.field(COL_IDS, pa.list_(pa.int32()), nullable=False),
    ] + [
        pa.field(c, pa.list_(_VALUE_TYPES[c]), nullable=False)
        for c in value_columns(mode, weighted)
    ]
    if refined:
        fields += [
            pa.field(COL_SCORE, pa.float32(), nullable=False),
            pa.field(COL_TEXT, pa.string(), nullable=False),
        ]
    return pa.schema(fields)


# Parquet writer options chosen by measurement (docs/format.md, "Encodings").
# Byte-stream-split puts the (mostly zero) high bytes of ids and quantised log-probs in
# their own streams, which zstd then all but removes: -8 % bytes at K = 8, -10 % at K = 64.
PARQUET_OPTIONS = dict(
    compression="zstd",
    compression_level=9,
    use_dictionary=False,
    write_statistics=False,
    column_encoding={
        f"{COL_IDS}.list.element": "BYTE_STREAM_SPLIT",
        f"{COL_LOGPROBS}.list.element": "BYTE_STREAM_SPLIT",
        f"{COL_TOKEN_LOGPROB}.list.element": "BYTE_STREAM_SPLIT",
        f"{COL_COUNTS}.list.element": "BYTE_STREAM_SPLIT",
        f"{COL_WEIGHTS}.list.element": "BYTE_STREAM_SPLIT",
    },
)
