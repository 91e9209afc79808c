"""inspect: --verify names each kind of damage (and a manifest whose metadata was edited),
--json has its keys."""

import json
import shutil

import pytest

from sparsekd.inspection import verify_cache
from tests.helpers import error_line, flip_bit, run_cli, shard_files


@pytest.fixture
def cache(tmp_path, hf_topk_cache):
    d = tmp_path / "cache"
    shutil.copytree(hf_topk_cache, d)
    return d


def test_intact_cache_verifies_and_inspect_json(cache, tmp_path):
    assert verify_cache(cache) == []
    proc = run_cli("inspect", cache, "--verify", "--json", "--plot", tmp_path / "p.png", check=True)
    stats = json.loads(proc.stdout)
    for key in (
        "mode",
        "sequences",
        "tokens",
        "shards",
        "bytes",
        "bytes_per_token",
        "mean_support",
        "teacher_nll",
        "tail_mass",
        "top1_agreement",
        "teacher",
        "tokenizer_hash",
        "seq_len",
        "shard_glob",
        "fingerprint",
        "teacher_weights_sha256",
    ):
        assert key in stats, key
    assert stats["mode"] == "topk" and stats["sequences"] == 10 and stats["tokens"] == 640
    assert stats["mean_support"] == 8.0 and 0 < stats["tail_mass"] < 1
    assert 0 < stats["top1_agreement"] < 1 and stats["teacher_nll"] > 0
    assert (tmp_path / "p.png").stat().st_size > 10_000
    text = run_cli("inspect", cache, check=True).stdout  # and where to measure what it teaches
    assert f"sparsekd fidelity --cache {cache} --teacher" in text, text


def _edit_meta(key, value):
    def edit(d):
        m = json.loads((d / "manifest.json").read_text())
        m["meta"][key] = value
        (d / "manifest.json").write_text(json.dumps(m))

    return edit


@pytest.mark.parametrize(
    "corrupt, expect",
    [
        (
            lambda d: shard_files(d)[1].write_bytes(shard_files(d)[1].read_bytes()[:-100]),
            "00000000-00001.parquet: sha256 differs",
        ),
        (lambda d: flip_bit(shard_files(d)[0], 2000), "00000000-00000.parquet: sha256 differs"),
        (
            lambda d: shutil.copy(shard_files(d)[0], d / "shards/00000/00000000-00007.parquet"),
            "00000000-00007.parquet: present but not in the manifest",
        ),
        (
            lambda d: shard_files(d)[2].unlink(),
            "00000000-00002.parquet: listed in the manifest but missing",
        ),
        (lambda d: (d / "manifest.json").unlink(), "not complete"),
        (_edit_meta("tokenizer_hash", "0" * 64), "tokenizer_hash"),
        (_edit_meta("vocab_size", 1000), "vocab_size"),
    ],
)
def test_verify_names_each_corruption(cache, corrupt, expect):
    corrupt(cache)
    problems = verify_cache(cache)
    assert any(expect in p for p in problems), problems
    proc = run_cli("inspect", cache, "--verify")
    assert proc.returncode == 2 and expect in proc.stderr
    assert f"problem(s) found in {cache}" in error_line(proc)


@pytest.mark.parametrize("key, factor", [("num_tokens", 10), ("bytes", 10), ("num_learnt", 2)])
def test_verify_recomputes_every_total_and_refuses_an_edited_manifest(cache, key, factor):
    m = json.loads((cache / "manifest.json").read_text())
    m[key] *= factor
    (cache / "manifest.json").write_text(json.dumps(m))
    problems = verify_cache(cache)
    assert len(problems) == 1 and f"its {key} is {m[key]}" in problems[0], problems
    proc = run_cli("inspect", cache, "--json")  # inspect itself never reports a false total
    assert proc.returncode == 2 and key in error_line(proc)


def test_a_shard_of_another_cache_with_the_same_fingerprint_and_size_is_caught_at_open(cache):
    """Rewritten with one stored log-prob changed (another cache of the same configuration,
    another corpus content): same size, same fingerprint and place, another footer."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sparsekd import open_cache
    from sparsekd.cache_builder.writer import shard_bytes
    from sparsekd.errors import CacheError

    path = shard_files(cache)[0]
    pf = pq.ParquetFile(path)
    meta = json.loads(pf.schema_arrow.metadata[b"sparsekd"])
    table = pf.read().replace_schema_metadata(None)
    col = table.column("token_logprob").combine_chunks()
    for at in range(200):  # a change that compresses to the same size
        values = col.values.to_numpy().copy()
        values[at] += 1
        other = pa.ListArray.from_arrays(col.offsets, pa.array(values, pa.uint16()))
        at_col = table.schema.get_field_index("token_logprob")
        data, _ = shard_bytes(table.set_column(at_col, "token_logprob", other), meta)
        if len(data) == path.stat().st_size:
            break
    assert len(data) == path.stat().st_size and pc.sum(pc.not_equal(other.values, col.values))
    path.write_bytes(data)
    c = open_cache(cache)  # the manifest and index are untouched: opening it is fine
    with pytest.raises(CacheError, match="its footer is not the one the index recorded"):
        list(c)
