"""The CPU teacher head: sampling (RS-KD, N = 50) against top-K, new sampler against the old
one, in one run; and whole builds, sample against top-K.

Head: SmolLM2-135M-Instruct's real final hidden states (1024 positions of the built-in
corpus) and head (V = 49,152, D = 576), `teacher_head` on CPU:
  topk8           k = 8
  sample50        N = 50 iid draws, the blocked float32 sampler (the CPU path)
  sample50_old    N = 50 with the float64 dense sampler the CPU path used before (now the
                  oracle's): float64 logits / tau, log-sum-exp, exp, cumsum, searchsorted
Agreement: the share of draws equal to the float64 oracle's (float64 hidden and head), for
the blocked sampler and for the Triton kernel (interpreter, 128 positions).
Build: `build-cache` with the hf engine through the hidden-state path (the teacher head
serves both modes), top-K 8 vs sample N = 50, same sequences.

    python benchmarks/bench_sampler.py --teacher teacher/ [--sequences 16 --seq-len 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _results


def _time(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


AGREE_TRITON = r"""
import sys, torch
from sparsekd.kernels.teacher_head import teacher_head
h, w, lab, t = torch.load(sys.argv[1])
a = teacher_head(h, w, lab, targets=t, backend="triton")
torch.save((a["sample_ids"], a["sample_counts"]), sys.argv[2])
"""


def main():
    import torch
    from transformers import AutoModelForCausalLM

    from sparsekd.cache_builder.build import run
    from sparsekd.kernels.reference import draws_dense, teacher_head_ref
    from sparsekd.kernels.teacher_head import sampling_uniforms, teacher_head

    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args()
    ids, nxt = _results.builtin_sequences(a.teacher, 512, 2)
    model = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.from_numpy(__import__("numpy").stack(ids)).long()
        h = model.get_decoder()(input_ids=x).last_hidden_state.reshape(-1, 576)  # [1024, D]
    w = model.get_output_embeddings().weight.detach()
    lab = torch.cat([x[:, 1:], torch.tensor(nxt)[:, None]], 1).reshape(-1)
    t = torch.cat([sampling_uniforms(0, s, 512, 50, "iid") for s in range(2)])
    head = {
        "topk8": _time(lambda: teacher_head(h, w, lab, k=8)),
        "sample50": _time(lambda: teacher_head(h, w, lab, targets=t)),
        "sample50_old": _time(lambda: teacher_head(h, w, lab, targets=t, sampler=draws_dense)),
    }
    print({k: round(v, 3) for k, v in head.items()}, flush=True)

    def expand(out):
        ids_, cnt = out["sample_ids"], out["sample_counts"]
        return torch.stack(
            [torch.repeat_interleave(i[c > 0].long(), c[c > 0].long()) for i, c in zip(ids_, cnt)]
        )

    ref = expand(teacher_head_ref(h, w, lab, targets=t))
    agree_cpu = (expand(teacher_head(h, w, lab, targets=t)) == ref).float().mean().item()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sampler-"))
    torch.save((h[:128], w, lab[:128], t[:128]), tmp / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run(
        [sys.executable, "-c", AGREE_TRITON, tmp / "in.pt", tmp / "out.pt"], check=True, env=env
    )
    tri_ids, tri_cnt = torch.load(tmp / "out.pt")
    agree_triton = (
        (expand({"sample_ids": tri_ids, "sample_counts": tri_cnt}) == ref[:128])
        .float()
        .mean()
        .item()
    )
    agree_cpu128 = (
        (expand(teacher_head(h[:128], w, lab[:128], targets=t[:128])) == ref[:128])
        .float()
        .mean()
        .item()
    )
    print("agreement", agree_cpu, agree_cpu128, agree_triton, flush=True)

    build = {}
    for name, enc in (
        ("topk8", dict(mode="topk", k=8, path="hidden")),
        ("sample50", dict(mode="sample", samples=50)),
    ):
        cfg = _results.build_config(a.teacher, tmp / name, seq_len=a.seq_len, n=a.sequences, **enc)
        t0 = time.perf_counter()
        s = run(cfg)
        build[name] = s["tokens"] / (time.perf_counter() - t0)
        print(name, round(build[name], 1), "tok/s", flush=True)
    row = {
        "positions": 1024,
        "V": 49152,
        "head_topk8_s": round(head["topk8"], 3),
        "head_sample50_s": round(head["sample50"], 3),
        "head_sample50_old_s": round(head["sample50_old"], 3),
        "head_sample_over_topk_speed": round(head["topk8"] / head["sample50"], 3),
        "head_old_sample_over_topk_speed": round(head["topk8"] / head["sample50_old"], 3),
        "agree_cpu_1024": round(agree_cpu, 5),
        "agree_cpu_128": round(agree_cpu128, 5),
        "agree_triton_128": round(agree_triton, 5),
        "build_topk8_tok_s": round(build["topk8"], 1),
        "build_sample50_tok_s": round(build["sample50"], 1),
        "build_sample_over_topk": round(build["sample50"] / build["topk8"], 3),
    }
    print(row)
    _results.append_csv("sampler.csv", [row])


if __name__ == "__main__":
    main()
