"""TAID against forward KL, on the demo's setting: the same SmolLM2 teacher, the demo's
top-K (K = 12) and RS-KD (N = 50) caches of the built-in corpus, the demo's student
architecture, steps, batch, learning rate and KD weight; three seeds (each seed sets the
student's initialisation and the data order, the same for both losses). Every student is
evaluated on the demo's held-out top-1024 cache: lm_loss, kl (teacher || student over the
reference support) and ece. Reported: mean and spread (sample standard deviation) over
seeds, and the per-seed difference taid - fkl (paired: same init, same data).

    python benchmarks/bench_taid.py [--demo sparsekd-demo] [--seeds 0 1 2] [--quick]

`--demo` reuses a demo folder's teacher and caches (building what is missing, as the demo
does). Writes results/taid.csv and results/taid.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import _results

LOSSES = ("fkl", "taid")
CACHES = {"topk": "top-K 12", "sample": "RS-KD N=50"}
METRICS = ("lm_loss", "kl", "ece")


def _train_and_eval(out: Path, teacher: Path, caches: dict, size, cache: str, loss: str, seed: int):
    from sparsekd.config import build
    from sparsekd.demo import KD_WEIGHT
    from sparsekd.schemas.cache import open_cache
    from sparsekd.student_train.config import TrainConfig
    from sparsekd.student_train.evaluate import evaluate_model
    from sparsekd.student_train.model import InitStudentConfig, init_student, load_student
    from sparsekd.student_train.trainer import run as train

    init = out / f"init-{seed}"
    if not (init / "config.json").exists():
        init_student(InitStudentConfig(like=str(teacher), out=str(init), seed=seed, **size.student))
    run = out / f"{cache}-{loss}-{seed}"
    t = time.perf_counter()
    if not (run / "final" / "config.json").exists():
        import shutil

        shutil.rmtree(run, ignore_errors=True)
        cfg = {  # the demo's student settings (sparsekd/demo.py `_train`)
            "student": str(init),
            "out": str(run),
            "steps": size.steps,
            "seed": seed,
            "data": {"cache": str(caches[cache][0]), "batch_size": size.batch_size},
            "loss": {"kind": loss, "kd_weight": KD_WEIGHT},
            "optim": {"lr": 2e-3, "warmup": max(1, size.steps // 10)},
            "progress": False,
            "tensorboard": False,
        }
        train(build(TrainConfig, cfg))
    secs = time.perf_counter() - t
    model, _ = load_student(run / "final")
    metrics = evaluate_model(model, open_cache(caches["heldout"][0]))
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    t_last = [r["t"] for r in recs if "t" in r]
    return {
        "cache": cache,
        "loss": loss,
        "seed": seed,
        **{m: metrics[m] for m in METRICS},
        "t_first": t_last[0] if t_last else "",
        "t_last": t_last[-1] if t_last else "",
        "train_s": round(secs, 1),
    }


def _spread(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(rows: list[dict], seeds: list[int]) -> str:
    lines = [
        "| cache | loss | " + " | ".join(f"{m} (mean ± sd)" for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    by = {(r["cache"], r["loss"], r["seed"]): r for r in rows}
    for cache, label in CACHES.items():
        for loss in LOSSES:
            cells = []
            for m in METRICS:
                xs = [by[cache, loss, s][m] for s in seeds]
                cells.append(f"{statistics.mean(xs):.4f} ± {_spread(xs):.4f}")
            lines.append(f"| {label} | {loss} | " + " | ".join(cells) + " |")
        cells = []
        for m in METRICS:
            d = [by[cache, "taid", s][m] - by[cache, "fkl", s][m] for s in seeds]
            wins = sum(x < 0 for x in d)
            cells.append(f"{statistics.mean(d):+.4f} ± {_spread(d):.4f} ({wins}/{len(d)} lower)")
        lines.append(f"| {label} | taid − fkl, paired | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="sparsekd-demo", help="demo folder to reuse or fill")
    ap.add_argument("--out", default=None, help="students' folder (default: DEMO/taid-bench)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="the demo's quick size")
    args = ap.parse_args()

    from sparsekd.demo import FULL, QUICK, _build_caches, _prepare_teacher, _Timings

    demo, size = Path(args.demo), QUICK if args.quick else FULL
    demo.mkdir(parents=True, exist_ok=True)
    timings = _Timings(demo / "timings.json")
    teacher = _prepare_teacher(demo, timings)
    caches = _build_caches(demo, teacher, size, "vllm")
    caches.pop("engine_start_s", None)
    out = Path(args.out) if args.out else demo / "taid-bench"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for cache in CACHES:
            for loss in LOSSES:
                row = _train_and_eval(out, teacher, caches, size, cache, loss, seed)
                print(json.dumps(row), flush=True)
                rows.append(row)
    setup = (
        f"{size.steps} steps x {size.batch_size} sequences x {size.seq_len} tokens, student "
        f"{size.student}, lr 2e-3, kd_weight 0.9, TAID defaults (t 0.4 -> 1, alpha 5e-4, "
        f"momentum 0.99); held-out {size.heldout_sequences} sequences; seeds {args.seeds}"
    )
    table = summarise(rows, args.seeds)
    print(table)
    for r in rows:
        r["setup"] = "quick" if args.quick else "full"
    _results.append_csv("taid.csv", rows)
    md = _results.RESULTS / "taid.md"
    md.write_text(
        f"# TAID vs forward KL (`python benchmarks/bench_taid.py`"
        f"{' --quick' if args.quick else ''})\n\n"
        f"Commit {_results.commit()}, {_results.machine()}. {setup}.\n\n{table}\n"
    )


if __name__ == "__main__":
    main()
