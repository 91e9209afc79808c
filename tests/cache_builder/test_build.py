"""build-cache as users run it at scale: any split into workers gives the same bytes, kill -9
and re-run complete exactly, a worker reads only its own domains, a re-run re-checks what
it skips, and a cache never mixes configurations, corpora or teachers.

The teacher is a tiny random Llama through the hf engine (exact, fast); the vLLM path is
in test_vllm_build.py. The corpus is 12 files (12 packing domains) cut from the built-in
documentation, each document cut to 1,200 characters: about 250 rows, 32 shards."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from sparsekd import open_cache
from sparsekd.cache_builder.build import run
from sparsekd.cache_builder.config import BuildConfig
from sparsekd.cache_builder.corpus import builtin_documents
from sparsekd.config import build
from sparsekd.errors import CacheError, CorpusError, TeacherError
from sparsekd.inspection import verify_cache
from sparsekd.storage import open_store
from tests.helpers import (
    copy_cache,
    digests,
    error_line,
    flip_bit,
    kill_build_after,
    run_cli,
    shard_files,
    staged_files,
    store_digests,
)
from tests.s3 import DelayProxy

N_FILES = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = [t for _, t in builtin_documents()]
    for i in range(N_FILES):
        part = [t[:1200] for t in docs[i * 4 : i * 4 + 2 + i % 3]]  # ~20 rows a domain
        (d / f"part-{i:02d}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in part)
        )
    return d


def _cfg(teacher, corpus, out, **writer):
    return build(
        BuildConfig,
        {
            "teacher": {"path": str(teacher), "engine": "hf"},
            "corpus": {"paths": [str(corpus)], "seq_len": 32},
            "encoder": {"mode": "topk", "k": 4},
            "writer": {"out": str(out), "shard_sequences": 8, **writer},
            "progress": False,
        },
    )


def _args(teacher, corpus, out, *extra):
    return [
        "--teacher",
        teacher,
        "--corpus",
        corpus,
        "--out",
        out,
        "--engine",
        "hf",
        "--k",
        "4",
        "--seq-len",
        "32",
        "--shard-sequences",
        "8",
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir, corpus):
    out = tmp_path_factory.mktemp("ref") / "cache"
    summary = run(_cfg(tiny_llama_dir, corpus, out))
    assert summary["complete"] and summary["domains_read"] == N_FILES
    return out


def test_reference_cache_is_intact_and_spans_every_domain(reference):
    assert verify_cache(reference) == []
    cache = open_cache(reference)
    assert sorted(set(cache.index.domain.tolist())) == list(range(N_FILES))
    assert len(cache) > 5 * N_FILES and len(cache.index) > N_FILES


@pytest.mark.parametrize("W", [3, 8])
def test_any_number_of_workers_gives_the_same_bytes(tmp_path, tiny_llama_dir, corpus, reference, W):
    out = tmp_path / "cache"
    read = []
    for i in range(W):
        assert not (out / "manifest.json").exists()
        s = run(_cfg(tiny_llama_dir, corpus, out, num_workers=W, worker_index=i))
        assert s["complete"] == (i == W - 1)
        read.append(s["domains_read"])
    assert digests(out) == digests(reference)
    # worker i read only its own domains: about 1/W of the corpus each, nothing twice
    assert read == [len(range(i, N_FILES, W)) for i in range(W)] and sum(read) == N_FILES


def test_workers_of_different_w_can_share_one_out(tmp_path, tiny_llama_dir, corpus, reference):
    out = tmp_path / "cache"
    run(_cfg(tiny_llama_dir, corpus, out, num_workers=4, worker_index=1))
    run(_cfg(tiny_llama_dir, corpus, out, num_workers=3, worker_index=0))
    s = run(_cfg(tiny_llama_dir, corpus, out, num_workers=2, worker_index=1))
    assert not s["complete"]
    s = run(_cfg(tiny_llama_dir, corpus, out))  # one worker finishes the rest
    assert s["complete"] and s["domains_read"] < N_FILES
    assert digests(out) == digests(reference)


@pytest.mark.slow
@pytest.mark.parametrize("kills", [(2, 6)])
def test_kill_9_at_several_points_then_completion_is_byte_identical(
    tmp_path, tiny_llama_dir, corpus, reference, kills
):
    out = tmp_path / "cache"
    for i, at in enumerate(kills):  # worker i of 2 killed once `at` shards exist
        written = kill_build_after(
            out,
            at,
            *_args(tiny_llama_dir, corpus, out, "--num-workers", "2", "--worker-index", str(i)),
        )
        assert written >= at - 1
    assert not (out / "manifest.json").exists()
    with pytest.raises(CacheError, match="not complete"):
        open_cache(out)
    for i in range(2):
        run_cli(
            "build-cache",
            *_args(tiny_llama_dir, corpus, out, "--num-workers", "2", "--worker-index", str(i)),
            check=True,
        )
    assert digests(out) == digests(reference)
    assert not staged_files(out)


def test_rerun_rechecks_what_it_skips_and_redoes_a_damaged_shard(
    tmp_path, tiny_llama_dir, corpus, reference
):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    shard = shard_files(out)[3]
    flip_bit(shard, shard.stat().st_size // 2)  # corrupted at the same size
    proc = run_cli("build-cache", *_args(tiny_llama_dir, corpus, out), check=True)
    assert "wrote 1 shards" in proc.stdout and "rewrote 1 damaged or missing shards" in proc.stdout
    assert digests(out) == digests(reference) and verify_cache(out) == []
    proc = run_cli("build-cache", *_args(tiny_llama_dir, corpus, out), check=True)
    assert "wrote 0 shards" in proc.stdout and "cache complete" in proc.stdout


def test_the_same_worker_twice_at_once_does_not_collide(
    tmp_path, tiny_llama_dir, corpus, reference
):
    """Two processes started with the same index (a requeued task beside its original):
    neither deletes the other's temporary files; the cache is the reference."""
    out = tmp_path / "cache"
    args = _args(tiny_llama_dir, corpus, out, "--num-workers", "4", "--worker-index", "0")
    procs = [
        subprocess.Popen([sys.executable, "-m", "sparsekd", "build-cache", *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-1500:] for _, err in results]
    mine, ref = digests(out), digests(reference)
    assert len(mine) == len(
        [f for f in ref if f.split("/")[-1][:8] in ("00000000", "00000004", "00000008")]
    )
    assert all(ref[f] == d for f, d in mine.items())


def test_a_corpus_changed_under_a_half_built_cache_is_refused(tmp_path, tiny_llama_dir, corpus):
    src = tmp_path / "corpus"
    shutil.copytree(corpus, src)
    out = tmp_path / "cache"
    run(_cfg(tiny_llama_dir, src, out, num_workers=2, worker_index=0))
    f = src / "part-00.jsonl"  # domain 0, finished by worker 0, edited at the same size
    text, listed = f.read_text(), f.stat()  # and its time put back: the listing sees no change
    i = text.index("a", 20)
    f.write_text(text[:i] + "b" + text[i + 1 :])
    os.utime(f, ns=(listed.st_atime_ns, listed.st_mtime_ns))
    damaged = next(p for p in shard_files(out) if p.name.startswith("00000000-"))
    flip_bit(damaged, damaged.stat().st_size // 2)  # the re-run must read domain 0 again
    with pytest.raises(CorpusError, match="the corpus changed since|changed since its shards"):
        run(_cfg(tiny_llama_dir, src, out, num_workers=2, worker_index=0))


def test_renamed_corpus_file_other_tokenizer_or_other_weights_are_refused(
    tmp_path, tiny_llama_dir, corpus
):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    src, teacher, out = tmp_path / "corpus", tmp_path / "teacher", tmp_path / "cache"
    shutil.copytree(corpus, src)
    shutil.copytree(tiny_llama_dir, teacher)
    run(_cfg(teacher, src, out, num_workers=2, worker_index=0))
    # (b) the same bytes under another suffix are parsed differently: another corpus
    (src / "part-05.jsonl").rename(src / "part-05.txt")
    with pytest.raises(CacheError, match="different configuration.*corpus"):
        run(_cfg(teacher, src, out, num_workers=2, worker_index=1))
    (src / "part-05.txt").rename(src / "part-05.jsonl")
    # (a) a tokenizer whose normaliser changed (same vocabulary)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    tok.save_pretrained(teacher)
    with pytest.raises(CacheError, match="different configuration.*tokenizer_hash"):
        run(_cfg(teacher, src, out, num_workers=2, worker_index=1))
    shutil.rmtree(teacher)
    shutil.copytree(tiny_llama_dir, teacher)
    # (c) weights changed in the middle of a file of the same size
    w = teacher / "model.safetensors"
    flip_bit(w, w.stat().st_size // 2)
    with pytest.raises(TeacherError, match="differ from those the other workers"):
        run(_cfg(teacher, src, out, num_workers=2, worker_index=1))


def test_a_failed_first_build_does_not_block_the_corrected_command(tmp_path, tiny_llama_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "too short"}) + "\n")
    out = tmp_path / "cache"
    proc = run_cli("build-cache", *_args(tiny_llama_dir, empty, out))
    assert proc.returncode == 2 and "yields no sequence of --seq-len 32" in error_line(proc)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": " ".join(["word"] * 400)}) + "\n")
    run_cli("build-cache", *_args(tiny_llama_dir, good, out), check=True)
    assert verify_cache(out) == []


def test_different_configuration_is_refused_and_nothing_is_touched(
    reference, tiny_llama_dir, corpus
):
    before = digests(reference)
    args = [a if a != "32" else "64" for a in _args(tiny_llama_dir, corpus, reference)]
    proc = run_cli("build-cache", *args)
    assert proc.returncode == 2
    line = error_line(proc)
    assert "already holds a cache of a different configuration" in line and "seq_len" in line
    assert digests(reference) == before


def test_environment_launchers_pick_the_worker(tmp_path, tiny_llama_dir, corpus, reference):
    out = tmp_path / "cache"
    for i in range(2):  # a SLURM array of two tasks, no worker flags
        env = {
            "SLURM_ARRAY_TASK_ID": str(10 + i),
            "SLURM_ARRAY_TASK_MIN": "10",
            "SLURM_ARRAY_TASK_COUNT": "2",
        }
        proc = run_cli("build-cache", *_args(tiny_llama_dir, corpus, out), env=env, check=True)
        assert f"worker {i}/2" in proc.stdout
    assert digests(out) == digests(reference)


# --- the same build on a real S3 endpoint (moto's server over HTTP on 127.0.0.1) ----------


@pytest.mark.parametrize("W", [1, 3])
def test_a_build_on_s3_is_the_local_cache_object_by_object(
    s3_server, s3_bucket, tiny_llama_dir, corpus, reference, W
):
    out = f"{s3_bucket}/caches/run1"
    for i in range(W):
        s = run(_cfg(tiny_llama_dir, corpus, out, num_workers=W, worker_index=i))
        assert s["complete"] == (i == W - 1)
    assert store_digests(s3_server, out) == digests(reference)
    assert verify_cache(out) == []


@pytest.mark.slow
def test_kill_9_in_the_middle_of_an_upload_then_rerun_is_exact(
    s3_server, s3_bucket, tiny_llama_dir, corpus, reference
):
    """Workers killed while a shard's PUT is in flight (held by a slow proxy): the shard
    never appears, and the re-run completes the cache byte for byte."""
    out = f"{s3_bucket}/cache"
    for i in range(2):
        puts, hit = [], threading.Event()

        def on_request(first, puts=puts, hit=hit, at=2 + i):
            if first.startswith(b"PUT ") and b"/shards/" in first.split(b" HTTP")[0]:
                puts.append(first.split(b" ")[1].decode())
                if len(puts) == at:
                    hit.set()

        with DelayProxy(s3_server.port, delay_s=0.3, on_request=on_request) as proxy:
            args = _args(
                tiny_llama_dir, corpus, out, "--num-workers", "2", "--worker-index", str(i)
            )
            proc = subprocess.Popen(
                [sys.executable, "-m", "sparsekd", "build-cache", *map(str, args)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, env={**os.environ, **proxy.env},
            )  # fmt: skip
            assert hit.wait(300), "no shard upload was seen"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        killed = puts[-1].split("/cache/", 1)[1].split("?")[0]
        assert open_store(out).size(killed) is None  # the interrupted PUT published nothing
    with pytest.raises(CacheError, match="not complete"):
        open_cache(out)
    for i in range(2):
        args = _args(tiny_llama_dir, corpus, out, "--num-workers", "2", "--worker-index", str(i))
        run_cli("build-cache", *args, check=True)
    assert store_digests(s3_server, out) == digests(reference)


def test_a_corpus_on_s3_is_read_by_ranged_reads_into_the_same_cache(
    s3_server, s3_bucket, tiny_llama_dir, corpus, reference, tmp_path
):
    src = copy_cache(corpus, f"{s3_bucket}/data")
    out = tmp_path / "cache"
    run(_cfg(tiny_llama_dir, src + "/", out))
    assert digests(out) == digests(reference)


def test_a_corpus_file_edited_between_two_workers_runs_is_refused(tmp_path, tiny_llama_dir):
    """The same name, size and modification time, other content, read by two workers (one
    domain each): the finaliser compares what each saw of the file and names it."""
    # 180 KB in ~7 tokens a line: three 64 KiB domains, few rows for the teacher
    lines = [json.dumps({"text": f"line {i} " + "-" * 180}) + "\n" for i in range(900)]
    corpus = tmp_path / "big.jsonl"
    corpus.write_text("".join(lines))
    out = tmp_path / "cache"
    cfg = lambda i: build(BuildConfig, {  # noqa: E731
        "teacher": {"path": str(tiny_llama_dir), "engine": "hf"},
        "corpus": {"paths": [str(corpus)], "seq_len": 32, "domain_bytes": 65536},
        "encoder": {"mode": "topk", "k": 4},
        "writer": {"out": str(out), "num_workers": 2, "worker_index": i},
        "progress": False,
    })  # fmt: skip
    assert not run(cfg(0))["complete"]
    text, listed = corpus.read_text(), corpus.stat()
    corpus.write_text(text[:100] + ("x" if text[100] != "x" else "y") + text[101:])
    os.utime(corpus, ns=(listed.st_atime_ns, listed.st_mtime_ns))
    with pytest.raises(CacheError, match="corpus file big.jsonl changed between the workers"):
        run(cfg(1))
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_corpus_file_changed_after_the_first_worker_listed_it_is_refused_at_any_start(
    where, tmp_path, tiny_llama_dir, corpus, request
):
    """Every worker lists every corpus file at its start (size, modification time) against
    what the first worker listed: a file that only worker 1 reads, edited at the same size
    after worker 0 ran, is refused before worker 1 computes anything, naming the file; so
    is one rewritten with the same bytes (a new time: the listing cannot tell); a file put
    back as it was (same time) is accepted. On S3 the time is the object's LastModified."""
    owned_by_1 = "part-01.jsonl"  # domain 1: worker 1 of 2
    if where == "local":
        src = tmp_path / "corpus"
        shutil.copytree(corpus, src)
        root, read = str(src), lambda n: (src / n).read_bytes()
        write = lambda n, b: (src / n).write_bytes(b)  # noqa: E731
    else:
        request.getfixturevalue("s3_server")
        root = copy_cache(corpus, f"{request.getfixturevalue('s3_bucket')}/data")
        store = open_store(root)
        read, write = store.read, store.put
    out = tmp_path / "cache"
    run(_cfg(tiny_llama_dir, root, out, num_workers=2, worker_index=0))
    before = read(owned_by_1)
    i = before.index(b"a", 20)
    time.sleep(1.1)  # S3's LastModified has whole seconds
    write(owned_by_1, before[:i] + b"b" + before[i + 1 :])
    shards = shard_files(out)
    with pytest.raises(CorpusError, match=f"corpus file .*{owned_by_1} is not the file this "
                       "cache's first worker listed"):  # fmt: skip
        run(_cfg(tiny_llama_dir, root, out, num_workers=2, worker_index=1))
    write(owned_by_1, before)  # the same bytes again, at a new time: still refused
    with pytest.raises(CorpusError, match=rf"{owned_by_1} is not the file .*\(modified "):
        run(_cfg(tiny_llama_dir, root, out, num_workers=2, worker_index=1))
    assert shard_files(out) == shards  # worker 1 wrote nothing
    if where == "local":  # its time restored, the file is the one listed: worker 1 finishes
        os.utime(src / owned_by_1, ns=(0, json.loads((out / "records/corpus.json").read_text())
                                       ["files"][owned_by_1][1]))  # fmt: skip
        assert run(_cfg(tiny_llama_dir, root, out, num_workers=2, worker_index=1))["complete"]


def test_a_damaged_record_is_named_and_a_cache_keeps_files_beside_it(
    tmp_path, tiny_llama_dir, corpus, reference
):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    (out / "README.txt").write_text("notes about this cache")  # a user's file: fine
    run(_cfg(tiny_llama_dir, corpus, out))
    rec = sorted(out.glob("records/domains/*/*.json"))[0]
    data = json.loads(rec.read_text())
    data["sequencez"] = data.pop("sequences")
    rec.write_text(json.dumps(data))
    proc = run_cli("build-cache", *_args(tiny_llama_dir, corpus, out))
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert f"domain record {rec} is damaged (no 'sequences')" in error_line(proc)
