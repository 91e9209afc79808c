"""inspect --verify catches each kind of corruption, and inspect --json has its keys."""

import json
import shutil

import pytest

from sparsekd.inspect import verify_cache
from tests.conftest import error_line, run_cli


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
    ):
        assert key in stats, key
    assert stats["mode"] == "topk" and stats["sequences"] == 10 and stats["tokens"] == 640
    assert stats["mean_support"] == 8.0 and 0 < stats["tail_mass"] < 1
    assert 0 < stats["top1_agreement"] < 1 and stats["teacher_nll"] > 0
    assert (tmp_path / "p.png").stat().st_size > 10_000


def _flip_byte(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "corrupt, expect",
    [
        (
            lambda d: (d / "shard-00001.parquet").write_bytes(
                (d / "shard-00001.parquet").read_bytes()[:-100]
            ),
            "shard-00001.parquet: size",
        ),
        (lambda d: _flip_byte(d / "shard-00000.parquet"), "shard-00000.parquet: checksum mismatch"),
        (
            lambda d: shutil.copy(d / "shard-00000.parquet", d / "shard-00007.parquet"),
            "shard-00007.parquet: on disk but not in the manifest",
        ),
        (
            lambda d: (d / "shard-00002.parquet").unlink(),
            "shard-00002.parquet: listed in the manifest but missing on disk",
        ),
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
    ],
)
def test_verify_names_each_corruption(cache, corrupt, expect):
    corrupt(cache)
    problems = verify_cache(cache)
    assert any(expect in p for p in problems), problems
    proc = run_cli("inspect", cache, "--verify")
    assert proc.returncode == 2 and expect in proc.stderr
    assert "problem(s) found" in error_line(proc) or expect in error_line(proc)
