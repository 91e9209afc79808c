"""What a checkpoint costs each rank: the sharded save train-student does now
(torch.distributed.checkpoint, each rank writes its own part) against the save it replaced
(the full model and optimizer state gathered on rank 0, which writes it), in one run, on
two gloo ranks under FSDP2 with a Llama-shaped student and AdamW state after one step.

Per rank and per method: the peak resident memory above the rank's resident memory
before the save (sampled every 2 ms by a thread reading /proc/self/status), the bytes the
rank wrote and the seconds the save took.

    python benchmarks/bench_checkpoint_memory.py [--hidden 768 --layers 8]

Appends to results/checkpoint_memory.csv.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import threading
import time
from pathlib import Path

import _results


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class _Peak:
    """The highest resident memory seen while the block runs, above the level at its start."""

    def __enter__(self):
        gc.collect()
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.base


def _rank(rank: int, world: int, port: int, a, folder: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsekd.student_train import parallel

    torch.set_num_threads(1)
    d = parallel.init()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3,
        num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
        num_key_value_heads=a.hidden // 64, max_position_embeddings=256,
    )  # fmt: skip
    # every decoder layer an FSDP2 unit, the root last, as train-student does
    model = LlamaForCausalLM(cfg)
    parallel.wrap(model, model.model.layers, d, True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, a.vocab, (1, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    n_params = sum(p.numel() for p in model.parameters())  # DTensors: the global sizes
    gc.collect()

    def written(root: Path, mine) -> int:
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and mine(p))

    rows = []
    root = Path(folder)
    dist.barrier()
    with _Peak() as m:
        parallel.save_sharded(root / "sharded", model, opt)
    dist.barrier()
    mine = lambda p: p.name.startswith(f"__{rank}_") or (rank == 0 and p.name == ".metadata")  # noqa: E731
    rows.append(("sharded (DCP)", m, written(root / "sharded", mine)))
    gc.collect()
    dist.barrier()
    with _Peak() as m:
        msd, osd = parallel.full_state(model, opt)  # the save this replaced
        if rank == 0:
            torch.save(msd, root / "model.pt")
            torch.save(osd, root / "optim.pt")
        del msd, osd
    dist.barrier()
    full = sum((root / f).stat().st_size for f in ("model.pt", "optim.pt")) if rank == 0 else 0
    rows.append(("full on rank 0", m, full))
    for method, m, nbytes in rows:
        results.put(
            {
                "method": method,
                "rank": rank,
                "world": world,
                "params": n_params,
                "peak_extra_mb": round(m.extra / 2**20, 1),
                "written_mb": round(nbytes / 2**20, 1),
                "save_s": round(m.seconds, 2),
            }  # fmt: skip
        )
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--port", type=int, default=29611)
    a = ap.parse_args()
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, 2, a.port, a, tmp, results)) for r in range(2)]
        for p in procs:
            p.start()
        rows = [results.get(timeout=1200) for _ in range(4)]
        for p in procs:
            p.join(timeout=120)
            if p.exitcode != 0:
                raise SystemExit(f"rank exited with {p.exitcode}")
    rows.sort(key=lambda r: (r["method"], r["rank"]))
    for r in rows:
        print(r)
    r0 = {r["method"]: r for r in rows if r["rank"] == 0}
    ratio = r0["sharded (DCP)"]["peak_extra_mb"] / max(r0["full on rank 0"]["peak_extra_mb"], 1e-9)
    print(f"rank 0 peak extra memory, sharded / full: {ratio:.3f}")
    _results.append_csv("checkpoint_memory.csv", rows)


if __name__ == "__main__":
    main()
