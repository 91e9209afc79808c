"""Cost curves of the scale design, each against the design it replaced, in one run.

  corpus     worker 0 of W in {1, 4, 16} on a synthetic >= 50 MB corpus (32 .jsonl files):
             seconds until its teacher could be called, and its reading + tokenising +
             hashing, through the real `build.own_work`; baseline: the replaced design,
             where every worker hashed every corpus byte before starting and tokenised
             the whole corpus (measured once: it did not depend on W)
  records    bookkeeping for n shards: one appended, fsynced record line per shard and
             the finaliser's read of them; baseline: the worker record rewritten whole
             (atomically, fsynced) after each shard
  startup    reader start-up (open_cache + the rank's reader + its first batch) on caches
             of 100 and 10,000 shards; baseline: a footer opened per shard
  resume     time to the first batch after resuming at 0, 1e6 and 1e7 consumed tokens;
             baseline: replaying the consumed sequences (decode and skip)
  overlap    build-cache with the hf engine on a tiny teacher (sample mode, N = 50):
             writer thread beside the teacher (default) vs writing serially (depth 0)
  prefetch   train-student data-wait fraction with the reader's prefetch thread (default
             4 batches) vs without (0)

    python benchmarks/bench_scale.py --teacher teacher/ --tiny tiny-teacher/ [--only corpus,...]

`--teacher`: a Hugging Face teacher folder (its tokenizer packs the corpus); `--tiny`: a
small causal LM with the same tokenizer (the overlap and prefetch runs). Appends to
results/scale.csv; results/scale.md is written from the rows of this run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import _results
import numpy as np

ROWS: list[dict] = []


def emit(section: str, **row):
    ROWS.append({"section": section, **row})
    print(section, row, flush=True)


# --- corpus ------------------------------------------------------------------------------


def synthetic_corpus(d: Path, files: int = 32, mb_per_file: float = 1.7) -> int:
    """Natural-looking text: the built-in documentation's sentences, reshuffled."""
    from sparsekd.cache_builder.corpus import builtin_documents

    sentences = [s.strip() for _, t in builtin_documents() for s in t.split(". ") if len(s) > 20]
    rng = random.Random(0)
    d.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(files):
        lines, size = [], 0
        while size < mb_per_file * 1e6:
            doc = ". ".join(rng.choice(sentences) for _ in range(rng.randint(5, 40))) + "."
            line = json.dumps({"text": doc}) + "\n"
            lines.append(line)
            size += len(line)
        (d / f"part-{i:03d}.jsonl").write_text("".join(lines))
        total += size
    return total


def bench_corpus(teacher: str, tmp: Path):
    from sparsekd.cache_builder.build import BuildStats, own_work
    from sparsekd.cache_builder.corpus import DomainReader
    from sparsekd.cache_builder.ledger import Records
    from sparsekd.cache_builder.packing import Unit, pack
    from sparsekd.cache_builder.plan import plan_build

    corpus = tmp / "corpus"
    size = synthetic_corpus(corpus)
    # the replaced design, once: hash every byte, then tokenise everything
    t0 = time.perf_counter()
    h = hashlib.sha256()
    for f in sorted(corpus.glob("*.jsonl")):
        h.update(f.read_bytes())
    old_hash = time.perf_counter() - t0
    plan_build(_results.build_config(teacher, tmp / "c0", corpus=[corpus], seq_len=2048))  # warm
    t0 = time.perf_counter()
    plan = plan_build(_results.build_config(teacher, tmp / "c0", corpus=[corpus], seq_len=2048))
    plan_s = time.perf_counter() - t0  # tokenizer, teacher checks, file list: both designs
    t0 = time.perf_counter()
    tokens = 0
    for d in plan.domains:
        for ids, _ in pack(
            DomainReader(d, "text", False), plan.tokenizer, plan.tokenizer.eos_token_id, 2048
        ):
            tokens += len(ids)
    old_pack = time.perf_counter() - t0
    for W in (1, 4, 16):
        cfg = _results.build_config(teacher, tmp / f"c{W}", corpus=[corpus], seq_len=2048)
        t0 = time.perf_counter()
        plan = plan_build(cfg)
        plan.worker = type(plan.worker)(0, W, "bench")
        first, mine = None, 0
        for item in own_work(plan, Records(), BuildStats()):
            if isinstance(item, Unit):
                first = first if first is not None else time.perf_counter() - t0
                mine += len(item.seq_ids) * 2048
        total = time.perf_counter() - t0
        emit(
            "corpus",
            W=W,
            corpus_mb=round(size / 1e6, 1),
            corpus_tokens=tokens,
            worker_tokens=mine,
            first_call_s=round(first, 2),
            non_teacher_s=round(total, 2),
            old_first_call_s=round(plan_s + old_hash, 2),
            old_non_teacher_s=round(plan_s + old_hash + old_pack, 2),
            ratio=round(total / (plan_s + old_hash + old_pack), 3),
        )


# --- records -------------------------------------------------------------------------------


def bench_records(tmp: Path):
    from sparsekd.cache_builder.ledger import RecordLog, read_records
    from sparsekd.schemas.manifest import atomic_write_json

    def entry(i):
        return {
            "kind": "shard",
            "domain": i // 4,
            "part": i % 4,
            "file": f"shards/00000/{i:08d}-00000.parquet",
            "first_seq": i << 32,
            "rows": 2048,
            "bytes": 123456789,
            "sha256": "ab" * 32,
            "tokens_sha256": "cd" * 32,
        }

    for n in (1000, 10000):
        d = tmp / f"rec{n}"
        log = RecordLog(d, lambda: {"fingerprint": "f"})
        t0 = time.perf_counter()
        for i in range(n):
            log.append(entry(i))
        log.close()
        append = time.perf_counter() - t0
        t0 = time.perf_counter()
        read = len(read_records(d).shards)
        read_s = time.perf_counter() - t0
        assert read == n
        emit("records", shards=n, append_s=round(append, 3), read_s=round(read_s, 3))
    for n in (1000, 2000, 4000):  # the replaced design: quadratic; measured to 4k, fitted
        d = tmp / f"old{n}"
        d.mkdir()
        rec = {"shards": []}
        t0 = time.perf_counter()
        for i in range(n):
            rec["shards"].append(entry(i))
            atomic_write_json(d / "worker.json", rec)
        emit("records_old", shards=n, rewrite_s=round(time.perf_counter() - t0, 3))


# --- reader start-up and resume --------------------------------------------------------------


def write_cache(path: Path, shards: int, rows: int, L: int, K: int, seed: int = 0):
    """A cache of random rows, written by the real writer and manifest code."""
    from sparsekd.cache_builder.encoder import from_topk
    from sparsekd.cache_builder.writer import encode_table, write_shard
    from sparsekd.schemas import format as F
    from sparsekd.schemas.manifest import ShardIndex, write_manifest
    from sparsekd.storage import open_store

    rng = np.random.default_rng(seed)
    V = 50_000
    meta = {
        "format": F.FORMAT_NAME, "mode": "topk", "k": K, "seq_len": L, "fingerprint": "f" * 64,
        "vocab_size": V, "tokenizer_hash": "t" * 64, "logprob_scale": F.LOGPROB_SCALE,
        "weighted": False, "row_group_size": F.ROW_GROUP_SIZE, "teacher": "random", "samples": None,
    }  # fmt: skip
    store, entries = open_store(path), []
    for s in range(shards):
        seq = [F.make_seq_id(s, i) for i in range(rows)]
        inp = [rng.integers(0, V, L).astype(np.int32) for _ in range(rows)]
        # K distinct ascending ids per position
        top = [
            (rng.integers(0, V - 8 * K, (L, 1)) + 7 * np.arange(K)).astype(np.int32)
            for _ in range(rows)
        ]
        sup = [from_topk(t, -rng.exponential(2, (L, K)).astype(np.float32)) for t in top]
        tab = encode_table("topk", seq, inp, [1] * rows, [-np.ones(L, np.float32)] * rows, sup)
        entries.append(write_shard(store, s, 0, tab, meta))
    write_manifest(store, meta=meta, fingerprint="f" * 64, shards=ShardIndex.from_entries(entries))
    store.close()


def bench_startup(tmp: Path):
    import pyarrow.parquet as pq

    from sparsekd import open_cache
    from sparsekd.student_train.reader import CacheReader

    for shards in (100, 10_000):
        path = tmp / f"start{shards}"
        write_cache(path, shards, rows=2, L=64, K=4)
        for _ in range(2):  # the second, warm run is reported (imports and page cache done)
            t0 = time.perf_counter()
            cache = open_cache(path)
            reader = CacheReader(cache, batch_size=2, rank=3, world_size=8, prefetch=0)
            next(reader)
            new = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(len(cache.index)):  # what the replaced reader did on every rank
                _ = pq.ParquetFile(cache.shard_path(i)).metadata.num_row_groups
            old = time.perf_counter() - t0
        emit(
            "startup",
            shards=shards,
            start_s=round(new, 3),
            old_footers_s=round(old, 3),
            ratio=round(new / old, 4),
        )


def bench_resume(tmp: Path):
    from sparsekd import open_cache
    from sparsekd.student_train.reader import CacheReader, SequenceStream, collate

    L, rows, shards = 512, 256, 80  # 10.5M tokens
    path = tmp / "resume"
    write_cache(path, shards, rows=rows, L=L, K=4, seed=1)
    cache = open_cache(path)
    B = 8
    for consumed in (0, 1_000_000, 10_000_000):
        n_batches = consumed // (B * L)
        r = CacheReader(cache, batch_size=B, prefetch=0)
        for _ in range(n_batches):  # the uninterrupted run up to the checkpoint (not timed)
            next(r)
        state, want = r.state_dict(), next(r)["seq_ids"].tolist()
        t0 = time.perf_counter()
        r2 = CacheReader(open_cache(path), batch_size=B, prefetch=0)
        r2.load_state_dict(state)
        got = next(r2)["seq_ids"].tolist()
        new = time.perf_counter() - t0
        assert got == want
        t0 = time.perf_counter()  # replay: decode the consumed sequences, then the batch
        it = SequenceStream(open_cache(path), seed=0).iterate()
        for _ in range(n_batches * B):
            next(it)
        old_batch = collate([next(it)[0] for _ in range(B)])
        old = time.perf_counter() - t0
        assert old_batch.seq_ids.tolist() == want
        emit(
            "resume", consumed_tokens=consumed, first_batch_s=round(new, 3), replay_s=round(old, 3)
        )


# --- build overlap and training prefetch ---------------------------------------------------


def bench_overlap(tiny: str, tmp: Path):
    from sparsekd.cache_builder.build import run
    from sparsekd.cache_builder.config import BuildConfig
    from sparsekd.config import build

    for run_i, depth in enumerate((0, 2, 0, 2)):  # alternated: a process's first run warms up
        cfg = {
            "teacher": {"path": tiny, "engine": "hf"},
            "corpus": {"seq_len": 512, "max_sequences": 128},
            "encoder": {"mode": "sample", "samples": 50},
            "writer": {"out": str(tmp / f"ov{run_i}"), "shard_sequences": 16, "queue_depth": depth},
            "progress": False,
        }
        t0 = time.perf_counter()
        s = run(build(BuildConfig, cfg))
        wall = time.perf_counter() - t0
        emit(
            "overlap",
            run=run_i,
            queue_depth=depth,
            tokens=s["tokens"],
            wall_s=round(wall, 2),
            teacher_s=s["teacher_s"],
            writer_s=s["writer_s"],
            tok_s=round(s["tokens"] / wall, 1),
        )


def bench_prefetch(tiny: str, teacher: str, tmp: Path):
    from sparsekd.cache_builder.build import run
    from sparsekd.config import build
    from sparsekd.student_train.config import TrainConfig
    from sparsekd.student_train.model import InitStudentConfig, init_student
    from sparsekd.student_train.trainer import run as train

    cache = tmp / "pf-cache"
    run(_results.build_config(tiny, cache, seq_len=1024, n=96, mode="sample", samples=80))
    student = init_student(
        InitStudentConfig(like=teacher, out=str(tmp / "pf-student"), layers=1, hidden=64, heads=2)
    )
    for prefetch in (4, 0):
        out = tmp / f"pf{prefetch}"
        cfg = {
            "student": str(student),
            "out": str(out),
            "steps": 24,
            "data": {"cache": str(cache), "batch_size": 4, "prefetch": prefetch},
            "progress": False,
            "tensorboard": False,
        }
        train(build(TrainConfig, cfg))
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][4:]
        emit(
            "prefetch",
            prefetch=prefetch,
            data_wait_frac=round(statistics.mean(r["data_wait_frac"] for r in recs), 4),
            tokens_per_s=round(statistics.median(r["tokens_per_s"] for r in recs), 1),
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--tiny", required=True)
    ap.add_argument("--only", default="corpus,records,startup,resume,overlap,prefetch")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    only = set(a.only.split(","))
    if "corpus" in only:
        bench_corpus(a.teacher, tmp)
    if "records" in only:
        bench_records(tmp)
    if "startup" in only:
        bench_startup(tmp)
    if "resume" in only:
        bench_resume(tmp)
    if "overlap" in only:
        bench_overlap(a.tiny, tmp)
    if "prefetch" in only:
        bench_prefetch(a.tiny, a.teacher, tmp)
    _results.append_csv("scale.csv", [{"row": json.dumps(r)} for r in ROWS])
    (_results.RESULTS / "scale.json").write_text(json.dumps(ROWS, indent=1) + "\n")


if __name__ == "__main__":
    main()
