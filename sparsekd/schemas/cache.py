"""`open_cache`: the Python API for reading a sparsekd cache.

    from sparsekd import open_cache
    cache = open_cache("cache/")
    cache.meta["mode"], cache.meta["k"], cache.meta["seq_len"]
    for seq in cache:                        # manifest order
        seq.seq_id, seq.input_ids            # int, np.int32 [L]
        seq.labels                           # np.int32 [L]: the token each position predicts
        seq.token_logprobs                   # np.float32 [L]: teacher log p(labels[p])
        offsets, ids, probs = seq.targets()  # position p: ids[offsets[p]:offsets[p+1]]

Only shards listed in `manifest.json` are read; the manifest is the source of truth.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparsekd.schemas import format as F
from sparsekd.schemas.manifest import (
    MANIFEST,
    CacheError,
    read_json,
    read_worker_records,
)


@dataclass
class Sequence:
    """One packed sequence of a cache with its teacher targets (numpy arrays)."""

    seq_id: int
    input_ids: np.ndarray  # int32 [L]
    next_token: int
    token_logprobs: np.ndarray  # float32 [L]
    support_size: np.ndarray  # int64 [L]
    ids: np.ndarray  # int32 [sum(support_size)], sorted within each position
    values: dict  # value column -> [sum(support_size)] array (see schemas.format)
    mode: str
    samples: int | None = None  # N, for mode sample

    @property
    def labels(self) -> np.ndarray:
        """int32 [L]: labels[p] is the token position p predicts."""
        return np.append(self.input_ids[1:], np.int32(self.next_token)).astype(np.int32)

    def targets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(offsets int64 [L+1], ids int32 [n], probs float32 [n])`.

        Position p's support is `ids[offsets[p]:offsets[p+1]]` with teacher probability
        estimates `probs[...]`: top-K, exp of the stored log-probs (summing to <= 1); sample,
        count / N, times p / r when drawn at a proposal temperature (unbiased for p);
        logprob, empty.
        """
        offsets = np.zeros(len(self.support_size) + 1, dtype=np.int64)
        np.cumsum(self.support_size, out=offsets[1:])
        if self.mode == "topk":
            probs = np.exp(F.dequantize_logprobs(self.values[F.COL_LOGPROBS]))
        elif self.mode == "sample":
            probs = self.values[F.COL_COUNTS].astype(np.float32) / np.float32(self.samples)
            if F.COL_WEIGHTS in self.values:
                probs = probs * self.values[F.COL_WEIGHTS]
        else:
            probs = np.zeros(0, dtype=np.float32)
        return offsets, self.ids, probs.astype(np.float32)


class Cache:
    """A finished cache: its manifest, metadata and shards."""

    def __init__(self, path: str | os.PathLike, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.meta: dict = manifest["meta"]
        self.shards: list[dict] = manifest["shards"]

    def __len__(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    def shard_path(self, entry: dict) -> Path:
        return self.path / entry["file"]

    def iter_shard(self, entry: dict, row_groups: list[int] | None = None) -> Iterator[Sequence]:
        path = self.shard_path(entry)
        try:
            pf = pq.ParquetFile(path)
            groups = range(pf.num_row_groups) if row_groups is None else row_groups
            for g in groups:
                yield from self._rows(pf.read_row_group(g))
        except FileNotFoundError as e:
            raise CacheError(f"shard {path} listed in the manifest is missing") from e
        except (OSError, pa.ArrowException) as e:  # truncated/corrupt: ArrowInvalid, IOError
            raise CacheError(
                f"shard {path} cannot be read ({e}); run `sparsekd inspect {self.path} --verify`"
            ) from e

    def _rows(self, table) -> Iterator[Sequence]:
        mode = self.meta["mode"]
        cols = {name: table.column(name).combine_chunks() for name in table.column_names}

        def lists(name):
            arr = cols[name]
            return arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=False)

        in_off, in_val = lists(F.COL_INPUT_IDS)
        tl_off, tl_val = lists(F.COL_TOKEN_LOGPROB)
        ss_off, ss_val = lists(F.COL_SUPPORT_SIZE)
        id_off, id_val = lists(F.COL_IDS)
        value_cols = {c: lists(c) for c in F.value_columns(mode, self.meta.get("weighted", False))}
        seq_ids = cols[F.COL_SEQ_ID].to_numpy()
        nxt = cols[F.COL_NEXT_TOKEN].to_numpy()
        for r in range(table.num_rows):
            yield Sequence(
                seq_id=int(seq_ids[r]),
                input_ids=in_val[in_off[r] : in_off[r + 1]],
                next_token=int(nxt[r]),
                token_logprobs=F.dequantize_logprobs(tl_val[tl_off[r] : tl_off[r + 1]]),
                support_size=ss_val[ss_off[r] : ss_off[r + 1]].astype(np.int64),
                ids=id_val[id_off[r] : id_off[r + 1]],
                values={c: v[o[r] : o[r + 1]] for c, (o, v) in value_cols.items()},
                mode=mode,
                samples=self.meta.get("samples"),
            )

    def __iter__(self) -> Iterator[Sequence]:
        for entry in self.shards:
            yield from self.iter_shard(entry)


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a finished cache. Raises CacheError naming the problem."""
    p = Path(path)
    if not p.is_dir():
        raise CacheError(f"cache directory not found: {p}")
    if not (p / MANIFEST).exists():
        records = read_worker_records(p)
        if records:
            done = sum(len(r.get("shards", [])) for r in records)
            raise CacheError(
                f"cache {p} is not complete: {done} shards finished by {len(records)} worker(s) "
                "and no manifest.json yet; run the remaining build-cache workers"
            )
        raise CacheError(f"{p} is not a sparsekd cache (no {MANIFEST})")
    manifest = read_json(p / MANIFEST, "manifest")
    if manifest.get("format") != F.FORMAT_NAME:
        raise CacheError(f"{p / MANIFEST} is not a sparsekd manifest")
    if manifest.get("schema_version") != F.SCHEMA_VERSION:
        raise CacheError(
            f"cache {p} has schema version {manifest.get('schema_version')}; this sparsekd "
            f"reads version {F.SCHEMA_VERSION}"
        )
    for key in ("meta", "shards", "num_sequences", "num_tokens"):
        if key not in manifest:
            raise CacheError(f"{p / MANIFEST} lacks {key!r}")
    return Cache(p, manifest)


def check_same_sequences(a: Cache, b: Cache, what: str = "the two caches") -> None:
    """Refuse two caches whose tokenizer, corpus or packing differ: only then does a seq_id
    name the same tokens in both."""
    for key, name in (
        ("tokenizer_hash", "tokenizer"),
        ("corpus_hash", "corpus (inputs, text field or --max-sequences)"),
        ("seq_len", "packing (seq_len)"),
    ):
        if a.meta.get(key) != b.meta.get(key):
            va, vb = str(a.meta.get(key))[:16], str(b.meta.get(key))[:16]
            raise CacheError(f"{what} differ in {name}: {va} in {a.path}, {vb} in {b.path}")


def shard_metadata(path: str | os.PathLike) -> dict:
    """The sparsekd metadata stored in one shard's Parquet footer."""
    md = pq.read_schema(path).metadata or {}
    if F.META_KEY not in md:
        raise CacheError(f"{path} has no sparsekd metadata")
    return json.loads(md[F.META_KEY])
