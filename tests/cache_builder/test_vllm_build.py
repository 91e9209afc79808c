"""The production path as a user runs it: `sparsekd build-cache` with the real vLLM engine,
killed mid-job (engine processes included) and resumed, equals an uninterrupted run. The
killed build is the real command in its own process; the uninterrupted and the resumed
runs share one engine in this process (the same settings: `build.run` is what the command
runs)."""

import pytest

from sparsekd import open_cache
from sparsekd.cache_builder.build import run
from sparsekd.cache_builder.config import BuildConfig
from sparsekd.cache_builder.engines import VllmEngine
from sparsekd.cache_builder.teacher import TeacherConfig
from sparsekd.config import build
from sparsekd.inspection import verify_cache
from tests.helpers import digests, kill_build_after, shard_files

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


def _cfg(teacher, out):
    """The settings of `build-cache --teacher TEACHER --out OUT *ARGS`."""
    return build(
        BuildConfig,
        {
            "teacher": {"path": str(teacher), "engine": "vllm"},
            "corpus": {"seq_len": 64, "max_sequences": 40},
            "encoder": {"k": 8},
            "writer": {"out": str(out), "shard_sequences": 4},
            "progress": False,
        },
    )


@pytest.mark.slow
def test_vllm_build_killed_and_resumed_equals_uninterrupted(tmp_path, tiny_llama_dir):
    engine = VllmEngine(TeacherConfig(path=str(tiny_llama_dir)), k=8, seq_len=64)
    try:
        ref = tmp_path / "ref"
        run(_cfg(tiny_llama_dir, ref), engine=engine)
        assert verify_cache(ref) == []

        out = tmp_path / "resumed"
        done = kill_build_after(out, 1, "--teacher", tiny_llama_dir, "--out", out, *ARGS)
        assert 1 <= done < 10, f"kill should land mid-job ({done} of 10 shards written)"

        run(_cfg(tiny_llama_dir, out), engine=engine)
    finally:
        engine.close()
    assert digests(out) == digests(ref) and len(shard_files(out)) == 10
    assert [s.seq_id for s in open_cache(out)] == list(range(40))  # one domain: domain 0
