"""The cache manifest: which shards exist, and the per-worker records it is merged from.

Layout of a cache directory:

    manifest.json                      written when every work unit has its shard
    shard-00000.parquet, ...           one shard per work unit (unit u = sequences
                                       [u*S, (u+1)*S) of the packed stream)
    workers/worker-IIIII-of-WWWWW.json what worker I of W has finished (its own file)
    build_config.json                  the resolved build configuration

A worker records each shard in its own file after the shard is renamed into place, so no
file is written by two workers. When a worker sees every unit finished (across all worker
files, whatever W they ran with), it writes `manifest.json`. Its content depends only on
the finished shards, so two workers racing to write it write the same bytes, each through
its own temporary file and an atomic rename. `manifest.json` is the only thing readers trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from sparsekd.schemas.format import FORMAT_NAME, SCHEMA_VERSION

MANIFEST = "manifest.json"
WORKERS_DIR = "workers"


class CacheError(ValueError):
    """A cache directory that is missing, incomplete, corrupt or of another configuration."""


def shard_name(unit: int) -> str:
    return f"shard-{unit:05d}.parquet"


def worker_record_name(index: int, num_workers: int) -> str:
    return f"worker-{index:05d}-of-{num_workers:05d}.json"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON to a temporary file in the same directory, fsync, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; caches are shared between users
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | os.PathLike, what: str) -> dict:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except FileNotFoundError as e:
        raise CacheError(f"{what} not found: {path}") from e
    except json.JSONDecodeError as e:
        raise CacheError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(obj, dict):
        raise CacheError(f"{what} {path} is not a JSON object")
    return obj


def read_worker_records(cache_dir: str | os.PathLike) -> list[dict]:
    wdir = Path(cache_dir) / WORKERS_DIR
    if not wdir.is_dir():
        return []
    return [read_json(p, "worker record") for p in sorted(wdir.glob("worker-*.json"))]


def merge_worker_records(records: list[dict], fingerprint: str) -> tuple[dict[int, dict], dict]:
    """Union of finished shards over all worker records, and what is known of the total.

    Returns `(shards_by_unit, totals)`; totals has `num_units`, `num_sequences`,
    `bad_lines` from any worker that read the whole corpus (None when none has).
    Raises CacheError when records disagree.
    """
    shards: dict[int, dict] = {}
    totals = {"num_units": None, "num_sequences": None, "bad_lines": None}
    for rec in records:
        if rec.get("fingerprint") != fingerprint:
            raise CacheError(
                f"worker record {rec.get('worker')}-of-{rec.get('num_workers')} belongs to a "
                "cache of another configuration"
            )
        for entry in rec.get("shards", []):
            unit = int(entry["unit"])
            if unit in shards and shards[unit]["sha256"] != entry["sha256"]:
                raise CacheError(f"two workers recorded different contents for {entry['file']}")
            shards[unit] = entry
        if rec.get("num_units") is not None:
            for key in totals:
                if totals[key] is not None and totals[key] != rec[key]:
                    raise CacheError(f"worker records disagree on {key}")
                totals[key] = rec[key]
    return shards, totals


def build_manifest(meta: dict, fingerprint: str, shards: dict[int, dict], totals: dict) -> dict:
    entries = [shards[u] for u in sorted(shards)]
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "meta": meta,
        "num_sequences": totals["num_sequences"],
        "num_tokens": sum(e["tokens"] for e in entries),
        "num_shards": len(entries),
        "bytes": sum(e["bytes"] for e in entries),
        "bad_lines": totals["bad_lines"],
        "shards": entries,
    }
