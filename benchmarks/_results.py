"""What every benchmark records beside its figures: commit, machine, and a CSV to append to."""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
from pathlib import Path

# SPARSEKD_RESULTS redirects every figure (benchmarks/gpu/run_all.sh writes to its own folder)
RESULTS = Path(os.environ.get("SPARSEKD_RESULTS") or Path(__file__).parent / "results")


def commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{platform.machine()} CPU x{os.cpu_count()} (no GPU)"


def append_csv(name: str, rows: list[dict]) -> Path:
    """Append dict rows to results/NAME (header written on first use), with commit/machine."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    rows = [{"commit": commit(), "machine": machine(), **r} for r in rows]
    fields = list(dict.fromkeys(k for r in rows for k in r))  # rows of several sections
    if path.exists():
        with open(path, newline="") as fh:
            old = csv.DictReader(fh)
            have = list(old.fieldnames or [])
            earlier = list(old)
        if have != fields:  # a benchmark gained or lost a column: one header for all rows
            union = have + [f for f in fields if f not in have]
            with open(path, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=union, restval="")
                w.writeheader()
                w.writerows(earlier)
            fields = union
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, restval="")
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def builtin_sequences(teacher: str, seq_len: int, n: int):
    """The first n packed sequences of the built-in corpus: (input_ids list, next tokens)."""
    from transformers import AutoTokenizer

    from sparsekd.cache_builder.corpus import builtin_documents
    from sparsekd.cache_builder.packing import pack

    tok = AutoTokenizer.from_pretrained(teacher)
    seqs = list(pack((t for _, t in builtin_documents()), tok, tok.eos_token_id, seq_len, n))
    return [s[0] for s in seqs], [s[1] for s in seqs]


def build_config(teacher: str, out, *, engine="hf", corpus=None, seq_len=256, n=None, **enc):
    """A BuildConfig from the few settings the benchmarks vary (shards of 16 sequences)."""
    from sparsekd.cache_builder.config import BuildConfig
    from sparsekd.config import build

    corpus_cfg = {"seq_len": seq_len, "max_sequences": n}
    if corpus is not None:
        corpus_cfg["paths"] = [str(c) for c in corpus]
    return build(
        BuildConfig,
        {
            "teacher": {"path": str(teacher), "engine": engine},
            "corpus": corpus_cfg,
            "encoder": enc,
            "writer": {"out": str(out), "shard_sequences": 16},
            "progress": False,
        },
    )


def parser(sequences: int, seq_len: int) -> argparse.ArgumentParser:
    """The options every cache-building benchmark takes."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--sequences", type=int, default=sequences)
    ap.add_argument("--seq-len", type=int, default=seq_len)
    return ap


def topk_and_sample_caches(a, tmp: Path):
    """Build the two default-user caches (top-8 on the hidden-state path, sample N = 50)
    of `a.sequences` x `a.seq_len` tokens under `tmp`; yield (name, folder, open cache)."""
    from sparsekd import open_cache
    from sparsekd.cache_builder.build import run

    for name, enc in (
        ("topk8", dict(mode="topk", k=8, path="hidden")),
        ("sample50", dict(mode="sample", samples=50)),
    ):
        out = tmp / name
        run(build_config(a.teacher, out, seq_len=a.seq_len, n=a.sequences, **enc))
        yield name, out, open_cache(out)
