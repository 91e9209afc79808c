"""Peak memory of sparse_kl_loss (torch backend, chunked) vs the dense computation, on CPU.

Same inputs (N = 4096 rows, V = 32000, D = 256, S = 12, float32, forward + backward), each
measured in a fresh subprocess as peak RSS above the RSS after the inputs exist, so the two
numbers are comparable and measured in one run. Appends to results/sparse_kl_memory.csv.

    python benchmarks/bench_sparse_kl_memory.py [--n 4096 --v 32000 --d 256 --s 12]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import _results

CHILD = r"""
import json, resource, sys, time
import torch
from sparsekd.kernels import sparse_kl_loss
from sparsekd.kernels.reference import sparse_kl_loss_ref
which, N, V, D, S = sys.argv[1], *map(int, sys.argv[2:6])
g = torch.Generator().manual_seed(0)
h = torch.randn(N, D, generator=g).requires_grad_()
w = (torch.randn(V, D, generator=g) * 0.05).requires_grad_()
ids = torch.stack([torch.randperm(V, generator=g)[:S] for _ in range(64)]).repeat(N // 64, 1)
p = torch.softmax(torch.randn(N, S, generator=g), -1) * 0.9
labels = torch.randint(0, V, (N,), generator=g)
def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])
base = rss_kb()
t = time.perf_counter()
if which == "dense":
    loss = sparse_kl_loss_ref(h, w, ids, p, labels, ce_weight=0.1)
else:
    chunk = None if which == "chunked_default" else int(which.split("_")[1])
    loss = sparse_kl_loss(h, w, ids, p, labels, divergence="fkl", kd_weight=1.0, ce_weight=0.1,
                          backend="torch", chunk_rows=chunk)  # fmt: skip
loss.backward()
sec = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"which": which, "peak_mb": (peak - base) / 1024, "seconds": sec,
                  "loss": float(loss)}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--s", type=int, default=12)
    a = ap.parse_args()
    res = {}
    for which in ("dense", "chunked_default", "chunked_1024"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, which, str(a.n), str(a.v), str(a.d), str(a.s)],
            capture_output=True,
            text=True,
            check=True,
        )
        res[which] = json.loads(out.stdout.strip().splitlines()[-1])
        print(res[which], flush=True)
    ratio = res["chunked_default"]["peak_mb"] / res["dense"]["peak_mb"]
    old = res["chunked_1024"]["peak_mb"] / res["dense"]["peak_mb"]
    rel = abs(res["chunked_default"]["loss"] - res["dense"]["loss"]) / abs(res["dense"]["loss"])
    import torch

    from sparsekd.kernels.sparse_kl import default_chunk_rows

    _results.append_csv(
        "sparse_kl_memory.csv",
        [
            {
                "torch": torch.__version__,
                "N": a.n,
                "V": a.v,
                "D": a.d,
                "S": a.s,
                "dense_peak_mb": round(res["dense"]["peak_mb"], 1),
                "default_chunk_rows": default_chunk_rows(a.v, "cpu"),
                "chunked_peak_mb": round(res["chunked_default"]["peak_mb"], 1),
                "memory_ratio": round(ratio, 4),
                "chunk1024_peak_mb": round(res["chunked_1024"]["peak_mb"], 1),
                "chunk1024_ratio": round(old, 4),
                "dense_s": round(res["dense"]["seconds"], 2),
                "chunked_s": round(res["chunked_default"]["seconds"], 2),
                "loss_rel_diff": f"{rel:.2e}",
            }
        ],
    )
    print(
        f"peak memory: dense {res['dense']['peak_mb']:.0f} MB, chunked (default "
        f"{default_chunk_rows(a.v, 'cpu')} rows) {res['chunked_default']['peak_mb']:.0f} MB, "
        f"ratio {ratio:.3f} (1024 rows: {old:.3f}); loss rel diff {rel:.1e}"
    )


if __name__ == "__main__":
    main()
