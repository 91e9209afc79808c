"""What the read-time checks cost and what they catch, on real shards, in one run.

Cost: read throughput (tokens/s) of a real SmolLM2 cache (hf engine; top-K 8 and sampled
N = 50) through `open_cache` with every check (page CRC32 verification, row-group content
checksums, structure checks, footer against manifest) against the same decode with none
(a plain ParquetFile, the same column conversion and Sequence objects), and through the
training reader's batches (collate) with checks. The cost of opening a shard with its
footer's digest compared against the index, and without that comparison.

Detection: one bit flipped (x ^ 0x10) at each of many offsets of one shard (evenly spaced,
plus every byte of the footer); each flip is read back through `open_cache`: detected (a
CacheError), harmless (the decoded rows are identical) or silent (different rows, no
error). The claim is zero silent flips.

    python benchmarks/bench_read_checks.py --teacher teacher/ [--sequences 64 --seq-len 512]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import _results
import numpy as np


def _unchecked_tokens(cache) -> int:
    import pyarrow.parquet as pq

    from sparsekd.schemas import format as F

    n = 0
    for i in range(len(cache.index)):
        pf = pq.ParquetFile(cache.shard_path(i))
        for g in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(g)
            seqs = cache._sequences(F.column_arrays(table), table.num_rows)
            n += sum(len(s.input_ids) for s in seqs) + sum(len(s.targets()[1]) * 0 for s in seqs)
    return n


def _checked_tokens(path) -> int:
    from sparsekd import open_cache

    return sum(len(s.input_ids) + len(s.targets()[1]) * 0 for s in open_cache(path))


def _rate(fn, tokens, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return tokens / statistics.median(times)


def _sweep(path: Path, shard: Path, offsets) -> dict:
    from sparsekd import open_cache
    from sparsekd.errors import CacheError

    def rows():
        return [
            (
                s.seq_id,
                s.input_ids.tobytes(),
                s.next_token,
                s.token_logprobs.tobytes(),
                *[a.tobytes() for a in s.targets()],
            )
            for s in open_cache(path)
        ]

    clean, original = rows(), shard.read_bytes()
    out = {"detected": 0, "harmless": 0, "silent": 0}
    for off in offsets:
        data = bytearray(original)
        data[off] ^= 0x10
        shard.write_bytes(bytes(data))
        try:
            got = rows()
        except CacheError:
            out["detected"] += 1
        else:
            out["harmless" if got == clean else "silent"] += 1
    shard.write_bytes(original)
    return out


def _open_cost(path, repeats: int = 20) -> tuple[float, float]:
    """Microseconds per shard opening (footer read, metadata checks), with the footer's
    digest compared against the index (schema 3) and without that comparison (the open
    before it), alternated in one run; best of `repeats`."""
    from sparsekd import open_cache
    from sparsekd.schemas.cache import ShardFile

    cache = open_cache(path)
    digests, n = cache.index.footer_crc, len(cache.index)
    best = {True: float("inf"), False: float("inf")}
    for _ in range(repeats):
        for check in (True, False):
            cache.index.footer_crc = digests if check else None
            t0 = time.perf_counter()
            for i in range(n):
                ShardFile(cache, i)
            best[check] = min(best[check], (time.perf_counter() - t0) / n * 1e6)
    return best[True], best[False]


def main():
    from sparsekd import open_cache
    from sparsekd.student_train.reader import CacheReader

    ap = _results.parser(sequences=64, seq_len=512)
    ap.add_argument("--offsets", type=int, default=2000)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-checks-"))
    rows = []
    for name, out, cache in _results.topk_and_sample_caches(a, tmp):
        tokens = cache.num_tokens
        unchecked = _rate(lambda c=cache: _unchecked_tokens(c), tokens)
        checked = _rate(lambda o=out: _checked_tokens(o), tokens)

        def batches(o=out):
            r = CacheReader(open_cache(o), batch_size=8, prefetch=0, shuffle_buffer=16)
            for _ in range(len(open_cache(o)) // 8):
                next(r)

        batch_rate = _rate(batches, (len(cache) // 8) * 8 * a.seq_len)
        shard = Path(cache.shard_path(0))
        size = shard.stat().st_size
        open_with, open_without = _open_cost(out)
        footer = range(max(0, size - 4096), size)
        offsets = sorted(
            set(np.linspace(0, size - 1, a.offsets).astype(int).tolist()) | set(footer)
        )
        sweep = _sweep(out, shard, offsets)
        rows.append(
            {
                "mode": name,
                "tokens": tokens,
                "read_unchecked_tok_s": round(unchecked),
                "read_checked_tok_s": round(checked),
                "checked_over_unchecked": round(checked / unchecked, 3),
                "batches_checked_tok_s": round(batch_rate),
                "open_us_with_footer_digest": round(open_with, 1),
                "open_us_without": round(open_without, 1),
                "shard_bytes": size,
                "flips": len(offsets),
                **sweep,
                "detection_rate": round(sweep["detected"] / len(offsets), 4),
            }
        )
        print(rows[-1], flush=True)
    _results.append_csv("read_checks.csv", rows)


if __name__ == "__main__":
    main()
