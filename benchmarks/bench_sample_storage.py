"""Storage of RS-KD sample caches on natural text: mean distinct ids and bytes for N draws.

SmolLM2-135M-Instruct (hidden-state path, hf engine for a fast start: the same teacher head
as vLLM's hidden path) over a slice of the built-in corpus, N in {16, 50, 200}. "All-in"
bytes per entry divides the whole cache (input ids, token log-probs, metadata included) by
the stored (id, count) entries. Target (issue 3): <= 2.5 at N = 50 (the paper stores 3).

    python benchmarks/bench_sample_storage.py --teacher teacher/ [--sequences 32 --seq-len 256]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import _results

from sparsekd import open_cache
from sparsekd.cache_builder.build import run
from sparsekd.inspection import cache_stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ns", default="16,50,200")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    rows = []
    try:
        for n in (int(x) for x in a.ns.split(",")):
            out = tmp / f"n{n}"
            run(
                _results.build_config(
                    a.teacher, out, seq_len=a.seq_len, n=a.sequences, mode="sample", samples=n
                )
            )
            s = cache_stats(open_cache(out))
            entries = s["mean_support"] * s["tokens"]
            rows.append(
                {
                    "N": n,
                    "tokens": s["tokens"],
                    "mean_distinct": round(s["mean_support"], 2),
                    "bytes_per_token": round(s["bytes_per_token"], 2),
                    "bytes_per_entry_all_in": round(s["bytes"] / entries, 3),
                }
            )
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _results.append_csv("sample_storage.csv", rows)
    md = (
        [
            "# RS-KD sample caches: storage on natural text (SmolLM2-135M-Instruct)",
            "",
            f"Built-in corpus, {a.sequences} x {a.seq_len} tokens, iid sampler, tau 1; commit "
            f"{_results.commit()}, {_results.machine()}. Command: `python "
            "benchmarks/bench_sample_storage.py --teacher teacher/`.",
            "",
            "| N | mean distinct ids | bytes/token | bytes per (id, count) entry, all-in |",
            "|---|---|---|---|",
        ]
        + [
            f"| {r['N']} | {r['mean_distinct']} | {r['bytes_per_token']} | "
            f"{r['bytes_per_entry_all_in']} |"
            for r in rows
        ]
        + [""]
    )
    (_results.RESULTS / "sample_storage.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
