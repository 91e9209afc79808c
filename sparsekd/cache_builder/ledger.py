"""The build's bookkeeping: who claimed the folder, what is done, and finalising.

Every record is one small object, published whole by one put of the storage seam
(sparsekd.storage), so the same protocol holds on a local disk and on an object store,
which has no rename and no append:

    build_config.json                         the claim: fingerprint, identity and config,
                                              created conditionally before any shard
    records/teacher.json                      the teacher weights' sha256 (the first worker
                                              to hash them creates it; the others compare)
    records/corpus.json                       the corpus as the first worker listed it: each
                                              file's size and modification time
    records/workers/<host>-<pid>-<rand>.json  one per build process that wrote a shard:
                                              fingerprint, worker, weights, versions
    records/units/NNNNN/DDDDDDDD-PPPPP.json    one per finished shard: place, bytes, sha256,
                                              tokens_sha256 (after the shard is published)
    records/domains/NNNNN/DDDDDDDD.json        one per finished domain (after its units'
                                              records), with the entries of its shards

Commit order: a shard, then its unit record; all the units of a domain, then its domain
record; every domain record, then the index files and `manifest.json`, which is all a
reader trusts. A kill at any point leaves each object either published whole or absent,
and a re-run redoes exactly what has no record. Records are deterministic (no time, no
host), so two processes that write the same one (the same worker index twice) write the
same bytes; records are created conditionally, and one that already exists with other
content (the corpus or the teacher changed between workers) is an error naming the file.

Costs. A worker's start reads the claim and `records/teacher.json`; per domain it owns it
reads that domain's record, and for an unfinished one lists that domain's unit records
(its own prefix): requests grow with the worker's share, not the cache. The finaliser
lists `records/domains/` and `shards/` and reads each domain record once (10^6 shards in
about 10^4 domains: that many small reads, no per-shard request).

A unit is done when its record exists and its shard has the recorded size; on a local disk
a re-run also checks the sha256 of the finished shards of the domains it owns and redoes
any that fail (a file system can damage a file after the fact; an object store publishes
objects whole, so there the size is checked). A build started by a sparsekd of cache
format 2 (its records were append-only logs) has another fingerprint, and is refused by
name rather than resumed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from sparsekd.cache_builder.corpus import source_probe
from sparsekd.errors import CacheError, CorpusError, TeacherError
from sparsekd.schemas import format as F
from sparsekd.schemas.manifest import (
    DOMAIN_INDEX_SCHEMA,
    INDEX_DIR,
    KEPT_SCHEMA,
    MANIFEST,
    ShardIndex,
)
from sparsekd.schemas.manifest import write_manifest as _write_manifest
from sparsekd.storage import STAGING, Store, json_bytes, parse_json, process_tag

RECORDS_DIR = "records"
BUILD_CONFIG = "build_config.json"
TEACHER_RECORD = f"{RECORDS_DIR}/teacher.json"
CORPUS_RECORD = f"{RECORDS_DIR}/corpus.json"
OWN_ENTRIES = {MANIFEST, BUILD_CONFIG, RECORDS_DIR, INDEX_DIR, F.SHARDS_DIR, STAGING}
READ_THREADS = 16  # concurrent small reads from an object store (the finaliser's)


def _bucket(domain: int) -> str:
    return f"{domain // F.DOMAINS_PER_DIR:05d}"


def unit_record_name(domain: int, part: int) -> str:
    return f"{RECORDS_DIR}/units/{_bucket(domain)}/{domain:08d}-{part:05d}.json"


def domain_record_name(domain: int) -> str:
    return f"{RECORDS_DIR}/domains/{_bucket(domain)}/{domain:08d}.json"


def identity_diff(old: dict, new: dict, limit: int = 4) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(
        f"{k}: {str(old.get(k))[:40]!r} -> {str(new.get(k))[:40]!r}" for k in keys[:limit]
    )


UNIT_KEYS = ("domain", "part", "first_seq", "rows", "file", "bytes", "sha256", "tokens_sha256")
DOMAIN_KEYS = ("domain", "source", "part", "sequences", "content_sha256", "documents",
               "bad_lines", "learnt", "shards")  # fmt: skip
KEYS = {"unit record": UNIT_KEYS, "domain record": DOMAIN_KEYS}


def _checked(rec: dict, what: str, where: str) -> dict:
    """A record read back must hold the keys its writer gave it (a damaged or edited one is
    named, not a KeyError)."""
    missing = [k for k in KEYS.get(what, ()) if k not in rec]
    if missing:
        raise CacheError(f"{what} {where} is damaged (no {missing[0]!r}); delete it to redo it")
    return rec


def read_many(store: Store, names: list[str], what: str) -> list[dict]:
    """Small JSON objects, read concurrently from an object store, each checked."""
    read = lambda n: _checked(store.read_json(n, what), what, store.url(n))  # noqa: E731
    if store.local or len(names) < 2:
        return [read(n) for n in names]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(read, names))


class Ledger:
    """The records of one cache folder, as one build process sees and writes them."""

    def __init__(self, store: Store, plan):
        self.store, self.plan = store, plan
        self.claimed = False  # this process created build_config.json
        self._header_written = False

    # --- the claim --------------------------------------------------------------------------

    def claim(self) -> None:
        """Refuse a folder that holds anything but a cache of this configuration, then claim
        it for this configuration before any shard is written (a concurrent build with
        other settings is refused here, not after both have written)."""
        store, plan = self.store, self.plan
        if store.local and store.size("") is not None:
            raise CacheError(f"--out {store.uri} is a file, not a directory")
        top = set(store.top())
        stray = sorted(top - OWN_ENTRIES)
        if stray and not top & {BUILD_CONFIG, MANIFEST}:  # beside a cache, others' files stay
            raise CacheError(
                f"--out {store.uri} is not empty and holds no sparsekd cache ({stray[0]})"
            )
        doc = {"fingerprint": plan.fingerprint, "identity": plan.identity, "config": plan.config}
        self.claimed = store.put_new(BUILD_CONFIG, json_bytes(doc))
        if self.claimed:
            return
        old = store.read_json(BUILD_CONFIG, "build config")
        if old.get("fingerprint") == plan.fingerprint:
            return
        empty = not store.list(f"{RECORDS_DIR}/units/") and store.size(MANIFEST) is None
        hint = "use another --out"
        if empty:
            hint += (
                f" (it holds no shard yet: if no build is running on it, delete "
                f"{store.url(BUILD_CONFIG)})"
            )
        raise CacheError(
            f"--out {store.uri} already holds a cache of a different configuration "
            f"({identity_diff(old.get('identity', {}), plan.identity) or 'fingerprint'}); "
            f"{hint}"
        )

    def release(self) -> None:
        """After a failure: give the folder back if this process claimed it and no shard was
        recorded, so that the corrected command starts afresh."""
        if self.claimed and not self.store.list(f"{RECORDS_DIR}/units/"):
            self.store.delete_prefix(f"{RECORDS_DIR}/")
            self.store.delete(BUILD_CONFIG)
            self.claimed = False

    # --- records ----------------------------------------------------------------------------

    def _put_record(self, name: str, rec: dict, conflict: str) -> None:
        """Create a record; one that exists must hold the same content."""
        data = json_bytes(rec)
        if self.store.put_new(name, data):
            return
        old = parse_json(self.store.read(name), self.store.url(name))
        if old != json.loads(data):
            raise CacheError(conflict)

    def write_header(self) -> None:
        """This process's record (once, before its first unit record)."""
        if not self._header_written:
            header = {**self.plan.header(), "time": time.time()}
            self.store.put(f"{RECORDS_DIR}/workers/{process_tag()}.json", json_bytes(header))
            self._header_written = True

    def check_corpus(self) -> None:
        """Refuse to add to a cache whose first worker listed another corpus: every file's
        size and modification time, as this worker's listing found them at its start (an
        edit between two workers' runs is named here even when no worker reads the file
        twice; the probes of `_check_probes` catch an edit that kept the time)."""
        files = {d.source.name: d.source for d in self.plan.domains if d.source.format != "builtin"}
        listed = {n: [s.size, s.mtime_ns] for n, s in sorted(files.items())}
        if not listed or self.store.put_new(CORPUS_RECORD, json_bytes({"files": listed})):
            return
        first = self.store.read_json(CORPUS_RECORD, "corpus record").get("files", {})
        for name, (size, mtime) in listed.items():
            was = first.get(name)
            if was is None or was == [size, mtime]:
                continue  # a file the record lacks changes the fingerprint (claim's refusal)
            what = (
                f"{was[0]} bytes then, {size} now"
                if was[0] != size
                else f"modified {_when(was[1])} then, {_when(mtime)} now"
            )
            raise CorpusError(
                f"corpus file {files[name].path} is not the file this cache's first worker "
                f"listed ({what}): restore it, or build into another --out (a corpus copied "
                "to each node must keep its files' times: cp -p, rsync -t)"
            )

    def check_teacher(self, weights_sha256: str) -> None:
        """Refuse to add to a cache whose other workers read other teacher weights."""
        rec = {"teacher_weights_sha256": weights_sha256}
        if self.store.put_new(TEACHER_RECORD, json_bytes(rec)):
            return
        old = self.store.read_json(TEACHER_RECORD, "teacher record")
        if old.get("teacher_weights_sha256") != weights_sha256:
            raise TeacherError(
                f"the weights in {self.plan.cfg.teacher.path} differ from those the other "
                "workers of this cache used (teacher_weights_sha256); restore them or use "
                "another --out"
            )

    def write_unit(self, rec: dict) -> None:
        self.write_header()
        self._put_record(
            unit_record_name(rec["domain"], rec["part"]),
            rec,
            f"two workers wrote {rec['file']} with different contents: the corpus, the teacher "
            "or sparsekd changed between them",
        )

    def write_domain(self, rec: dict) -> None:
        self._put_record(
            domain_record_name(rec["domain"]),
            rec,
            f"two records of domain {rec['domain']} ({rec['source']}) saw different corpus "
            "content: the file changed during the build",
        )

    def domain_record(self, domain: int) -> dict | None:
        name = domain_record_name(domain)
        try:
            data = self.store.read(name)
        except FileNotFoundError:
            return None
        where = self.store.url(name)
        return _checked(parse_json(data, f"domain record {where}"), "domain record", where)

    def unit_records(self, domain: int) -> dict[int, dict]:
        """The unit records of one domain, by part (one listing of its own prefix)."""
        prefix = f"{RECORDS_DIR}/units/{_bucket(domain)}/{domain:08d}-"
        recs = read_many(self.store, list(self.store.list(prefix)), "unit record")
        return {r["part"]: r for r in recs}

    def shard_ok(self, rec: dict, deep: bool) -> bool:
        """A recorded shard is there with its size (and, when `deep`, its sha256)."""
        if self.store.size(rec["file"]) != rec["bytes"]:
            return False
        return not deep or self.store.sha256(rec["file"]) == rec["sha256"]


SHARD_ENTRY_KEYS = ("domain", "part", "first_seq", "rows", "file", "bytes", "sha256", "footer_crc")


def _entry(unit_rec: dict) -> dict:
    """What a domain record keeps of each of its unit records (the index's columns)."""
    return {k: unit_rec[k] for k in SHARD_ENTRY_KEYS}


def domain_record(d, sequences: int, learnt: int, reader, units: list[dict]) -> dict:
    """The record of a finished domain: what was read, how it was packed (learnt
    positions; for conversations, what packing did to them), its shards' entries."""
    return {
        "kind": "domain",
        "domain": d.index,
        "source": d.source.name,
        "part": d.part,
        "sequences": sequences,
        "content_sha256": reader.content_sha256,
        "documents": reader.stats.documents,
        "bad_lines": reader.stats.bad_lines,
        "bad_examples": reader.stats.bad_examples,
        "learnt": learnt,
        "chat": dataclasses.asdict(reader.chat) if reader.chat is not None else None,
        **({} if reader.generate is None else {"generate": dataclasses.asdict(reader.generate)}),
        "source_probe": source_probe(d.source),
        "shards": [_entry(u) for u in units],
    }


def domain_parts(rec: dict, shard_sequences: int) -> int:
    return -(-rec["sequences"] // shard_sequences)


def _why_empty(domains: list[dict], plan) -> str:
    """Why domains that were all read hold no row: what packing and generation dropped."""
    room = plan.seq_len + 1
    chat = [r["chat"] for r in domains if r.get("chat")]
    gen = [r["generate"] for r in domains if r.get("generate")]
    too_long = sum(g["too_long"] for g in gen)
    if too_long and too_long == sum(g["prompts"] for g in gen):
        return (
            f"every prompt of --generate, {too_long} in all, leaves no room for an answer in a "
            f"row of {room} tokens (counted as too_long): raise --seq-len"
        )
    dropped = sum(c["dropped"] for c in chat)
    if dropped and not sum(c["rows"] for c in chat):
        how = plan.cfg.corpus.long_conversations
        fix = "raise --seq-len" + (
            ", or set corpus.long_conversations=split to cut them between turns"
            if how == "drop"
            else " (corpus.long_conversations=split cut them between turns, and a turn alone "
            "was still longer)"
        )
        return (
            f"every conversation, {dropped} dropped in all, is longer than a row of {room} "
            f"tokens: {fix}"
        )
    return f"every domain has fewer than {room} tokens"


def try_finalize(store: Store, plan) -> dict | None:
    """Write the index and manifest.json if every domain is done; return the manifest."""
    want = {domain_record_name(d.index) for d in plan.domains}
    if not want <= set(store.list(f"{RECORDS_DIR}/domains/")):
        return None
    by_name = dict(zip(sorted(want), read_many(store, sorted(want), "domain record")))
    domains = [by_name[domain_record_name(d.index)] for d in plan.domains]
    _check_probes(domains)
    entries = [e for r in domains for e in r["shards"]]
    if not entries:
        raise CorpusError(
            f"the corpus yields no sequence of --seq-len {plan.seq_len} "
            f"({_why_empty(domains, plan)})"
        )
    present = store.list(f"{F.SHARDS_DIR}/")
    if any(present.get(e["file"]) != e["bytes"] for e in entries):
        return None  # a recorded shard went missing: its owner's re-run writes it again
    headers = read_many(store, list(store.list(f"{RECORDS_DIR}/workers/")), "worker record")
    weights = {h.get("teacher_weights_sha256") for h in headers}
    if len(weights) != 1:
        raise CacheError(
            "workers of this cache saw different teacher weights (teacher_weights_sha256 "
            "differs between their records); rebuild with one teacher"
        )
    table = pa.table(
        {name: [r[name] for r in domains] for name in DOMAIN_INDEX_SCHEMA.names},
        schema=DOMAIN_INDEX_SCHEMA,
    )
    tables = {"domains": table}
    if plan.cfg.generate.enabled:  # the rows holding an answer cut at max_new_tokens
        cut = [F.make_seq_id(r["domain"], np.asarray(r["generate"]["cut_rows"], np.int64))
               for r in domains]  # fmt: skip
        cut = np.concatenate(cut) if cut else np.zeros(0, np.int64)
        tables["cut"] = pa.table({"seq_id": np.sort(cut)}, schema=KEPT_SCHEMA)
    versions = sorted({json.dumps(h.get("versions", {}), sort_keys=True) for h in headers})
    content = hashlib.sha256("".join(r["content_sha256"] for r in domains).encode()).hexdigest()
    return _write_manifest(
        store,
        meta={**plan.meta, "teacher_weights_sha256": weights.pop()},
        fingerprint=plan.fingerprint,
        shards=ShardIndex.from_entries(entries),
        tables=tables,
        extra={
            "corpus_content_sha256": content,
            "bad_lines": sum(r["bad_lines"] for r in domains),
            "num_learnt": sum(r["learnt"] for r in domains),
            "chat": chat_totals(domains),
            **({"generate": chat_totals(domains, "generate")} if plan.cfg.generate.enabled else {}),
            "versions": [json.loads(v) for v in versions],
        },
    )


def _check_probes(domains: list[dict]) -> None:
    """Refuse a cache whose workers read different versions of one corpus file (edited
    between their runs: the same name and size, other content)."""
    seen: dict[str, str] = {}
    for r in domains:
        probe = r.get("source_probe")
        if probe is None:
            continue
        if seen.setdefault(r["source"], probe) != probe:
            raise CacheError(
                f"corpus file {r['source']} changed between the workers of this cache (its "
                "content differs between the parts they read): rebuild the domains of that "
                "file, or restore it and use another --out"
            )


def _when(mtime_ns: int | None) -> str:
    if mtime_ns is None:
        return "at no recorded time"
    t = time.gmtime(mtime_ns // 1_000_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", t) + f".{mtime_ns % 1_000_000_000:09d} UTC"


def chat_totals(domains: list[dict], key: str = "chat") -> dict | None:
    """What packing did to the cache's conversations (or, key "generate", what generation
    did), summed over its domains (None: nothing of the kind)."""
    chats = [r[key] for r in domains if r.get(key)]
    if not chats:
        return None
    count = lambda v: len(v) if isinstance(v, list) else v  # noqa: E731 (lists: how many)
    return {k: sum(count(c[k]) for c in chats) for k in chats[0]}
