"""The build's bookkeeping: what is done, who owns what, and the append-only records.

Every build-cache process appends to its own log `records/<host>-<pid>-<random>.jsonl`
(one writer per file, also across hosts): a header line (fingerprint, worker, teacher
weights hash, versions), then one line per finished shard and one per finished domain,
each flushed and fsynced. Bookkeeping per shard is one appended line: O(1), whatever the
number of shards. A kill can tear only the last line of a log, which readers skip.

A unit (domain, part) is done when a record lists it and its file has the recorded size;
a re-run also checks the sha256 of the finished shards of the domains it owns and redoes
any that fail. A domain is done when its domain record exists and all its parts are done.
The cache is complete when every domain is done: whichever worker sees that first writes
the shard index and `manifest.json` (same bytes whichever worker it is).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from sparsekd.errors import CacheError, CorpusError
from sparsekd.schemas.manifest import (
    DOMAIN_INDEX_SCHEMA,
    INDEX_DIR,
    MANIFEST,
    ShardIndex,
    atomic_write_json,
    read_json,
    sha256_file,
    write_manifest,
)

RECORDS_DIR = "records"
BUILD_CONFIG = "build_config.json"
OWN_ENTRIES = {MANIFEST, BUILD_CONFIG, RECORDS_DIR, INDEX_DIR, "shards"}


@dataclass
class Records:
    """Every worker's records merged: headers, shards by (domain, part), domains."""

    headers: list[dict] = field(default_factory=list)
    shards: dict[tuple[int, int], dict] = field(default_factory=dict)
    domains: dict[int, dict] = field(default_factory=dict)


def _parse_log(path: Path) -> list[dict]:
    text = path.read_bytes().decode("utf-8", "replace")
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # the torn last line of a killed writer
                break
            raise CacheError(f"record {path} line {i + 1} is damaged") from e
    return out


def read_records(out: Path) -> Records:
    recs = Records()
    d = out / RECORDS_DIR
    if not d.is_dir():
        return recs
    for path in sorted(d.glob("*.jsonl")):
        for rec in _parse_log(path):
            kind = rec.get("kind")
            if kind == "header":
                recs.headers.append(rec)
            elif kind == "shard":
                key = (rec["domain"], rec["part"])
                if key in recs.shards and recs.shards[key]["sha256"] != rec["sha256"]:
                    raise CacheError(
                        f"two records give {rec['file']} different contents: the corpus, the "
                        "teacher or sparsekd changed between workers"
                    )
                recs.shards[key] = rec
            elif kind == "domain":
                old = recs.domains.get(rec["domain"])
                if old and old["content_sha256"] != rec["content_sha256"]:
                    raise CacheError(
                        f"two records of domain {rec['domain']} ({rec['source']}) saw different "
                        "corpus content: the file changed during the build"
                    )
                recs.domains[rec["domain"]] = rec
    return recs


def identity_diff(old: dict, new: dict, limit: int = 4) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(
        f"{k}: {str(old.get(k))[:40]!r} -> {str(new.get(k))[:40]!r}" for k in keys[:limit]
    )


def check_out_dir(out: Path, identity: dict, fingerprint: str) -> Records:
    """Refuse an --out that holds anything but a cache of this configuration; return the
    records found there."""
    if out.exists() and not out.is_dir():
        raise CacheError(f"--out {out} is a file, not a directory")
    if not out.exists():
        return Records()
    stray = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES)
    if stray:
        raise CacheError(f"--out {out} is not empty and holds no sparsekd cache ({stray[0]})")
    recs = read_records(out)
    prints = {h.get("fingerprint") for h in recs.headers}
    if (out / MANIFEST).exists():
        prints.add(read_json(out / MANIFEST, "manifest").get("fingerprint"))
    if prints - {fingerprint} and not recs.shards and not (out / MANIFEST).exists():
        # a first build that failed before any shard (empty corpus, a crash): nothing of
        # value is there, so the corrected command starts afresh
        shutil.rmtree(out / RECORDS_DIR, ignore_errors=True)
        (out / BUILD_CONFIG).unlink(missing_ok=True)
        return Records()
    if prints - {fingerprint}:
        old = {}
        if (out / BUILD_CONFIG).exists():
            old = read_json(out / BUILD_CONFIG, "build config").get("identity", {})
        raise CacheError(
            f"--out {out} already holds a cache of a different configuration "
            f"({identity_diff(old, identity) or 'fingerprint'}); use another --out"
        )
    return recs


class RecordLog:
    """This process's append-only log, opened on the first append."""

    def __init__(self, out: Path, header):
        self.out = out
        self._header = header  # callable: the header dict, computed when first needed
        self._fh = None
        self._lock = threading.Lock()

    def append(self, rec: dict) -> None:
        with self._lock:
            if self._fh is None:
                (self.out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
                name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
                self._fh = open(self.out / RECORDS_DIR / name, "a")
                self._write({"kind": "header", "time": time.time(), **self._header()})
            self._write(rec)

    def _write(self, rec: dict) -> None:
        self._fh.write(json.dumps(rec, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def shard_ok(out: Path, rec: dict, deep: bool) -> bool:
    """A recorded shard's file is there with its size (and, when `deep`, its sha256)."""
    path = out / rec["file"]
    try:
        if path.stat().st_size != rec["bytes"]:
            return False
    except FileNotFoundError:
        return False
    return not deep or sha256_file(path) == rec["sha256"]


def domain_parts(rec: dict, shard_sequences: int) -> int:
    return -(-rec["sequences"] // shard_sequences)


def try_finalize(out: Path, plan, recs: Records | None = None) -> dict | None:
    """Write the index and manifest.json if every domain is done; return the manifest."""
    recs = recs or read_records(out)
    S = plan.shard_sequences
    entries = []
    for d in plan.domains:
        rec = recs.domains.get(d.index)
        if rec is None:
            return None
        for j in range(domain_parts(rec, S)):
            shard = recs.shards.get((d.index, j))
            if shard is None or not shard_ok(out, shard, deep=False):
                return None
            entries.append(shard)
    if not entries:
        raise CorpusError(
            f"the corpus yields no sequence of --seq-len {plan.seq_len} (every domain has "
            f"fewer than {plan.seq_len + 1} tokens)"
        )
    weights = {h.get("teacher_weights_sha256") for h in recs.headers}
    if len(weights) > 1:
        raise CacheError(
            "workers of this cache saw different teacher weights (teacher_weights_sha256 "
            "differs between their records); rebuild with one teacher"
        )
    domains = [recs.domains[d.index] for d in plan.domains]
    table = pa.table(
        {name: [r[name] for r in domains] for name in DOMAIN_INDEX_SCHEMA.names},
        schema=DOMAIN_INDEX_SCHEMA,
    )
    versions = sorted({json.dumps(h.get("versions", {}), sort_keys=True) for h in recs.headers})
    content = hashlib.sha256("".join(r["content_sha256"] for r in domains).encode()).hexdigest()
    return write_manifest(
        out,
        meta={**plan.meta, "teacher_weights_sha256": weights.pop()},
        fingerprint=plan.fingerprint,
        shards=ShardIndex.from_entries(entries),
        tables={"domains": table},
        extra={
            "corpus_content_sha256": content,
            "bad_lines": sum(r["bad_lines"] for r in domains),
            "versions": [json.loads(v) for v in versions],
        },
    )


def write_build_config(out: Path, plan) -> None:
    """The identity and resolved configuration, beside the cache (for people and for the
    error that names what differs when another configuration meets this --out)."""
    path = out / BUILD_CONFIG
    if path.exists() and read_json(path, "build config").get("fingerprint") == plan.fingerprint:
        return
    atomic_write_json(
        path, {"fingerprint": plan.fingerprint, "identity": plan.identity, "config": plan.config}
    )
