"""Top-K build-cache throughput: vLLM's log-prob path vs the hidden-state path, one run.

Both build the same top-K cache (SmolLM2-135M-Instruct, built-in corpus) through
`build.run` with their own vLLM engine, started once and measured after a warm-up; the
ratio says which path `--path auto` should take for top-K on this machine.

    python benchmarks/bench_paths.py --teacher teacher/ [--sequences 32 --seq-len 512 --k 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import _results

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def main():
    from sparsekd.cache_builder.build import run
    from sparsekd.cache_builder.engines import make_engine
    from sparsekd.cache_builder.teacher import TeacherConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args()
    ids, _ = _results.builtin_sequences(a.teacher, a.seq_len, a.sequences)
    tokens = sum(len(x) for x in ids)
    teacher = TeacherConfig(path=a.teacher, engine="vllm")
    tmp = Path(tempfile.mkdtemp(prefix="bench-paths-"))
    rates = {}
    try:
        for path in ("logprob", "hidden"):
            engine = make_engine(teacher, k=a.k, seq_len=a.seq_len, path=path)
            try:
                enc = dict(mode="topk", k=a.k, path=path)
                warm = _results.build_config(
                    a.teacher, tmp / f"w-{path}", engine="vllm", seq_len=a.seq_len, n=2, **enc
                )
                run(warm, engine=engine)
                t = time.perf_counter()
                cfg = _results.build_config(
                    a.teacher, tmp / path, engine="vllm", seq_len=a.seq_len, n=a.sequences, **enc
                )
                run(cfg, engine=engine)
                rates[path] = tokens / (time.perf_counter() - t)
            finally:
                engine.close()
            print(path, round(rates[path], 1), "tok/s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row = {
        "k": a.k,
        "seq_len": a.seq_len,
        "tokens": tokens,
        "logprob_path_tok_s": round(rates["logprob"], 1),
        "hidden_path_tok_s": round(rates["hidden"], 1),
        "hidden_over_logprob": round(rates["hidden"] / rates["logprob"], 3),
    }
    print(row)
    _results.append_csv("build_paths.csv", [row])


if __name__ == "__main__":
    main()
