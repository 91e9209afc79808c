"""The shard format: column names, Arrow schema, layout, sequence ids, checksums, quantisation.

Both sides of sparsekd (the cache builder that writes shards and every reader) import
their column names, encodings and paths from here (and the modes from `modes.py`); nothing
else defines them. `docs/format.md` documents the same for people and for foreign readers
(DuckDB, Polars, datasets).

One Parquet row is one packed sequence of `L = seq_len` tokens; n = sum(loss_mask) is the
number of its learnt positions:

    seq_id          int64          (domain << 32) | index of the sequence in its domain
    input_ids       list<int32>[L] the tokens the teacher saw
    next_token      int32          the token after the last one
    loss_mask       list<bool>[L]  does the student learn the target of position p? (v3)
    doc_starts      list<int32>    where each document of the row begins: 0 first, ascending,
                                   below L (v4); a row read as one sequence has [0]
    token_logprob   list<uint16>[n] q(-log p(target)) at each learnt position, in order
    support_size    list<uint16>[n] ids stored for each learnt position (CSR counts)
    ids             list<int32>    concatenated sorted ids of every learnt position
    (value columns of the mode, aligned with `ids`: modes.py)

**Position p predicts token p+1** (`labels_of`): its target is input_ids[p + 1] for
p < L - 1 and `next_token` for p = L - 1. The teacher reads every position (the prompt of
a conversation is context); the targets and token log-probs are stored only where the
student learns. Mode logprob stores no support (support_size all 0, ids empty).

**Documents.** A row holds one or more documents (text documents, conversations, prompt +
answer pieces, a run of padding). Position p belongs to the document holding token p; the
teacher computed its target from that document's tokens up to p alone, and the student must
see the same (`doc_starts`, `position_ids_of`): position ids restart at each document and
attention does not cross them. A cache whose identity says `attention: row` (every cache
before version 4) read each row as one sequence: its rows have one document.

Schema version 2 (before the loss mask) has no `loss_mask` column and one token_logprob
and support_size per position: every position learnt. Version 3 has no `doc_starts`.
Readers take all three.

Layout: shard (domain d, part j) is `shards/{d // 1000:05d}/{d:08d}-{j:05d}.parquet`, so no
directory holds more than about a thousand domains' shards; `SHARD_GLOB` matches every
shard and nothing else.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa

# 2: seq_id = (domain << 32) | index, shards/ layout, row-group checksums
# 3: the loss mask; targets and token log-probs only at learnt positions
# 4: document boundaries in a row (`doc_starts`) and the cache's `attention`
SCHEMA_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)
FORMAT_NAME = "sparsekd-cache"

SAMPLERS = ("iid", "systematic")  # mode sample: how the N draws are placed (teacher_head.py)
# What a position's target was conditioned on: its own document's tokens (document), or every
# token of the row before it (row: one sequence per row; every cache before version 4).
ATTENTIONS = ("document", "row")

# Log-probs are stored as unsigned fixed point: q = round(-logprob * LOGPROB_SCALE), clamped
# to the uint16 range. The absolute error in log p is at most 0.5 / LOGPROB_SCALE
# (4.9e-4 nats, i.e. 0.05 % relative error in p); log-probs below -LOGPROB_MAX_Q / SCALE
# clamp to it (p < 1.6e-28, which no loss can tell from zero). Readers take the scale from
# the cache's metadata (`logprob_scale`) and refuse a cache without one.
LOGPROB_SCALE = 1024.0
LOGPROB_MAX_Q = np.iinfo(np.uint16).max

# A sequence id names its packing domain and its place in it, so it is known without
# packing any other domain.
SEQ_ID_DOMAIN_SHIFT = 32
MAX_DOMAIN_SEQUENCES = 1 << SEQ_ID_DOMAIN_SHIFT

# Column names: the only place they are spelled.
COL_SEQ_ID = "seq_id"
COL_INPUT_IDS = "input_ids"
COL_NEXT_TOKEN = "next_token"
COL_LOSS_MASK = "loss_mask"
COL_DOC_STARTS = "doc_starts"
COL_TOKEN_LOGPROB = "token_logprob"
COL_SUPPORT_SIZE = "support_size"
COL_IDS = "ids"
COL_LOGPROBS = "logprobs"
COL_COUNTS = "counts"
COL_WEIGHTS = "weights"
# A refined set (`sparsekd refine`) adds two columns to its teacher cache's rows:
COL_SCORE = "score"  # float32: MiniPLM difference score of the sequence
COL_TEXT = "text"  # string: the decoded input_ids (also a --generate cache's rows)

# Key-value metadata stored in every shard's footer under this key (one JSON document).
META_KEY = b"sparsekd"

# Rows per Parquet row group: the unit that readers stride by (rank, worker) and that a
# checksum covers. Every row group of a shard holds this many rows but the last.
ROW_GROUP_SIZE = 16

SHARDS_DIR = "shards"
SHARD_GLOB = f"{SHARDS_DIR}/*/*.parquet"
DOMAINS_PER_DIR = 1000


def labels_of(input_ids: np.ndarray, next_token: int) -> np.ndarray:
    """int32 [L]: the token each position predicts (position p predicts token p + 1)."""
    return np.append(np.asarray(input_ids)[1:], np.int32(next_token)).astype(np.int32)


ROW_START = np.zeros(1, dtype=np.int32)  # the doc_starts of a row read as one sequence


def attention_of(meta: dict) -> str:
    """A cache's attention (ATTENTIONS): recorded from version 4; every earlier cache was
    built reading each row as one sequence."""
    return meta.get("attention", "row")


def position_ids_of(doc_starts: np.ndarray, L: int) -> np.ndarray:
    """int64 [L]: each position's index within its document (restarting at every start)."""
    starts = np.asarray(doc_starts, dtype=np.int64)
    pos = np.arange(L, dtype=np.int64)
    return pos - starts[np.searchsorted(starts, pos, side="right") - 1]


def doc_spans(doc_starts: np.ndarray, L: int) -> list[tuple[int, int]]:
    """The [start, end) of each document of a row of L positions."""
    bounds = [int(s) for s in doc_starts] + [L]
    return list(zip(bounds[:-1], bounds[1:]))


def row_of(tokens: np.ndarray) -> tuple[np.ndarray, int]:
    """A row of L + 1 tokens -> (input_ids [L], next_token): the last token is only a
    target."""
    return np.asarray(tokens[:-1], dtype=np.int32), int(tokens[-1])


def make_seq_id(domain: int, index) -> np.ndarray | int:
    return (int(domain) << SEQ_ID_DOMAIN_SHIFT) + index


def seq_domain(seq_id) -> np.ndarray | int:
    return seq_id >> SEQ_ID_DOMAIN_SHIFT


def shard_relpath(domain: int, part: int) -> str:
    return f"{SHARDS_DIR}/{domain // DOMAINS_PER_DIR:05d}/{domain:08d}-{part:05d}.parquet"


def quantize_logprobs(lp: np.ndarray, scale: float = LOGPROB_SCALE) -> np.ndarray:
    """float log-probs (<= 0) -> uint16 fixed point (see LOGPROB_SCALE)."""
    q = np.rint(-np.asarray(lp, dtype=np.float64) * scale)
    return np.clip(q, 0, LOGPROB_MAX_Q).astype(np.uint16)


def dequantize_logprobs(q: np.ndarray, scale: float = LOGPROB_SCALE) -> np.ndarray:
    """uint16 fixed point -> float32 log-probs."""
    return np.asarray(q, dtype=np.float32) * np.float32(-1.0 / scale)


_VALUE_TYPES = {COL_LOGPROBS: pa.uint16(), COL_COUNTS: pa.uint16(), COL_WEIGHTS: pa.float32()}


def per_position(version: int) -> tuple[str, ...]:
    """The columns with one entry per position (L long)."""
    if version >= 3:  # (doc_starts, v4, has one entry per document)
        return (COL_INPUT_IDS, COL_LOSS_MASK)
    return (COL_INPUT_IDS, COL_TOKEN_LOGPROB, COL_SUPPORT_SIZE)


def per_learnt(version: int) -> tuple[str, ...]:
    """The columns with one entry per learnt position (sum(loss_mask) long; v2: L)."""
    return (COL_TOKEN_LOGPROB, COL_SUPPORT_SIZE) if version >= 3 else ()


def arrow_schema(
    value_columns: tuple[str, ...],
    refined: bool = False,
    version: int = SCHEMA_VERSION,
    generated: bool = False,
) -> pa.Schema:
    """The Arrow schema of a shard whose mode stores `value_columns` beside `ids`
    (modes.arrow_schema names them from a mode); `refined`: a refined set's shard, with
    `score` and `text` after the cache columns; `generated`: a --generate cache's shard,
    with `text` after them."""
    columns = value_columns
    fields = [
        pa.field(COL_SEQ_ID, pa.int64(), nullable=False),
        pa.field(COL_INPUT_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(COL_NEXT_TOKEN, pa.int32(), nullable=False),
    ]
    if version >= 3:
        fields.append(pa.field(COL_LOSS_MASK, pa.list_(pa.bool_()), nullable=False))
    if version >= 4:
        fields.append(pa.field(COL_DOC_STARTS, pa.list_(pa.int32()), nullable=False))
    fields += [
        pa.field(COL_TOKEN_LOGPROB, pa.list_(pa.uint16()), nullable=False),
        pa.field(COL_SUPPORT_SIZE, pa.list_(pa.uint16()), nullable=False),
        pa.field(COL_IDS, pa.list_(pa.int32()), nullable=False),
    ] + [pa.field(c, pa.list_(_VALUE_TYPES[c]), nullable=False) for c in columns]
    if refined:
        fields += [
            pa.field(COL_SCORE, pa.float32(), nullable=False),
            pa.field(COL_TEXT, pa.string(), nullable=False),
        ]
    elif generated:
        fields.append(pa.field(COL_TEXT, pa.string(), nullable=False))
    return pa.schema(fields)


def column_arrays(table: pa.Table) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
    """Each column as numpy: (list lengths or None, values). Lengths and values are what a
    correct decode of the rows returns, whatever the chunking or slicing of `table`."""
    out = {}
    for name in table.column_names:
        arr = table.column(name).combine_chunks()
        if pa.types.is_list(arr.type):
            off = arr.offsets.to_numpy()
            values = arr.values.slice(int(off[0]), int(off[-1] - off[0]))
            out[name] = (np.diff(off).astype(np.int32), values.to_numpy(zero_copy_only=False))
        elif pa.types.is_string(arr.type):
            out[name] = (None, np.frombuffer("\0".join(arr.to_pylist()).encode(), np.uint8))
        else:
            out[name] = (None, arr.to_numpy(zero_copy_only=False))
    return out


def checksum(columns: dict[str, tuple[np.ndarray | None, np.ndarray]]) -> int:
    """crc32 of every column's lengths and values, in schema order: the checksum of a row
    group's decoded content, stored at write time and compared at every read."""
    crc = 0
    for lengths, values in columns.values():
        if lengths is not None:
            crc = zlib.crc32(np.ascontiguousarray(lengths), crc)
        crc = zlib.crc32(np.ascontiguousarray(values), crc)
    return crc


def row_group_checksums(table: pa.Table) -> list[int]:
    """The checksum of each ROW_GROUP_SIZE-row group of `table`, as the writer groups it."""
    return [
        checksum(column_arrays(table.slice(r0, ROW_GROUP_SIZE)))
        for r0 in range(0, table.num_rows, ROW_GROUP_SIZE)
    ]


# Parquet writer options chosen by measurement (docs/format.md, "Encodings").
# Byte-stream-split puts the (mostly zero) high bytes of ids and quantised log-probs in
# their own streams, which zstd then all but removes: -8 % bytes at K = 8, -10 % at K = 64.
# zstd level 3: within 2 % of level 9's bytes at several times its write throughput
# (benchmarks/bench_zstd_level.py). Page checksums (CRC32 of each page's bytes) are
# written and verified on every read.
ZSTD_LEVEL = 3
PARQUET_OPTIONS = dict(
    compression="zstd",
    compression_level=ZSTD_LEVEL,
    use_dictionary=False,
    write_statistics=False,
    write_page_checksum=True,
    column_encoding={
        f"{COL_IDS}.list.element": "BYTE_STREAM_SPLIT",
        f"{COL_LOGPROBS}.list.element": "BYTE_STREAM_SPLIT",
        f"{COL_TOKEN_LOGPROB}.list.element": "BYTE_STREAM_SPLIT",
        f"{COL_COUNTS}.list.element": "BYTE_STREAM_SPLIT",
        f"{COL_WEIGHTS}.list.element": "BYTE_STREAM_SPLIT",
    },
)
