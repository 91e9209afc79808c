"""Cost curves of the scale design, each against the design it replaced, in one run.

  corpus     worker 0 of W in {1, 4, 16} on a synthetic >= 50 MB corpus (32 .jsonl files):
             seconds until its teacher could be called, and its reading + tokenising +
             hashing, through the real `build.own_work`; baseline: the replaced design,
             where every worker hashed every corpus byte before starting and tokenised
             the whole corpus (measured once: it did not depend on W)
  corpus_zst worker 0 of W in {1, 4, 16} on the same corpus as one .jsonl.zst: its domains
             are ranges of the decompressed stream; baseline: the whole file as one
             domain (the replaced design: one worker read it at every W)
  records    bookkeeping for n shards: one published record object per shard (and per
             domain), the finaliser's read; baselines: the append-only log of the
             previous design, and the worker record rewritten whole after each shard
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


def worker0_cost(cfg, W: int) -> tuple[float, float, int]:
    """(seconds to its first unit, seconds in all, tokens) of worker 0 of W: its reading,
    tokenising and hashing, through the real `build.own_work` (no teacher)."""
    from sparsekd.cache_builder.build import BuildStats, DomainEnd, own_work
    from sparsekd.cache_builder.ledger import Ledger
    from sparsekd.cache_builder.plan import plan_build
    from sparsekd.storage import open_store

    t0 = time.perf_counter()
    plan = plan_build(cfg)
    plan.worker = type(plan.worker)(0, W, "bench")
    first, mine = None, 0
    for item in own_work(plan, Ledger(open_store(cfg.writer.out), plan), BuildStats()):
        if not isinstance(item, DomainEnd):
            first = first if first is not None else time.perf_counter() - t0
            mine += len(item[0].seq_ids) * cfg.corpus.seq_len
    return first, time.perf_counter() - t0, mine


def bench_corpus(teacher: str, tmp: Path):
    from sparsekd.cache_builder.corpus import DomainReader
    from sparsekd.cache_builder.packing import pack
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
        for ids, *_ in pack(
            DomainReader(d, "text", False), plan.tokenizer, plan.tokenizer.eos_token_id, 2048
        ):
            tokens += len(ids)
    old_pack = time.perf_counter() - t0
    for W in (1, 4, 16):
        cfg = _results.build_config(teacher, tmp / f"c{W}", corpus=[corpus], seq_len=2048)
        first, total, mine = worker0_cost(cfg, W)
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


def bench_corpus_zst(teacher: str, tmp: Path):
    """Worker 0 of W on one large .jsonl.zst (the corpus above in one file): its domains
    are ranges of the decompressed stream; the replaced design read the whole file as one
    domain, so one worker did everything at every W. domain_bytes 2 MiB gives this 54 MB
    file the domains per byte that the default 32 MiB gives a 0.9 GB one."""
    import dataclasses

    import zstandard

    from sparsekd.cache_builder.corpus import Domain, DomainReader, resolve_sources
    from sparsekd.cache_builder.packing import pack
    from sparsekd.cache_builder.plan import plan_build

    parts = tmp / "corpus"
    if not parts.exists():
        synthetic_corpus(parts)
    raw = b"".join(f.read_bytes() for f in sorted(parts.glob("*.jsonl")))
    one = tmp / "one" / "corpus.jsonl.zst"
    one.parent.mkdir(exist_ok=True)
    one.write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
    cfg = _results.build_config(teacher, tmp / "z0", corpus=[one], seq_len=2048)
    cfg = dataclasses.replace(cfg, corpus=dataclasses.replace(cfg.corpus, domain_bytes=2 << 20))
    plan = plan_build(cfg)
    t0 = time.perf_counter()  # the replaced design: the whole file, one domain
    (src,) = resolve_sources((str(one),))
    tok = plan.tokenizer
    old_tokens = sum(
        len(ids)
        for ids, *_ in pack(DomainReader(Domain(0, src, 0, 0, None), "text", False), tok,
                           tok.eos_token_id, 2048)
    )  # fmt: skip
    old = time.perf_counter() - t0
    for W in (1, 4, 16):
        out = tmp / f"z{W}"
        first, total, mine = worker0_cost(
            dataclasses.replace(cfg, writer=dataclasses.replace(cfg.writer, out=str(out))), W
        )
        emit(
            "corpus_zst",
            W=W,
            zst_mb=round(one.stat().st_size / 1e6, 1),
            text_mb=round(len(raw) / 1e6, 1),
            domains=len(plan.domains),
            corpus_tokens=old_tokens,
            worker_tokens=mine,
            first_call_s=round(first, 2),
            non_teacher_s=round(total, 2),
            old_non_teacher_s=round(old, 2),
            ratio=round(total / old, 3),
        )


# --- records -------------------------------------------------------------------------------


def bench_records(tmp: Path):
    """Bookkeeping for n shards: one record object per shard (and one per domain of 4
    shards, carrying its shards' entries), each published by the storage seam (staged,
    fsynced, linked into place), and the finaliser's read of the domain records; baselines
    in the same run: the append-only log of the previous design (one fsynced line per
    shard), and the design before it (the worker's record rewritten whole per shard)."""
    import json as _json
    import os

    from sparsekd.cache_builder.ledger import (
        domain_record_name,
        read_many,
        unit_record_name,
    )
    from sparsekd.storage import atomic_write_file, json_bytes, open_store

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
        store = open_store(tmp / f"rec{n}")
        t0 = time.perf_counter()
        for i in range(n):
            store.put_new(unit_record_name(i // 4, i % 4), json_bytes(entry(i)))
            if i % 4 == 3:
                units = [entry(j) for j in range(i - 3, i + 1)]
                store.put_new(domain_record_name(i // 4), json_bytes({"shards": units}))
        put = time.perf_counter() - t0
        t0 = time.perf_counter()
        read = sum(
            len(r["shards"]) for r in read_many(store, list(store.list("records/domains/")), "r")
        )
        read_s = time.perf_counter() - t0
        assert read == n
        log = tmp / f"log{n}.jsonl"  # the previous design, in the same run
        t0 = time.perf_counter()
        with open(log, "a") as fh:
            for i in range(n):
                fh.write(_json.dumps(entry(i), sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        log_s = time.perf_counter() - t0
        emit(
            "records",
            shards=n,
            put_s=round(put, 3),
            read_s=round(read_s, 3),
            old_log_append_s=round(log_s, 3),
            ratio=round(put / log_s, 2),
        )
    for n in (1000, 2000, 4000):  # the design before: quadratic; measured to 4k
        d = tmp / f"old{n}"
        d.mkdir()
        rec = {"shards": []}
        t0 = time.perf_counter()
        for i in range(n):
            rec["shards"].append(entry(i))
            atomic_write_file(d / "worker.json", json_bytes(rec))
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
        mask = [np.ones(L, bool)] * rows
        tab = encode_table(
            "topk", seq, inp, [1] * rows, mask, [-np.ones(L, np.float32)] * rows, sup
        )
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
        state, want = r.state_dict(), next(r)["seq_id"].tolist()
        t0 = time.perf_counter()
        r2 = CacheReader(open_cache(path), batch_size=B, prefetch=0)
        r2.load_state_dict(state)
        got = next(r2)["seq_id"].tolist()
        new = time.perf_counter() - t0
        assert got == want
        t0 = time.perf_counter()  # replay: decode the consumed sequences, then the batch
        it = SequenceStream(open_cache(path), seed=0).iterate()
        for _ in range(n_batches * B):
            next(it)
        old_batch = collate([next(it)[0] for _ in range(B)])
        old = time.perf_counter() - t0
        assert old_batch.seq_id.tolist() == want
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
    ap.add_argument("--only", default="corpus,corpus_zst,records,startup,resume,overlap,prefetch")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    only = set(a.only.split(","))
    if "corpus" in only:
        bench_corpus(a.teacher, tmp)
    if "corpus_zst" in only:
        bench_corpus_zst(a.teacher, tmp)
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
