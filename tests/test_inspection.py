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
