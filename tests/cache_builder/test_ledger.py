"""The build's records: one append-only log per process, a torn last line (a kill mid-write)
skipped, damage elsewhere named, conflicting records refused."""

import json

import pytest

from sparsekd.cache_builder.ledger import RECORDS_DIR, RecordLog, read_records
from sparsekd.errors import CacheError


def _shard(domain, part, sha="a" * 64):
    return {
        "kind": "shard",
        "domain": domain,
        "part": part,
        "file": f"s{domain}-{part}",
        "sha256": sha,
        "bytes": 1,
    }


def test_logs_append_and_merge_across_processes(tmp_path):
    a = RecordLog(tmp_path, lambda: {"fingerprint": "f", "worker": 0})
    b = RecordLog(tmp_path, lambda: {"fingerprint": "f", "worker": 1})
    a.append(_shard(0, 0))
    b.append(_shard(1, 0))
    a.append({"kind": "domain", "domain": 0, "source": "x", "content_sha256": "c"})
    a.close()
    b.close()
    assert len(list((tmp_path / RECORDS_DIR).glob("*.jsonl"))) == 2
    recs = read_records(tmp_path)
    assert (
        len(recs.headers) == 2 and set(recs.shards) == {(0, 0), (1, 0)} and set(recs.domains) == {0}
    )


def test_a_torn_last_line_is_skipped_and_other_damage_is_named(tmp_path):
    log = RecordLog(tmp_path, lambda: {"fingerprint": "f"})
    log.append(_shard(0, 0))
    log.close()
    path = next((tmp_path / RECORDS_DIR).glob("*.jsonl"))
    path.write_text(path.read_text() + json.dumps(_shard(0, 1))[:20])  # killed mid-write
    assert set(read_records(tmp_path).shards) == {(0, 0)}
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(CacheError, match="line 2 is damaged"):
        read_records(tmp_path)


def test_two_records_of_one_shard_with_different_contents_are_refused(tmp_path):
    for sha in ("a" * 64, "b" * 64):
        log = RecordLog(tmp_path, lambda: {"fingerprint": "f"})
        log.append(_shard(3, 0, sha))
        log.close()
    with pytest.raises(CacheError, match="different contents"):
        read_records(tmp_path)
