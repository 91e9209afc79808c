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
    from transformers import AutoTokenizer

    from sparsekd.cache_builder.build import BuildConfig, EncoderConfig, WriterConfig, run
    from sparsekd.cache_builder.corpus import CorpusConfig, pack_sequences
    from sparsekd.cache_builder.engines import TeacherConfig, make_engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args()
    corpus = CorpusConfig(seq_len=a.seq_len, max_sequences=a.sequences)
    tok = AutoTokenizer.from_pretrained(a.teacher)
    tokens = sum(len(s[1]) for s in pack_sequences(corpus, tok, tok.eos_token_id))
    teacher = TeacherConfig(path=a.teacher, engine="vllm")
    tmp = Path(tempfile.mkdtemp(prefix="bench-paths-"))
    rates = {}
    try:
        for path in ("logprob", "hidden"):
            engine = make_engine(teacher, k=a.k, seq_len=a.seq_len, path=path)
            try:
                enc = EncoderConfig(mode="topk", k=a.k, path=path)
                warm = CorpusConfig(seq_len=a.seq_len, max_sequences=2)
                run(
                    BuildConfig(
                        teacher=teacher,
                        corpus=warm,
                        encoder=enc,
                        progress=False,
                        writer=WriterConfig(out=str(tmp / f"w-{path}")),
                    ),
                    engine=engine,
                )
                t = time.perf_counter()
                run(
                    BuildConfig(
                        teacher=teacher,
                        corpus=corpus,
                        encoder=enc,
                        progress=False,
                        writer=WriterConfig(out=str(tmp / path), shard_sequences=16),
                    ),
                    engine=engine,
                )
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
