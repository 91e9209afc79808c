"""What the hidden-state path pays to move each position's hidden state through host memory.

vLLM's pooling runner returns every position's final hidden state to the caller's process
(from the engine-core process, over its IPC); sparsekd then concatenates them and moves
them to the head's device. Measured on this CPU, same prompts, in one run:
  prefill   a generate engine, max_tokens = 1: the forward, nothing per position returned
  hidden    the pooling engine (`VllmHiddenEngine.hidden`): the forward plus D float32
            values per position handed back
  ours      torch.cat of the returned states and `.to(head device, head dtype)`
The per-token cost of the transfer is (hidden - prefill) / tokens, and `ours` / tokens;
docs/gpu.md scales it to a GPU run by bytes per token.

    python benchmarks/bench_hidden_transfer.py --teacher teacher/ [--sequences 32 --seq-len 512]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import _results

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def _median_time(fn, repeats=3):
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    import torch

    from sparsekd.cache_builder.engines import VllmEngine, VllmHiddenEngine
    from sparsekd.cache_builder.teacher import TeacherConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    a = ap.parse_args()
    ids, nxt = _results.builtin_sequences(a.teacher, a.seq_len, a.sequences)
    tokens = sum(len(x) for x in ids)
    cfg = TeacherConfig(path=a.teacher)
    eng = VllmEngine(cfg, k=1, seq_len=a.seq_len)
    try:
        prefill = _median_time(lambda: eng.prefill(ids, nxt))
    finally:
        eng.close()
    eng = VllmHiddenEngine(cfg, k=1, seq_len=a.seq_len)
    try:
        hidden = _median_time(lambda: eng.hidden(ids, nxt))
        states = eng.hidden(ids, nxt)
        W, _ = eng.lm_head()
        ours = _median_time(lambda: torch.cat(states).to(W.device, W.dtype))
        D = states[0].shape[1]
    finally:
        eng.close()
    row = {
        "tokens": tokens,
        "hidden_size": D,
        "bytes_per_token": D * 4,
        "prefill_s": round(prefill, 3),
        "hidden_s": round(hidden, 3),
        "transfer_us_per_token": round((hidden - prefill) / tokens * 1e6, 2),
        "ours_us_per_token": round(ours / tokens * 1e6, 3),
        "prefill_tok_s": round(tokens / prefill, 1),
        "hidden_tok_s": round(tokens / hidden, 1),
    }
    print(row)
    _results.append_csv("hidden_transfer.csv", [row])


if __name__ == "__main__":
    main()
