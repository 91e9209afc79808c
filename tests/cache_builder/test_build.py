"""build-cache as a user runs it: kill and resume, worker partition, bad inputs.

The teacher here is the real SmolLM2 through the hf engine (exact, fast to start); the
vLLM engine's agreement with it is tested in test_engines.py and its full path in
test_vllm_build.py."""

import hashlib
import json
from pathlib import Path

import pytest

from sparsekd import open_cache
from sparsekd.cache_builder.build import BuildConfig, EncoderConfig, WriterConfig, run
from sparsekd.cache_builder.corpus import CorpusConfig
from sparsekd.cache_builder.engines import TeacherConfig
from tests.conftest import error_line, kill_build_after, run_cli

BASE = [
    "--engine",
    "hf",
    "--k",
    "4",
    "--seq-len",
    "32",
    "--max-sequences",
    "24",
    "--shard-sequences",
    "3",
    "--quiet",
]


def _files(d: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.glob("shard-*.parquet"))
    } | {"manifest.json": hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()}


def _cfg(teacher, out, **writer):
    return BuildConfig(
        teacher=TeacherConfig(path=str(teacher), engine="hf"),
        corpus=CorpusConfig(seq_len=32, max_sequences=24),
        encoder=EncoderConfig(mode="topk", k=4),
        writer=WriterConfig(out=str(out), shard_sequences=3, **writer),
        progress=False,
    )


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("ref") / "cache"
    run_cli("build-cache", "--teacher", smollm2_dir, "--out", out, *BASE, check=True)
    return out


def test_kill_the_process_and_resume_gives_identical_shards(tmp_path, smollm2_dir, reference_cache):
    out = tmp_path / "cache"
    written = kill_build_after(out, 2, "--teacher", smollm2_dir, "--out", out, *BASE)
    assert 2 <= written < 8, f"the kill should land mid-job, {written} shards were written"
    assert not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="not complete"):
        open_cache(out)
    run_cli("build-cache", "--teacher", smollm2_dir, "--out", out, *BASE, check=True)
    assert _files(out) == _files(reference_cache)
    assert not list(out.glob(".shard-*"))
    seq_ids = [s.seq_id for s in open_cache(out)]
    assert seq_ids == list(range(24))


def test_rerun_of_a_complete_cache_writes_nothing(reference_cache, smollm2_dir):
    before = {p.name: p.stat().st_mtime_ns for p in reference_cache.glob("shard-*")}
    proc = run_cli(
        "build-cache", "--teacher", smollm2_dir, "--out", reference_cache, *BASE, check=True
    )
    assert "wrote 0 shards" in proc.stdout and "cache complete" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in reference_cache.glob("shard-*")} == before


def test_workers_are_disjoint_complete_and_equal_one_worker(tmp_path, smollm2_dir, reference_cache):
    out = tmp_path / "cache"
    W = 3
    for i in range(W):
        assert not (out / "manifest.json").exists()
        summary = run(_cfg(smollm2_dir, out, num_workers=W, worker_index=i))
        assert summary["complete"] == (i == W - 1)
    records = [json.loads(p.read_text()) for p in sorted((out / "workers").glob("*.json"))]
    units = [[e["unit"] for e in r["shards"]] for r in records]
    assert units == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert _files(out) == _files(reference_cache)


def test_worker_index_must_be_in_range(tmp_path, smollm2_dir):
    proc = run_cli(
        "build-cache",
        "--teacher",
        smollm2_dir,
        "--out",
        tmp_path / "c",
        *BASE,
        "--num-workers",
        "2",
        "--worker-index",
        "2",
    )
    assert proc.returncode == 2 and "worker_index must be in 0..1" in error_line(proc)


def test_different_configuration_is_refused_and_nothing_is_touched(reference_cache, smollm2_dir):
    before = _files(reference_cache)
    args = [a if a != "32" else "64" for a in BASE]  # --seq-len 64
    proc = run_cli("build-cache", "--teacher", smollm2_dir, "--out", reference_cache, *args)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "already holds a cache of a different configuration" in line and "seq_len" in line
    assert _files(reference_cache) == before


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--teacher", "/nonexistent/teacher"], "teacher folder not found"),
        (["--corpus", "/nonexistent/corpus.jsonl"], "corpus path not found"),
        (["--k", "5000"], "encoder.k must be in 1..1024"),
        (["--k", "0"], "encoder.k must be in 1..1024"),
        (["--seq-len", "1"], "corpus.seq_len must be >= 2"),
        (["--set", "encoder.nope=1"], "unknown config key encoder.'nope'"),
    ],
)
def test_bad_inputs_fail_in_one_line(tmp_path, smollm2_dir, extra, expect):
    args = ["build-cache", "--teacher", smollm2_dir, "--out", tmp_path / "c", *BASE, *extra]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert error_line(proc).startswith("sparsekd: error:") and expect in error_line(proc)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_malformed_corpus_line_and_skip_bad_lines(tmp_path, smollm2_dir):
    corpus = tmp_path / "c.jsonl"
    good = [json.dumps({"text": "The teacher reads every line of this file. " * 8})] * 6
    corpus.write_text("\n".join(good[:3] + ["{oops"] + good[3:]) + "\n")
    args = [
        "build-cache",
        "--teacher",
        smollm2_dir,
        "--corpus",
        corpus,
        "--engine",
        "hf",
        "--k",
        "2",
        "--seq-len",
        "16",
        "--quiet",
    ]
    proc = run_cli(*args, "--out", tmp_path / "a")
    assert proc.returncode == 2 and f"{corpus}:4: malformed JSON" in error_line(proc)
    proc = run_cli(*args, "--out", tmp_path / "b", "--skip-bad-lines", check=True)
    assert "skipped 1 bad lines" in proc.stdout
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["bad_lines"] == 1


def test_out_that_is_not_a_cache_is_refused(tmp_path, smollm2_dir):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    proc = run_cli("build-cache", "--teacher", smollm2_dir, "--out", tmp_path / "c", *BASE)
    assert proc.returncode == 2 and "holds no sparsekd cache" in error_line(proc)
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"
