"""The manifest: which shards make a finished cache, in one small JSON file and one index.

Layout of a cache directory:

    manifest.json                  written last, when every domain's shards exist: format,
                                   schema version, fingerprint, meta, totals, and the
                                   index files with their sha256
    index/shards-<sha>.parquet     one row per shard (domain, part, first_seq, rows,
                                   bytes, sha256): columnar, so 10^6 shards stay a few MB
    index/domains-<sha>.parquet    one row per packing domain (source, sequences, content
                                   hash, documents, bad lines)
    shards/NNNNN/DDDDDDDD-PPPPP.parquet  the shards (schemas.format.shard_relpath)
    records/...                    the builders' records, one small object each
                                   (cache_builder.ledger)
    build_config.json              the build's claim: identity and resolved configuration

The same layout on a local disk and under an object-store prefix (sparsekd.storage).
`manifest.json` is the only thing readers trust; they read it and the shard index, and
open only the shards they read. Index files are named by their content hash, so two
workers finishing at once write the same files, and the manifest each publishes points at
files that exist.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparsekd.errors import CacheError
from sparsekd.schemas import format as F
from sparsekd.schemas.modes import NAMES
from sparsekd.storage import Store, json_bytes

MANIFEST = "manifest.json"
INDEX_DIR = "index"

SHARD_INDEX_SCHEMA_V2 = pa.schema(
    [
        pa.field("domain", pa.int64(), nullable=False),
        pa.field("part", pa.int32(), nullable=False),
        pa.field("first_seq", pa.int64(), nullable=False),
        pa.field("rows", pa.int32(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.binary(32), nullable=False),
    ]
)
# v3: crc32 of each shard's sparsekd footer as written (its place and its row groups'
# checksums), compared when the shard is opened: a shard swapped in from another cache of
# the same fingerprint and size is caught without reading it whole
SHARD_INDEX_SCHEMA = SHARD_INDEX_SCHEMA_V2.append(
    pa.field("footer_crc", pa.uint32(), nullable=False)
)
DOMAIN_INDEX_SCHEMA = pa.schema(
    [
        pa.field("domain", pa.int64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("part", pa.int32(), nullable=False),
        pa.field("sequences", pa.int64(), nullable=False),
        pa.field("content_sha256", pa.string(), nullable=False),
        pa.field("documents", pa.int64(), nullable=False),
        pa.field("bad_lines", pa.int64(), nullable=False),
    ]
)


# --- the shard index ----------------------------------------------------------------------


@dataclass
class ShardIndex:
    """One entry per shard, in cache order, as numpy columns."""

    domain: np.ndarray  # int64
    part: np.ndarray  # int32
    first_seq: np.ndarray  # int64
    rows: np.ndarray  # int32
    bytes: np.ndarray  # int64
    sha256: list[bytes]  # 32 bytes each
    footer_crc: np.ndarray | None = None  # uint32 (schema version 3)

    def __len__(self) -> int:
        return len(self.domain)

    def relpath(self, i: int) -> str:
        return F.shard_relpath(int(self.domain[i]), int(self.part[i]))

    @classmethod
    def from_entries(cls, entries: list[dict]) -> ShardIndex:
        entries = sorted(entries, key=lambda e: (e["domain"], e["part"]))
        col = lambda k, t: np.array([e[k] for e in entries], dtype=t)  # noqa: E731
        return cls(
            col("domain", np.int64),
            col("part", np.int32),
            col("first_seq", np.int64),
            col("rows", np.int32),
            col("bytes", np.int64),
            [bytes.fromhex(e["sha256"]) for e in entries],
            col("footer_crc", np.uint32),
        )

    def table(self) -> pa.Table:
        return pa.table(
            {
                "domain": self.domain,
                "part": self.part,
                "first_seq": self.first_seq,
                "rows": self.rows,
                "bytes": self.bytes,
                "sha256": pa.array(self.sha256, pa.binary(32)),
                "footer_crc": self.footer_crc,
            },
            schema=SHARD_INDEX_SCHEMA,
        )


def _write_index(store: Store, stem: str, table: pa.Table) -> dict:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=False)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    name = f"{INDEX_DIR}/{stem}-{digest[:16]}.parquet"
    store.put_new(name, data)  # named by its content: an existing one holds these bytes
    return {"file": name, "sha256": digest, "rows": table.num_rows}


def _read_index(store: Store, ref: dict, schema: pa.Schema) -> pa.Table:
    where = store.url(ref["file"])
    try:
        data = store.read(ref["file"])
    except FileNotFoundError as e:
        raise CacheError(f"index {where} listed in the manifest is missing") from e
    if hashlib.sha256(data).hexdigest() != ref["sha256"]:
        raise CacheError(f"index {where} does not match its checksum in the manifest")
    # synchronous and single-threaded: pq.read_table would hand the Python-owned bytes to a
    # background scanner thread whose last release of them can race interpreter exit
    table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
    if not table.schema.equals(schema) or table.num_rows != ref["rows"]:
        raise CacheError(f"index {where} does not have the schema or rows the manifest says")
    return table


def read_shard_index(store: Store, ref: dict, version: int = F.SCHEMA_VERSION) -> ShardIndex:
    schema = SHARD_INDEX_SCHEMA if version >= 3 else SHARD_INDEX_SCHEMA_V2
    t = _read_index(store, ref, schema)
    n = lambda k: t.column(k).to_numpy()  # noqa: E731
    return ShardIndex(
        n("domain"),
        n("part"),
        n("first_seq"),
        n("rows"),
        n("bytes"),
        t.column("sha256").to_pylist(),
        n("footer_crc") if version >= 3 else None,
    )


def read_domain_index(store: Store, ref: dict) -> pa.Table:
    return _read_index(store, ref, DOMAIN_INDEX_SCHEMA)


KEPT_SCHEMA = pa.schema([pa.field("seq_id", pa.int64(), nullable=False)])


def read_kept(store: Store, ref: dict) -> np.ndarray:
    return _read_index(store, ref, KEPT_SCHEMA).column(0).to_numpy()


def write_manifest(
    store: Store,
    *,
    meta: dict,
    fingerprint: str,
    shards: ShardIndex,
    tables: dict[str, pa.Table] | None = None,
    extra: dict | None = None,
    version: int = F.SCHEMA_VERSION,
) -> dict:
    """Write the index files (the shard index and `tables`, e.g. domains or a refined
    set's kept ids), then manifest.json; return the manifest."""
    L = int(meta["seq_len"])
    doc = {
        "format": F.FORMAT_NAME,
        "schema_version": version,
        "fingerprint": fingerprint,
        "meta": meta,
        "num_sequences": int(shards.rows.sum()),
        "num_tokens": int(shards.rows.sum()) * L,
        "num_shards": len(shards),
        "bytes": int(shards.bytes.sum()),
        "shard_glob": F.SHARD_GLOB,
        "index": {"shards": _write_index(store, "shards", shards.table())},
        **(extra or {}),
    }
    for name, table in (tables or {}).items():
        doc["index"][name] = _write_index(store, name, table)
    store.put(MANIFEST, json_bytes(doc))
    return doc


# --- checking a manifest read from disk ----------------------------------------------------

_MANIFEST_TYPES = {
    "format": str,
    "schema_version": int,
    "fingerprint": str,
    "meta": dict,
    "num_sequences": int,
    "num_tokens": int,
    "num_shards": int,
    "bytes": int,
    "index": dict,
}
_META_TYPES = {
    "mode": str,
    "seq_len": int,
    "vocab_size": int,
    "tokenizer_hash": str,
    "logprob_scale": float,
    "row_group_size": int,
    "teacher": str,
}


def check_manifest(doc: dict, path: str) -> None:
    """Refuse a manifest that is not one this sparsekd reads, naming what is wrong (`path`:
    where the manifest is, for the messages)."""
    if doc.get("format") != F.FORMAT_NAME:
        raise CacheError(f"{path} is not a sparsekd manifest")
    version = doc.get("schema_version")
    if version not in F.READABLE_VERSIONS:
        hint = "; rebuild it with this sparsekd" if isinstance(version, int) else ""
        cache = path.rsplit("/", 1)[0]
        raise CacheError(
            f"cache {cache} has schema version {version}; this sparsekd reads versions "
            f"{', '.join(map(str, F.READABLE_VERSIONS))}{hint}"
        )
    for key, typ in _MANIFEST_TYPES.items():
        if not isinstance(doc.get(key), typ) or isinstance(doc.get(key), bool):
            raise CacheError(f"{path}: {key!r} is missing or not a {typ.__name__}")
    for key, typ in _META_TYPES.items():
        value = doc["meta"].get(key)
        if not isinstance(value, typ if typ is not float else (int, float)):
            raise CacheError(f"{path}: meta {key!r} is missing or not a {typ.__name__}")
    if doc["meta"]["mode"] not in NAMES:
        raise CacheError(f"{path}: meta mode {doc['meta']['mode']!r} is not one of {NAMES}")
    shards = doc["index"].get("shards")
    if not isinstance(shards, dict) or not {"file", "sha256", "rows"} <= set(shards):
        raise CacheError(f"{path}: the shard index reference is missing or malformed")
