"""Caches on an object store against the local disk, in one run, with the defaults a user
gets: a real S3 endpoint (moto's server on 127.0.0.1) behind a proxy that adds a round-trip
latency to every request (tests/s3.py).

  reader   training-reader throughput (sequences decoded, checked and collated into
           batches, tokens/s, after the first batch; the time to that first batch
           apart) from the local disk, and from S3 at +0, +20 and +100 ms per request,
           default prefetch and read-ahead; target >= 0.9x of local at 20 ms. The CPU
           seconds of the reader (and proxy) and of the S3 server are reported: on a
           2-core machine the server and proxy share the cores the reader decodes on
  build    build-cache with the tiny teacher (hf engine) to a local folder, to S3 directly
           and to S3 at +20 ms per request: tokens/s
  bytes    bytes fetched per rank (4 ranks, one epoch each) against the rank's share:
           its row groups' bytes, plus the footers of the shards it opens and the
           manifest and shard index every rank reads

    python benchmarks/bench_storage.py --tiny tiny-teacher/ [--only reader,build,bytes]

`--tiny`: a small causal LM with a tokenizer (e.g. `sparsekd init-student --like teacher/
--out tiny-teacher/ --layers 2 --hidden 64 --heads 2`). Appends to results/storage.csv and
writes results/storage.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _results
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/s3.py: the servers
from tests.s3 import DelayProxy, S3Server  # noqa: E402

ROWS: list[dict] = []


def emit(section: str, **row):
    ROWS.append({"section": section, **row})
    print(section, row, flush=True)


def use_endpoint(env: dict) -> None:
    """Point this process's S3 clients at an endpoint (stores are cached per URI: each
    endpoint gets its own buckets)."""
    os.environ.update(env)


def copy_cache(src: str, dst: str) -> None:
    """Every object of a cache, through the storage seam."""
    from sparsekd.storage import open_store

    a, b = open_store(src), open_store(dst)
    for name in a.list(""):
        b.put(name, a.read(name))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reader_rate(uri: str, batches: int, batch_size: int = 8) -> dict:
    """A fresh reader with the defaults: seconds to its first batch (open_cache, the
    rank's reader, the first window), then tokens/s over the next `batches` batches."""
    from sparsekd import open_cache
    from sparsekd.student_train.reader import CacheReader

    t0 = time.perf_counter()
    reader = CacheReader(open_cache(uri), batch_size=batch_size)
    next(reader)
    t1 = time.perf_counter()
    tokens = sum(int(next(reader)["input_ids"].numel()) for _ in range(batches))
    t2 = time.perf_counter()
    reader.close()
    return {"first_batch_s": round(t1 - t0, 3), "tok_s": round(tokens / (t2 - t1))}


def bench_reader(s3: S3Server, tmp: Path, bucket_of):
    """Sequences of 2,048 tokens, top-8: row groups of ~0.8 MB, one GET each."""
    from bench_scale import write_cache

    local = tmp / "read-cache"
    write_cache(local, shards=24, rows=64, L=2048, K=8)  # 3.1M tokens, ~3.5 MB shards
    batches = 24 * 64 // 8 - 8  # one epoch, but the first batch and what prefetch holds
    reader_rate(str(local), batches)  # warm: imports, page cache
    pid = os.getpid()
    c0 = cpu_s(pid)
    base = reader_rate(str(local), batches)
    emit("reader", where="local", **base, ratio=1.0, reader_cpu_s=round(cpu_s(pid) - c0, 2))
    for delay in (0.0, 0.02, 0.1):
        with DelayProxy(s3.port, delay_s=delay) as proxy:
            use_endpoint(proxy.env)
            uri = f"{bucket_of(s3)}/cache"
            copy_cache(str(local), uri)
            proxy.reset()
            c0, s0 = cpu_s(pid), cpu_s(s3.proc.pid)
            r = reader_rate(uri, batches)
            emit(
                "reader",
                where=f"s3 +{int(delay * 1000)} ms",
                **r,
                ratio=round(r["tok_s"] / base["tok_s"], 3),
                requests=proxy.requests,
                mb_fetched=round(proxy.bytes_down / 1e6, 2),
                reader_and_proxy_cpu_s=round(cpu_s(pid) - c0, 2),
                server_cpu_s=round(cpu_s(s3.proc.pid) - s0, 2),
            )


def bench_build(s3: S3Server, tmp: Path, tiny: str, bucket_of):
    from bench_scale import synthetic_corpus

    from sparsekd.cache_builder.build import run

    corpus = tmp / "build-corpus"
    synthetic_corpus(corpus, files=8, mb_per_file=0.15)
    cfg = lambda out: _results.build_config(tiny, out, corpus=[corpus], seq_len=512)  # noqa: E731
    run(cfg(tmp / "warm"))  # imports and the model's first forward
    rates = {}
    for name, delay in (("local", None), ("s3", 0.0), ("s3 +20 ms", 0.02)):
        proxy = None
        if delay is None:
            out = str(tmp / "built-local")
        else:
            proxy = DelayProxy(s3.port, delay_s=delay)
            use_endpoint(proxy.env)
            out = f"{bucket_of(s3)}/cache"
        t0 = time.perf_counter()
        s = run(cfg(out))
        dt = time.perf_counter() - t0
        rates[name] = s["tokens"] / dt
        emit(
            "build",
            where=name,
            tokens=s["tokens"],
            shards=s["shards"],
            seconds=round(dt, 2),
            tok_s=round(rates[name]),
            ratio=round(rates[name] / rates["local"], 3),
            requests=proxy.requests if proxy else None,
        )
        if proxy:
            proxy.close()


def bench_bytes(s3: S3Server, tmp: Path, bucket_of):
    from bench_scale import write_cache

    from sparsekd import open_cache
    from sparsekd.schemas.manifest import MANIFEST
    from sparsekd.student_train.reader import SequenceStream

    local = tmp / "bytes-cache"
    write_cache(local, shards=16, rows=256, L=512, K=8, seed=3)
    with DelayProxy(s3.port) as proxy:
        use_endpoint(proxy.env)
        uri = f"{bucket_of(s3)}/cache"
        copy_cache(str(local), uri)
        world = 4
        for rank in range(world):
            proxy.reset()
            cache = open_cache(uri)
            stream = SequenceStream(cache, stream=rank, streams=world)
            n = sum(1 for _ in stream.iterate(epochs=1))
            fetched, requests = proxy.bytes_down, proxy.requests
            groups, footers = share_bytes(open_cache(str(local)), stream)
            index = (local / MANIFEST).stat().st_size + sum(
                f.stat().st_size for f in (local / "index").glob("*.parquet")
            )
            emit(
                "bytes",
                rank=rank,
                sequences=n,
                fetched=fetched,
                requests=requests,
                row_groups=groups,
                footers=footers,
                index=index,
                ratio_to_share=round(fetched / (groups + footers + index), 4),
                ratio_to_groups=round(fetched / groups, 4),
            )


def share_bytes(cache, stream) -> tuple[int, int]:
    """The bytes of the stream's row groups, and of the footers of its shards as pyarrow
    reads them (the last 64 KiB, or the whole footer when it is longer)."""
    groups = 0
    shards = set()
    for i, g in zip(stream.shard.tolist(), stream.group.tolist()):
        rg = cache.shard(i).metadata.row_group(g)
        groups += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
        shards.add(i)
    footers = 0
    for i in shards:
        md = cache.shard(i).metadata
        footers += max(min(64 << 10, int(cache.index.bytes[i])), md.serialized_size + 8)
    return groups, footers


def markdown() -> str:
    lines = [
        "# Caches on an object store (benchmarks/bench_storage.py)",
        "",
        f"Machine: {_results.machine()}; commit {_results.commit()}. S3: moto's server on "
        "127.0.0.1 behind a proxy adding the stated latency to every request.",
        "",
    ]
    for section, cols in (
        ("reader", ["where", "first_batch_s", "tok_s", "ratio", "requests", "mb_fetched",
                    "reader_cpu_s", "reader_and_proxy_cpu_s", "server_cpu_s"]),
        ("build", ["where", "tokens", "shards", "seconds", "tok_s", "ratio", "requests"]),
        ("bytes", ["rank", "sequences", "fetched", "requests", "row_groups", "footers", "index",
                   "ratio_to_share", "ratio_to_groups"]),
    ):  # fmt: skip
        rows = [r for r in ROWS if r["section"] == section]
        if not rows:
            continue
        lines += [f"## {section}", "", "| " + " | ".join(cols) + " |"]
        lines.append("|" + "---|" * len(cols))
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", required=True)
    ap.add_argument("--only", default="reader,build,bytes")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    only = set(a.only.split(","))
    counter = iter(range(10**6))
    bucket_of = lambda s3: s3.make_bucket(f"bench-{os.getpid()}-{next(counter)}")  # noqa: E731
    with S3Server() as s3:
        np.random.seed(0)
        if "reader" in only:
            bench_reader(s3, tmp, bucket_of)
        if "build" in only:
            bench_build(s3, tmp, a.tiny, bucket_of)
        if "bytes" in only:
            bench_bytes(s3, tmp, bucket_of)
    _results.append_csv("storage.csv", [{"row": json.dumps(r)} for r in ROWS])
    (_results.RESULTS / "storage.md").write_text(markdown())


if __name__ == "__main__":
    main()
