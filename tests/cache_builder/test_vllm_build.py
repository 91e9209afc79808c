"""The production path as a user runs it: `sparsekd build-cache` with the real vLLM engine,
killed mid-job (engine processes included) and resumed, equals an uninterrupted run."""

import hashlib

import pytest

from sparsekd import open_cache
from sparsekd.inspect import verify_cache
from tests.conftest import kill_build_after, run_cli

ARGS = [
    "--engine",
    "vllm",
    "--k",
    "8",
    "--seq-len",
    "64",
    "--max-sequences",
    "40",
    "--shard-sequences",
    "4",
    "--quiet",
]


def _shards(d):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.glob("shard-*.parquet"))
    }


@pytest.mark.slow
def test_vllm_build_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_llama_dir):
    ref = tmp_path / "ref"
    run_cli("build-cache", "--teacher", tiny_llama_dir, "--out", ref, *ARGS, check=True)
    assert verify_cache(ref) == []

    out = tmp_path / "resumed"
    done = kill_build_after(out, 1, "--teacher", tiny_llama_dir, "--out", out, *ARGS)
    assert 1 <= done < 10, f"kill should land mid-job ({done} of 10 shards written)"

    run_cli("build-cache", "--teacher", tiny_llama_dir, "--out", out, *ARGS, check=True)
    assert _shards(out) == _shards(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert [s.seq_id for s in open_cache(out)] == list(range(40))
