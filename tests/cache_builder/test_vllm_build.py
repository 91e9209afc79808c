"""The production path as a user runs it: `sparsekd build-cache` with the real vLLM engine,
killed mid-job (engine processes included) and resumed, equals an uninterrupted run."""

import pytest

from sparsekd import open_cache
from sparsekd.inspection import verify_cache
from tests.helpers import digests, kill_build_after, run_cli, shard_files

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


@pytest.mark.slow
def test_vllm_build_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_llama_dir):
    ref = tmp_path / "ref"
    run_cli("build-cache", "--teacher", tiny_llama_dir, "--out", ref, *ARGS, check=True)
    assert verify_cache(ref) == []

    out = tmp_path / "resumed"
    done = kill_build_after(out, 1, "--teacher", tiny_llama_dir, "--out", out, *ARGS)
    assert 1 <= done < 10, f"kill should land mid-job ({done} of 10 shards written)"

    run_cli("build-cache", "--teacher", tiny_llama_dir, "--out", out, *ARGS, check=True)
    assert digests(out) == digests(ref) and len(shard_files(out)) == 10
    assert [s.seq_id for s in open_cache(out)] == list(range(40))  # one domain: domain 0
