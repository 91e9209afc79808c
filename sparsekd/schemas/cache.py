"""`open_cache`: the Python API for reading a sparsekd cache, with every read checked.

    from sparsekd import open_cache
    cache = open_cache("cache/")
    cache.meta["mode"], cache.meta["k"], cache.meta["seq_len"]
    for seq in cache:                        # cache order (domain, part, row)
        seq.seq_id, seq.input_ids            # int, np.int32 [L]
        seq.labels                           # np.int32 [L]: the token each position predicts
        seq.token_logprobs                   # np.float32 [L]: teacher log p(labels[p])
        offsets, ids, probs = seq.targets()  # position p: ids[offsets[p]:offsets[p+1]]

`open_cache` takes a local path or a URI (s3://bucket/prefix, gs://..., any fsspec URL):
every read goes through the storage seam (sparsekd.storage) and fetches only the bytes
it needs: the manifest and the shard index, each opened shard's footer, and the byte range
of each row group read (one ranged request, its column chunks coalesced). On an object
store `read_groups` keeps `read_ahead` row groups in flight to hide the store's latency.

What every read checks (docs/reliability.md): opening a shard compares its size with the
index and its footer's metadata (fingerprint, domain, part, rows, row-group count) with the
manifest; every page's CRC32 is verified by Parquet; every decoded row group's content
checksum is compared with the one its writer stored; lengths and id ranges are checked.
Any failure is a CacheError naming the shard. `verify_full` adds the file's sha256.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparsekd.errors import CacheError
from sparsekd.schemas import format as F
from sparsekd.schemas.manifest import MANIFEST, ShardIndex, check_manifest, read_shard_index
from sparsekd.schemas.modes import arrow_schema, get_mode
from sparsekd.storage import Store, open_store, parse_json

# Opened shards kept per cache: local files stay open (file handles); from an object store
# only the parsed footer is kept, so more of them (a footer evicted is fetched again).
OPEN_SHARDS = {"local": 16, "remote": 256}
# Row groups in flight while reading from an object store (`read_groups`): at 20 ms per
# request and ~1-2 ms to decode a group, 32 keep two cores busy (benchmarks/bench_storage.py)
DEFAULT_READ_AHEAD = 32
# Footer keys reported first when a shard's metadata disagrees with the manifest.
_FIRST_KEYS = ("fingerprint", "domain", "part", "first_seq", "rows")


def _report_order(key: str):
    return (_FIRST_KEYS.index(key) if key in _FIRST_KEYS else len(_FIRST_KEYS), key)


@dataclass
class Sequence:
    """One packed sequence of a cache with its teacher targets (numpy arrays). Positions
    the student does not learn (`loss_mask` False) hold no target: support 0, token
    log-prob NaN."""

    seq_id: int
    input_ids: np.ndarray  # int32 [L]
    next_token: int
    loss_mask: np.ndarray  # bool [L]: the target of position p is learnt
    token_logprobs: np.ndarray  # float32 [L], NaN where not learnt
    support_size: np.ndarray  # int64 [L], 0 where not learnt
    ids: np.ndarray  # int32 [sum(support_size)], sorted within each position
    values: dict  # value column -> [sum(support_size)] array (see schemas.modes)
    meta: dict  # the cache's metadata (mode, samples, logprob_scale, ...)
    doc_starts: np.ndarray = field(
        default_factory=lambda: F.ROW_START
    )  # int32 [documents]: where each document begins

    @property
    def position_ids(self) -> np.ndarray:
        """int64 [L]: each position's index in its document: what the student's position
        ids must be for it to see what the teacher saw (schemas.format, "Documents")."""
        return F.position_ids_of(self.doc_starts, len(self.input_ids))

    @property
    def mode(self) -> str:
        return self.meta["mode"]

    @property
    def samples(self) -> int | None:
        """N, the draws per position of a sample cache."""
        return self.meta.get("samples")

    @property
    def labels(self) -> np.ndarray:
        """int32 [L]: labels[p] is the token position p predicts."""
        return F.labels_of(self.input_ids, self.next_token)

    def targets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`(offsets int64 [L+1], ids int32 [n], probs float32 [n])`.

        Position p's support is `ids[offsets[p]:offsets[p+1]]` with teacher probability
        estimates `probs[...]` (schemas.modes): top-K, exp of the stored log-probs (summing
        to <= 1); sample, count / N, times p / r when drawn at a proposal temperature
        (unbiased for p); logprob, empty.
        """
        offsets = np.zeros(len(self.support_size) + 1, dtype=np.int64)
        np.cumsum(self.support_size, out=offsets[1:])
        probs = get_mode(self.mode).decode(self.values, self.meta)
        return offsets, self.ids, probs.astype(np.float32)


class ShardFile:
    """One opened, checked shard: its footer (Parquet metadata) and stored row-group
    checksums; on a local disk also the open file (`pf`)."""

    def __init__(self, cache: Cache, i: int):
        name, size = cache.index.relpath(i), int(cache.index.bytes[i])
        self.name = name
        store = cache.store
        try:
            self.file = store.open(name)
        except FileNotFoundError as e:
            raise CacheError(f"shard {name} listed in the manifest is missing") from e
        if self.file.size() != size:
            raise CacheError(
                f"shard {name} has {self.file.size()} bytes, the manifest says {size} "
                "(truncated, or copied from another cache)"
            )
        try:
            pf = pq.ParquetFile(self.file, page_checksum_verification=True)
            footer = pf.schema_arrow.metadata[F.META_KEY]
            meta = json.loads(footer)
        except Exception as e:  # a damaged footer: any decode error is a finding
            raise CacheError(f"shard {name}: unreadable footer ({type(e).__name__})") from e
        crc = cache.index.footer_crc
        if crc is not None and zlib.crc32(footer) != int(crc[i]):
            raise CacheError(
                f"shard {name}: its footer is not the one the index recorded (a shard of "
                "another cache of the same configuration, or a damaged file)"
            )
        self._check_footer(cache, i, pf, meta)
        self.footer, self.schema = meta, pf.schema_arrow  # the sparsekd metadata, as stored
        self.metadata = pf.metadata
        self.pf = pf if store.local else None  # remote: a reader per read, for threads

    def _check_footer(self, cache: Cache, i: int, pf, meta: dict) -> None:
        name = self.name
        place = {
            "domain": int(cache.index.domain[i]),
            "part": int(cache.index.part[i]),
            "first_seq": int(cache.index.first_seq[i]),
            "rows": int(cache.index.rows[i]),
        }
        own = {k: v for k, v in meta.items() if k not in (*place, "checksums")}
        for key in sorted(set(own) | set(cache.meta) | set(place), key=_report_order):
            want = place[key] if key in place else cache.meta.get(key)
            if meta.get(key) != want:
                raise CacheError(
                    f"shard {name}: its {key} is {str(meta.get(key))[:24]!r}, the manifest says "
                    f"{str(want)[:24]!r} (a shard of another cache, or a damaged file)"
                )
        m = cache.meta
        expected = arrow_schema(
            m["mode"],
            cache.weighted,
            refined="refined" in m,
            version=cache.version,
            generated="generate" in m,
        )
        if not pf.schema_arrow.remove_metadata().equals(expected):
            raise CacheError(f"shard {name}: its columns are not the {m['mode']} shard schema")
        self.checksums = meta.get("checksums")
        n_groups = -(-place["rows"] // cache.row_group_size)
        if (
            not isinstance(self.checksums, list)
            or len(self.checksums) != n_groups
            or pf.metadata.num_row_groups != n_groups
            or pf.metadata.num_rows != place["rows"]
        ):
            raise CacheError(f"shard {name}: its row groups do not match its metadata")

    @property
    def num_row_groups(self) -> int:
        return self.metadata.num_row_groups

    def read_row_group(self, g: int) -> pa.Table:
        """Row group g, pages verified. From an object store: one ranged request (the
        group's column chunks are adjacent and pre-buffered together) through a reader of
        its own over the shard's file, whose ranged reads are thread-safe; no footer read."""
        if self.pf is not None:
            return self.pf.read_row_group(g)
        pf = pq.ParquetFile(self.file, metadata=self.metadata, page_checksum_verification=True)
        return pf.read_row_group(g)


class Cache:
    """A finished cache: its manifest, metadata, shard index and checked reads."""

    def __init__(self, store: Store, manifest: dict, index: ShardIndex):
        self.store = store
        self.path = store.uri  # where it is, as given (a path or a URI)
        self.manifest = manifest
        self.meta: dict = manifest["meta"]
        self.index = index
        self.row_group_size = int(self.meta["row_group_size"])
        self.version = int(manifest["schema_version"])
        self.weighted = bool(self.meta.get("weighted", False))
        self.read_ahead = 0 if store.local else DEFAULT_READ_AHEAD
        self._open: OrderedDict[int, ShardFile] = OrderedDict()
        self._opening: dict[int, threading.Event] = {}
        self._capacity = OPEN_SHARDS["local" if store.local else "remote"]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def shard_path(self, i: int) -> str:
        """Where shard i is: a local path or a URI."""
        return self.store.url(self.index.relpath(i))

    def shard(self, i: int) -> ShardFile:
        """Shard i, opened and checked once (the most recently used stay open); threads
        that ask for a shard being opened wait for that opening."""
        with self._lock:
            if i in self._open:
                self._open.move_to_end(i)
                return self._open[i]
            opening = self._opening.get(i)
            if opening is None:
                self._opening[i] = threading.Event()
        if opening is not None:
            opening.wait()
            return self.shard(i)  # opened meanwhile (or raises as the opener did)
        try:
            sf = ShardFile(self, i)
            with self._lock:
                self._open[i] = sf
                while len(self._open) > self._capacity:
                    self._open.popitem(last=False)
            return sf
        finally:
            with self._lock:
                self._opening.pop(i).set()

    def row_groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every row group in cache order: (shard index, group in shard, rows), from the
        index alone (no shard is opened)."""
        G = self.row_group_size
        n = (self.index.rows.astype(np.int64) + G - 1) // G
        shard = np.repeat(np.arange(len(self.index)), n)
        group = np.arange(len(shard)) - np.repeat(np.cumsum(n) - n, n)
        rows = np.minimum(G, np.repeat(self.index.rows, n) - group * G)
        return shard, group, rows

    def read_group_table(self, i: int, g: int) -> tuple[pa.Table, dict]:
        """Row group g of shard i as an Arrow table, and its columns as numpy, checked."""
        sf = self.shard(i)
        try:
            table = sf.read_row_group(g)
        except Exception as e:  # page CRC mismatch, truncated or garbled page
            raise CacheError(
                f"shard {sf.name} row group {g} cannot be read ({type(e).__name__}: "
                f"{str(e)[:80]}); run `sparsekd inspect {self.path} --verify`"
            ) from e
        cols = F.column_arrays(table)
        if F.checksum(cols) != sf.checksums[g]:
            raise CacheError(
                f"shard {sf.name} row group {g}: content checksum mismatch (corrupted); run "
                f"`sparsekd inspect {self.path} --verify`"
            )
        bad = check_group(cols, table.num_rows, self.meta, self.version)
        if bad:
            raise CacheError(f"shard {sf.name} row group {g}: {bad}")
        return table, cols

    def read_group(self, i: int, g: int) -> list[Sequence]:
        """The sequences of row group g of shard i, checked."""
        table, cols = self.read_group_table(i, g)
        return self._sequences(cols, table.num_rows)

    def read_groups(
        self, pairs: Iterable[tuple[int, int]], read_ahead: int | None = None
    ) -> Iterator[list[Sequence]]:
        """`read_group` of each (shard, group) pair, in order, with `read_ahead` (default:
        the cache's, 0 on a local disk) reads in flight on a thread pool."""
        ahead = self.read_ahead if read_ahead is None else read_ahead
        if ahead <= 0:
            for i, g in pairs:
                yield self.read_group(i, g)
            return
        it = iter(pairs)
        pool = ThreadPoolExecutor(ahead, thread_name_prefix="sparsekd-read")
        try:
            pending = deque(
                pool.submit(self.read_group, i, g) for i, g in itertools.islice(it, ahead)
            )
            while pending:
                done = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(self.read_group, *nxt))
                yield done.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def kept_seq_ids(self) -> np.ndarray:
        """A refined set's sequence ids (sorted int64), from its index (no shard opened)."""
        from sparsekd.schemas.manifest import read_kept

        if "refined" not in self.meta:
            raise CacheError(f"{self.path} is not a refined set")
        return read_kept(self.store, self.manifest["index"]["kept"])

    def cut_seq_ids(self) -> np.ndarray:
        """A generated cache's rows that hold an answer cut at max_new_tokens (sorted int64
        seq_ids), from its index (no shard opened)."""
        from sparsekd.schemas.manifest import read_kept

        if "generate" not in self.meta:
            raise CacheError(f"{self.path} is not a generated cache (--generate)")
        return read_kept(self.store, self.manifest["index"]["cut"])

    def _sequences(self, cols: dict, n: int) -> list[Sequence]:
        meta, L = self.meta, int(self.meta["seq_len"])
        input_ids = cols[F.COL_INPUT_IDS][1].reshape(n, L)
        mask = learnt_mask(cols, n, L)
        tlp = np.full((n, L), np.nan, dtype=np.float32)
        tlp[mask] = F.dequantize_logprobs(cols[F.COL_TOKEN_LOGPROB][1], meta["logprob_scale"])
        support = np.zeros((n, L), dtype=np.int64)
        support[mask] = cols[F.COL_SUPPORT_SIZE][1]
        id_off = np.zeros(n + 1, np.int64)
        np.cumsum(cols[F.COL_IDS][0], out=id_off[1:])
        ids = cols[F.COL_IDS][1]
        value_cols = {c: cols[c][1] for c in get_mode(meta["mode"]).columns(self.weighted)}
        seq_ids, nxt = cols[F.COL_SEQ_ID][1], cols[F.COL_NEXT_TOKEN][1]
        starts = [F.ROW_START] * n
        if F.COL_DOC_STARTS in cols:
            lengths, values = cols[F.COL_DOC_STARTS]
            starts = np.split(values, np.cumsum(lengths)[:-1])
        return [
            Sequence(
                seq_id=int(seq_ids[r]),
                input_ids=input_ids[r],
                next_token=int(nxt[r]),
                loss_mask=mask[r],
                token_logprobs=tlp[r],
                support_size=support[r],
                ids=ids[id_off[r] : id_off[r + 1]],
                values={c: v[id_off[r] : id_off[r + 1]] for c, v in value_cols.items()},
                meta=meta,
                doc_starts=starts[r],
            )
            for r in range(n)
        ]

    def iter_shard(self, i: int) -> Iterator[Sequence]:
        groups = range(self.shard(i).num_row_groups)
        for seqs in self.read_groups((i, g) for g in groups):
            yield from seqs

    def __iter__(self) -> Iterator[Sequence]:
        shard, group, _ = self.row_groups()
        for seqs in self.read_groups(zip(shard.tolist(), group.tolist())):
            yield from seqs

    def verify_full(self, i: int) -> str | None:
        """sha256 of shard i against the index: the problem found, or None."""
        name = self.index.relpath(i)
        try:
            digest = self.store.sha256(name)
        except FileNotFoundError:
            return f"{name}: listed in the manifest but missing"
        if digest != self.index.sha256[i].hex():
            return f"{name}: sha256 differs from the manifest's (file changed)"
        return None


def learnt_mask(cols: dict, n: int, L: int) -> np.ndarray:
    """bool [n, L]: the loss mask of a decoded row group (schema v2: every position)."""
    if F.COL_LOSS_MASK in cols:
        return cols[F.COL_LOSS_MASK][1].astype(bool).reshape(n, L)
    return np.ones((n, L), dtype=bool)


def check_group(cols: dict, n: int, meta: dict, version: int) -> str:
    """What is structurally wrong with a decoded row group ("" when nothing): list lengths,
    id ranges, ascending distinct ids per position, and the mode's own checks."""
    L, V = int(meta["seq_len"]), int(meta["vocab_size"])
    mode = get_mode(meta["mode"])
    for c in F.per_position(version):
        if cols[c][0] is None or np.any(cols[c][0] != L):
            return f"{c} rows are not {L} long"
    if F.COL_DOC_STARTS in cols:
        bad = _check_doc_starts(*cols[F.COL_DOC_STARTS], L)
        if bad:
            return bad
    learnt = learnt_mask(cols, n, L).sum(1)
    for c in F.per_learnt(version):
        if not np.array_equal(cols[c][0].astype(np.int64), learnt):
            return f"{c} rows do not hold one entry per learnt position"
    v = cols[F.COL_INPUT_IDS][1]
    if len(v) and (v.min() < 0 or v.max() >= V):
        return f"{F.COL_INPUT_IDS} outside the vocabulary [0, {V})"
    nxt = cols[F.COL_NEXT_TOKEN][1]
    if len(nxt) and (nxt.min() < 0 or nxt.max() >= V):
        return f"next_token outside the vocabulary [0, {V})"
    support = cols[F.COL_SUPPORT_SIZE][1].astype(np.int64)
    rows = np.repeat(np.arange(n), cols[F.COL_SUPPORT_SIZE][0])
    per_row = np.bincount(rows, weights=support, minlength=n).astype(np.int64)
    values = {c: cols[c][1] for c in mode.columns(meta.get("weighted", False))}
    for c in (F.COL_IDS, *values):
        if not np.array_equal(cols[c][0].astype(np.int64), per_row):
            return f"{c} lengths do not match support_size"
    ids = cols[F.COL_IDS][1]
    if len(ids):
        if ids.min() < 0 or ids.max() >= V:
            return f"ids outside the vocabulary [0, {V})"
        starts = np.zeros(len(ids), bool)
        starts[np.cumsum(support)[:-1][support[1:] > 0]] = True
        starts[0] = True
        if np.any((np.diff(ids.astype(np.int64)) <= 0) & ~starts[1:]):
            return "ids are not ascending and distinct within a position"
        return mode.check(starts, values, meta)
    return ""


def _check_doc_starts(lengths: np.ndarray | None, starts: np.ndarray, L: int) -> str:
    """Each row's documents begin at 0, then at ascending positions below L."""
    if lengths is None or np.any(lengths < 1):
        return f"{F.COL_DOC_STARTS} rows are empty (every row begins a document at 0)"
    first = np.zeros(len(starts), bool)
    first[np.cumsum(lengths)[:-1]] = True
    first[0] = True
    s = starts.astype(np.int64)
    if np.any(s[first] != 0) or np.any(s >= L):
        return f"{F.COL_DOC_STARTS} do not begin at 0 or reach past position {L - 1}"
    if np.any((np.diff(s) <= 0) & ~first[1:]):
        return f"{F.COL_DOC_STARTS} are not ascending within a row"
    return ""


def check_totals(manifest: dict, index: ShardIndex, where: str) -> None:
    """The manifest's totals are the shard index's: sequences, tokens, shards, bytes."""
    rows = int(index.rows.sum())
    want = {
        "num_sequences": rows,
        "num_tokens": rows * int(manifest["meta"]["seq_len"]),
        "num_shards": len(index),
        "bytes": int(index.bytes.sum()),
    }
    for key, value in want.items():
        if manifest.get(key) != value:
            raise CacheError(
                f"{where}: its {key} is {manifest.get(key)}, its shard index says {value} "
                "(an edited or damaged manifest)"
            )


def open_cache(path: str | os.PathLike) -> Cache:
    """Open a finished cache (a local path or a URI): its manifest and shard index,
    checked. Raises CacheError (StorageError when the store itself refuses)."""
    store = open_store(path)
    if store.local and store.size("") is not None:
        raise CacheError(f"cache {path} is a file, not a cache folder")
    if not store.exists():
        raise CacheError(
            f"cache folder not found: {path}"
            if store.local
            else f"{path}: the bucket does not exist"
        )
    try:
        data = store.read(MANIFEST)
    except FileNotFoundError:
        top = set(store.top())
        if {"records", "build_config.json"} & top:
            raise CacheError(
                f"cache {path} is not complete (no {MANIFEST} yet); run the remaining "
                "build-cache workers, or the same command again"
            ) from None
        raise CacheError(f"{path} is not a sparsekd cache (no {MANIFEST})") from None
    where = store.url(MANIFEST)
    manifest = parse_json(data, f"manifest {where}")
    check_manifest(manifest, where)
    try:
        index = read_shard_index(store, manifest["index"]["shards"], manifest["schema_version"])
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"the shard index of {path} cannot be read ({e})") from e
    check_totals(manifest, index, where)
    return Cache(store, manifest, index)


def in_sorted(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Boolean mask: which `values` are among the sorted `keys` (a refined set's kept ids).
    O(len(values) log len(keys)), so a row group's lookup does not grow with the whole set
    as `np.isin` (which sorts both) does."""
    if not len(keys):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    return keys[at] == values


def check_same_sequences(a: Cache, b: Cache, what: str = "the two caches") -> None:
    """Refuse two caches whose tokenizer, corpus, packing or attention differ: only then
    does a seq_id name the same tokens, read in the same contexts, in both."""
    from sparsekd.schemas.identity import fingerprint

    pairs = [
        ("tokenizer", a.meta.get("tokenizer_hash"), b.meta.get("tokenizer_hash")),
        (
            "corpus (files, text field, domains or --max-sequences)",
            fingerprint(a.meta.get("corpus") or {}),
            fingerprint(b.meta.get("corpus") or {}),
        ),
        (
            "corpus content",
            a.manifest.get("corpus_content_sha256"),
            b.manifest.get("corpus_content_sha256"),
        ),
        ("packing (seq_len)", a.meta.get("seq_len"), b.meta.get("seq_len")),
        ("attention (corpus.attention)", F.attention_of(a.meta), F.attention_of(b.meta)),
    ]
    for name, va, vb in pairs:
        if va != vb:
            raise CacheError(
                f"{what} differ in {name}: {str(va)[:16]} in {a.path}, {str(vb)[:16]} in {b.path}"
            )
