"""The build's records: one object per unit and per domain, created conditionally; the same
record twice is harmless, a different one is refused naming the file; the claim refuses a
second configuration before anything is written and is given back after a failure."""

import json

import pytest

from sparsekd.cache_builder.config import BuildConfig
from sparsekd.cache_builder.ledger import (
    BUILD_CONFIG,
    Ledger,
    unit_record_name,
)
from sparsekd.cache_builder.plan import plan_build
from sparsekd.config import build
from sparsekd.errors import CacheError
from sparsekd.storage import open_store


def _plan(teacher, out, seq_len=32):
    return plan_build(
        build(
            BuildConfig,
            {
                "teacher": {"path": str(teacher), "engine": "hf"},
                "corpus": {"seq_len": seq_len},
                "writer": {"out": str(out), "shard_sequences": 4},
                "progress": False,
            },
        )
    )


def _unit(domain, part, sha="a" * 64):
    return {
        "kind": "shard",
        "domain": domain,
        "part": part,
        "first_seq": (domain << 32) + 4 * part,
        "rows": 4,
        "file": f"shards/00000/{domain:08d}-{part:05d}.parquet",
        "sha256": sha,
        "bytes": 1,
        "tokens_sha256": "t" * 64,
    }


def test_records_are_objects_and_a_conflicting_one_is_refused(tmp_path, tiny_llama_dir):
    out = tmp_path / "cache"
    ledger = Ledger(open_store(out), _plan(tiny_llama_dir, out))
    ledger.claim()
    ledger.write_unit(_unit(3, 0))
    ledger.write_unit(_unit(3, 0))  # the same worker index twice: the same bytes, fine
    ledger.write_unit(_unit(3, 1))
    assert sorted(ledger.unit_records(3)) == [0, 1] and ledger.unit_records(4) == {}
    assert (out / unit_record_name(3, 1)).is_file()
    assert len(list((out / "records/workers").glob("*.json"))) == 1  # this process, once
    with pytest.raises(CacheError, match=r"00000003-00000\.parquet with different contents"):
        ledger.write_unit(_unit(3, 0, sha="b" * 64))
    assert ledger.domain_record(3) is None
    rec = {"kind": "domain", "domain": 3, "source": "x", "part": None, "sequences": 0}
    rec.update(content_sha256="c", documents=0, bad_lines=0, learnt=0, shards=[])
    ledger.write_domain(rec)
    assert ledger.domain_record(3) == rec
    with pytest.raises(CacheError, match="saw different corpus content"):
        ledger.write_domain({**rec, "content_sha256": "d"})


def test_the_claim_refuses_another_configuration_up_front(tmp_path, tiny_llama_dir):
    out = tmp_path / "cache"
    first = Ledger(open_store(out), _plan(tiny_llama_dir, out))
    first.claim()
    again = Ledger(open_store(out), _plan(tiny_llama_dir, out))
    again.claim()  # the same configuration: welcome
    assert not again.claimed
    other = Ledger(open_store(out), _plan(tiny_llama_dir, out, seq_len=64))
    with pytest.raises(CacheError, match=r"different configuration \(.*seq_len.*no shard yet"):
        other.claim()
    assert json.loads((out / BUILD_CONFIG).read_text())["identity"]["seq_len"] == 32
    first.release()  # a failure before any shard: the folder is given back
    assert not (out / BUILD_CONFIG).exists()
    other.claim()
    assert other.claimed
