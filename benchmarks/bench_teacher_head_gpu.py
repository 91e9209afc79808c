"""Teacher head on a GPU: time per token of sparsekd's kernel vs plain torch, one run.

Same hidden [T, D] and head [V, D] (bf16), producing top-K (K = 12) and N = 50 draws:
  sparsekd  teacher_head(backend="triton"): chunked logits, top-K, inverse-CDF sampling
  torch     logits = h @ W.T (full [T, V]), softmax, topk, torch.multinomial(N, replacement)
Defaults: T 8192, D 4096, V 128256 (issue 3). On CPU it is a smoke run (interpreter).

    python benchmarks/bench_teacher_head_gpu.py [--t 8192 --d 4096 --v 128256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import _results
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparsekd.kernels.teacher_head import sampling_uniforms, teacher_head  # noqa: E402


def _time(fn, reps, dev):
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    out = []
    for i in range(reps + 1):
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        if i:
            out.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
    return statistics.median(out), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", type=int, default=8192)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--k", type=int, default=12)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(a.t, a.d, generator=g)).to(dev, dt)
    w = (torch.randn(a.v, a.d, generator=g) * 0.02).to(dev, dt)
    lab = torch.randint(0, a.v, (a.t,), generator=g).to(dev)
    targets = sampling_uniforms(0, 0, a.t, a.n, "iid").to(dev)

    def ours():
        teacher_head(h, w, lab, k=a.k, targets=targets, backend="triton")

    def plain():
        logits = (h @ w.T).float()
        p = torch.softmax(logits, -1)
        logits.topk(a.k, -1)
        torch.multinomial(p, a.n, replacement=True)

    t_ours, m_ours = _time(ours, a.reps, dev)
    t_plain, m_plain = _time(plain, a.reps, dev)
    row = {
        "device": dev,
        "T": a.t,
        "D": a.d,
        "V": a.v,
        "K": a.k,
        "N": a.n,
        "sparsekd_us_per_token": round(1e6 * t_ours / a.t, 3),
        "torch_us_per_token": round(1e6 * t_plain / a.t, 3),
        "speedup": round(t_plain / t_ours, 3),
        "sparsekd_peak_mib": m_ours,
        "torch_peak_mib": m_plain,
    }
    print(row)
    if dev == "cuda":
        _results.append_csv("teacher_head_gpu.csv", [row])


if __name__ == "__main__":
    main()
