"""The shard writer's zstd level: bytes/token against write throughput, in one run.

Real SmolLM2-135M-Instruct output (hf engine, exact) over the built-in corpus, encoded once
per mode (top-K 8; sampled N = 50, ~17 distinct ids per position), then written as shards
(`writer.shard_bytes`: the real encoding, checksums and footer) at each zstd level. The
writer's throughput is what must keep up with the teacher (docs/scale.md); the level
sparsekd uses is `schemas.format.ZSTD_LEVEL`.

    python benchmarks/bench_zstd_level.py --teacher teacher/ [--sequences 64 --seq-len 512]

Appends to results/zstd_level.csv and writes results/zstd_level.md.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import _results

LEVELS = (1, 3, 6, 9, 12)


def main():
    from sparsekd.cache_builder.writer import shard_bytes
    from sparsekd.schemas import format as F

    ap = _results.parser(sequences=64, seq_len=512)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-zstd-"))
    rows = []
    for name, _, cache in _results.topk_and_sample_caches(a, tmp):
        tables = [
            cache.read_group_table(int(i), int(g))[0] for i, g in zip(*cache.row_groups()[:2])
        ]
        import pyarrow as pa

        table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
        tokens = table.num_rows * a.seq_len
        meta = {**cache.meta, "domain": 0, "part": 0, "first_seq": 0, "rows": table.num_rows}
        for level in LEVELS:
            F.PARQUET_OPTIONS["compression_level"] = level
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                data, _ = shard_bytes(table, meta)
                times.append(time.perf_counter() - t)
            sec = statistics.median(times)
            rows.append(
                {
                    "mode": name,
                    "level": level,
                    "tokens": tokens,
                    "bytes_per_token": round(len(data) / tokens, 2),
                    "write_tok_s": round(tokens / sec),
                    "write_mb_s": round(len(data) / sec / 1e6, 1),
                }
            )
            print(rows[-1], flush=True)
    _results.append_csv("zstd_level.csv", rows)
    base = {r["mode"]: r for r in rows if r["level"] == 9}
    md = [
        "# zstd level of the shards: bytes against write throughput (one run)",
        "",
        f"Machine: {_results.machine()}; commit {_results.commit()}. SmolLM2-135M-Instruct, "
        f"built-in corpus, {a.sequences} sequences x {a.seq_len} tokens; write = encoding, "
        "row-group checksums and the Parquet file in memory (`writer.shard_bytes`), median "
        f"of {a.repeats}. Command: `python benchmarks/bench_zstd_level.py --teacher teacher/`.",
        "",
        "| mode | zstd level | bytes/token | vs level 9 | write tok/s | vs level 9 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = base[r["mode"]]
        md.append(
            f"| {r['mode']} | {r['level']} | {r['bytes_per_token']} | "
            f"{r['bytes_per_token'] / b['bytes_per_token']:.3f} | {r['write_tok_s']} | "
            f"{r['write_tok_s'] / b['write_tok_s']:.2f} |"
        )
    (_results.RESULTS / "zstd_level.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
