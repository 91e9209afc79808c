"""build-cache throughput against the bare vLLM prefill of the same engine, in one run.

One vLLM engine (SmolLM2-135M-Instruct, log-prob path) serves both sides:
- baseline: `prefill` -- the same prompts, no log-probs returned, nothing written;
- candidate: `sparsekd.cache_builder.build.run` -- the whole build (packing, prompt
  log-probs, encoding, zstd Parquet, checksums, manifest) into a fresh cache.
Each K is measured as prefill, build, prefill; the ratio divides build tokens/s by the mean
of the two prefill rates around it. Bytes/token come from the caches written.

    python benchmarks/bench_build_cache.py --teacher teacher/ [--sequences 32 --seq-len 512]

Appends to benchmarks/results/build_cache.csv and rewrites build_cache.md.
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
    from sparsekd.cache_builder.engines import VllmEngine
    from sparsekd.cache_builder.plan import versions as _versions
    from sparsekd.cache_builder.teacher import TeacherConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ks", default="8,64")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    ids, nxt = _results.builtin_sequences(args.teacher, args.seq_len, args.sequences)
    tokens = sum(len(x) for x in ids)

    teacher = TeacherConfig(path=args.teacher, engine="vllm")
    engine = VllmEngine(teacher, k=max(ks), seq_len=args.seq_len)
    engine.prefill(ids[:4], nxt[:4])  # warm-up

    def prefill_rate():
        t = time.perf_counter()
        engine.prefill(ids, nxt)
        return tokens / (time.perf_counter() - t)

    def vllm_logprob_rate(k):
        # vLLM alone with prompt_logprobs=k: what the engine costs before sparsekd's code
        t = time.perf_counter()
        engine.llm.generate(engine._prompts(ids, nxt), engine._sampling_params(k), use_tqdm=False)
        return tokens / (time.perf_counter() - t)

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-build-"))
    try:
        for k in ks:
            before = prefill_rate()
            logprob_only = vllm_logprob_rate(k)
            out = tmp / f"k{k}"
            cfg = _results.build_config(
                args.teacher, out, engine="vllm", seq_len=args.seq_len, n=args.sequences, k=k
            )
            t = time.perf_counter()
            summary = run(cfg, engine=engine)
            build = tokens / (time.perf_counter() - t)
            after = prefill_rate()
            base = (before + after) / 2
            rows.append(
                {
                    "k": k,
                    "tokens": tokens,
                    "prefill_tok_s": round(base, 1),
                    "vllm_logprobs_tok_s": round(logprob_only, 1),
                    "build_tok_s": round(build, 1),
                    "ratio": round(build / base, 3),
                    "bytes_per_token": summary["bytes_per_token"],
                }
            )
            print(rows[-1], flush=True)
    finally:
        engine.close()
        shutil.rmtree(tmp, ignore_errors=True)

    v = _versions()
    machine = _results.machine()
    commit = _results.commit()
    _results.append_csv(
        "build_cache.csv",
        [
            {
                "vllm": v.get("vllm"),
                "torch": v.get("torch"),
                "teacher": "SmolLM2-135M-Instruct",
                "seq_len": args.seq_len,
                **r,
            }
            for r in rows
        ],
    )
    md = (
        [
            "# build-cache throughput vs bare vLLM prefill (same engine, same run)",
            "",
            f"Machine: {machine}; vllm {v.get('vllm')}, torch {v.get('torch')}; commit {commit}.",
            f"Teacher SmolLM2-135M-Instruct (float32), built-in corpus, {args.sequences} sequences "
            f"x {args.seq_len} tokens. Command: `python benchmarks/bench_build_cache.py "
            f"--teacher teacher/ --sequences {args.sequences} --seq-len {args.seq_len}`.",
            "",
            "vLLM logprobs = `generate` with `prompt_logprobs=K` alone (no sparsekd code); "
            "build-cache = the whole job; ratio = build-cache / prefill.",
            "",
            "| K | prefill tok/s | vLLM logprobs tok/s | build-cache tok/s | ratio | bytes/token |",
            "|---|---|---|---|---|---|",
        ]
        + [
            f"| {r['k']} | {r['prefill_tok_s']} | {r['vllm_logprobs_tok_s']} | "
            f"{r['build_tok_s']} | {r['ratio']} | "
            f"{r['bytes_per_token']} |"
            for r in rows
        ]
        + [""]
    )
    (_results.RESULTS / "build_cache.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
