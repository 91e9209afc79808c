"""Quality with a ceiling: students trained from the same rows, initialisation and steps with
CE only, top-K (12, 64), RS-KD (N = 12, 50) and full-distribution KD (the teacher's whole
next-token distribution, the ceiling every cache approximates), over several seeds.

  caches    one real cache per target, built by `build-cache` over the same rows of the
            built-in corpus (hf engine: exact, no vLLM needed); the first `--train-rows`
            sequences train, the next `--heldout-rows` are held out
  full KD   the teacher (transformers, float32) run once over the training rows; its
            log-probs over the whole vocabulary are the target of the `full` arm, given to
            the same loss (`KDLoss`: the same divergence, weight and kernel path; the
            support is every id)
  training  every arm the same loop: the trainer's module, loss, optimizer and schedule
            (`DistillModule`, `KDLoss`, `build_optimizer`, `build_schedule`, defaults
            lr 1e-3, warm-up 10, AdamW, clipping 1.0), batches in a seeded order of the
            training rows; a seed fixes the student's initialisation and the order, the
            same for every arm (paired)
  scoring   on the held-out rows against the teacher in full: lm_loss, KL(teacher ||
            student) over the whole vocabulary, ECE (15 bins, top-1 vs the actual token),
            top-1 agreement with the teacher's argmax; mean and 95 % interval over the
            seeds (Student t), and the paired difference of each arm against full KD
  fidelity  `sparsekd fidelity`'s figures of each cache (default student, 1,024 positions)

    python benchmarks/bench_quality.py --teacher teacher/     # 30 min on this 2-core machine

Runs on the CPU (a GPU setting, and the GPU script's step, are not written yet); every size
can be raised by its flag.

Appends to results/quality.csv and writes results/quality.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import _results
import numpy as np
import torch

ARMS = {  # name: (the cache's encoder settings, or None: no cache target; the loss)
    "ce": (None, "ce"),
    "top12": ({"mode": "topk", "k": 12}, "fkl"),
    "top64": ({"mode": "topk", "k": 64}, "fkl"),
    "rs12": ({"mode": "sample", "samples": 12}, "fkl"),
    "rs50": ({"mode": "sample", "samples": 50}, "fkl"),
    "full": (None, "fkl"),
}
PRESETS = {
    "cpu": dict(train_rows=64, heldout_rows=16, seq_len=128, steps=150, batch=4,
                layers=4, hidden=256, heads=4, seeds=3),
}  # fmt: skip


def build_caches(args, work: Path) -> dict[str, Path]:
    from sparsekd.cache_builder.build import run
    from sparsekd.cache_builder.config import BuildConfig
    from sparsekd.config import build

    out = {}
    for arm, (encoder, _) in ARMS.items():
        if encoder is None:
            continue
        path = work / f"cache-{arm}"
        if not (path / "manifest.json").exists():
            started = time.perf_counter()
            run(build(BuildConfig, {
                "teacher": {"path": str(args.teacher), "engine": "hf"},
                "corpus": {"seq_len": args.seq_len,
                           "max_sequences": args.train_rows + args.heldout_rows},
                "encoder": encoder,
                "writer": {"out": str(path)},
                "progress": False,
            }))  # fmt: skip
            print(f"built {arm} in {time.perf_counter() - started:.1f} s", flush=True)
        out[arm] = path
    return out


def rows_of(path: Path, n_train: int) -> tuple[list, list]:
    from sparsekd.schemas.cache import open_cache

    seqs = sorted(open_cache(path), key=lambda s: s.seq_id)
    return seqs[:n_train], seqs[n_train:]


@torch.no_grad()
def teacher_logp(teacher, seqs, batch: int) -> dict[int, torch.Tensor]:
    """seq_id -> [L, V] float32 log-probs of the teacher, each document apart."""
    from sparsekd.student_train.model import attention_kwargs
    from sparsekd.student_train.reader import collate

    out = {}
    for b0 in range(0, len(seqs), batch):
        b = collate(seqs[b0 : b0 + batch])
        pos = torch.from_numpy(b.position_ids)
        kw = attention_kwargs(teacher, pos)
        logits = teacher(input_ids=torch.from_numpy(b.input_ids), use_cache=False, **kw).logits
        for i, sid in enumerate(b.seq_id):
            out[int(sid)] = torch.log_softmax(logits[i].float(), -1)
    return out


def dense_target(b, logp: dict, V: int):
    """[B, L, V] ids (every id where learnt, -1 elsewhere) and the teacher's probabilities."""
    learnt = torch.from_numpy(b.labels >= 0)
    p = torch.stack([logp[int(s)] for s in b.seq_id]).exp()[..., :V]
    ids = torch.arange(V).expand(*learnt.shape, V)
    ids = torch.where(learnt[..., None], ids, -1)
    return ids, torch.where(learnt[..., None], p, 0.0)


def make_student(args, seed: int, work: Path) -> Path:
    from sparsekd.config import build
    from sparsekd.student_train.model import InitStudentConfig, init_student

    path = work / f"student-seed{seed}"
    if not path.exists():
        init_student(build(InitStudentConfig, {
            "like": str(args.teacher), "layers": args.layers, "hidden": args.hidden,
            "heads": args.heads, "seed": seed, "out": str(path)}))  # fmt: skip
    return path


def train(args, arm: str, seed: int, student_dir: Path, train_seqs: list, logp: dict):
    from sparsekd.config import build
    from sparsekd.student_train.config import LossConfig, OptimConfig
    from sparsekd.student_train.loss import KDLoss
    from sparsekd.student_train.model import DistillModule, load_student
    from sparsekd.student_train.optim import build_optimizer, build_schedule
    from sparsekd.student_train.reader import collate

    torch.manual_seed(seed)
    student = load_student(student_dir)[0].train()
    V = student.get_output_embeddings().weight.shape[0]
    module = DistillModule(
        student, KDLoss(build(LossConfig, {"kind": ARMS[arm][1]}), steps=args.steps)
    )
    ocfg = build(OptimConfig, {})
    opt = build_optimizer(student, ocfg)
    sched = build_schedule(opt, ocfg, args.steps)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    started = time.perf_counter()
    for _ in range(args.steps):
        while len(order) < args.batch:
            order += list(rng.permutation(len(train_seqs)))
        pick, order = order[: args.batch], order[args.batch :]
        b = collate([train_seqs[i] for i in pick])
        t = b.tensors()
        ids, probs = t["teacher_ids"], t["teacher_probs"]
        if arm == "full":
            ids, probs = dense_target(b, logp, V)
        loss, kd, _ = module(
            t["input_ids"], t["labels"], ids, probs, position_ids=t["position_ids"]
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), ocfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        module.loss.step(kd)
    return student.eval(), time.perf_counter() - started


@torch.no_grad()
def score(student, heldout: list, logp: dict, batch: int) -> dict:
    """Held-out metrics against the teacher in full (evaluate.MetricSums over every id)."""
    from sparsekd.student_train.evaluate import MetricSums
    from sparsekd.student_train.model import attention_kwargs
    from sparsekd.student_train.reader import collate

    sums = MetricSums()
    V = student.get_output_embeddings().weight.shape[0]
    for b0 in range(0, len(heldout), batch):
        b = collate(heldout[b0 : b0 + batch])
        kw = attention_kwargs(student, torch.from_numpy(b.position_ids))
        logits = student(input_ids=torch.from_numpy(b.input_ids), use_cache=False, **kw).logits
        labels = torch.from_numpy(b.labels.reshape(-1))
        learnt = labels >= 0
        lp_T = torch.stack([logp[int(s)] for s in b.seq_id]).reshape(len(labels), -1)[learnt, :V]
        n = int(learnt.sum())
        sums.add(
            torch.log_softmax(logits.float(), -1).reshape(len(labels), -1)[learnt],
            labels[learnt],
            torch.arange(V).expand(n, V),
            lp_T.exp(),
            lp_T.gather(1, labels[learnt][:, None])[:, 0],
        )
    r = sums.result()
    return {k: r[k] for k in ("lm_loss", "kl", "ece", "top1_agreement")}


def interval(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    from sparsekd.fidelity import t975

    return float(v.mean()), t975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))


def report(args, results: dict, fidelity: dict, costs: dict) -> str:
    metrics = ("lm_loss", "kl", "ece", "top1_agreement")
    lines = [
        "# Quality with a ceiling: CE, top-K, RS-KD and full-distribution KD",
        "",
        f"Measured at commit {_results.commit()} on {_results.machine()} by "
        f"`python benchmarks/bench_quality.py --teacher teacher/ --preset {args.preset}`: the "
        f"SmolLM2-135M-Instruct teacher, the built-in corpus, {args.train_rows} training rows "
        f"and {args.heldout_rows} held-out rows of {args.seq_len} tokens, a {args.layers}-layer "
        f"{args.hidden}-wide student, {args.steps} steps of {args.batch} rows, loss fkl with "
        f"kd_weight 0.9 (CE: loss ce), seeds {', '.join(map(str, args.seed_list))}. Held-out "
        "figures against the teacher in full; mean ± 95 % interval over the seeds; Δ is the "
        "paired difference from full KD (same seed: same initialisation and order).",
        "",
        "| arm | " + " | ".join(metrics) + " | Δ lm_loss vs full | Δ kl vs full | "
        "grad_cosine (fidelity) | mass covered | train s/run |",
        "|---|" + "---|" * (len(metrics) + 5),
    ]
    full = results["full"]
    for arm, runs in results.items():
        cells = []
        for m in metrics:
            mean, half = interval([r[m] for r in runs])
            cells.append(f"{mean:.4f} ± {half:.4f}")
        for m in ("lm_loss", "kl"):
            mean, half = interval([r[m] - f[m] for r, f in zip(runs, full)])
            cells.append("-" if arm == "full" else f"{mean:+.4f} ± {half:.4f}")
        fid = fidelity.get(arm)
        cells.append(
            "-" if fid is None else f"{fid['grad_cosine']:.3f} ± {fid['grad_cosine_ci95']:.3f}"
        )
        cells.append("-" if fid is None else f"{fid['mass_covered']:.3f}")
        cells.append(f"{np.mean(costs[arm]):.0f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    ce = {m: np.mean([r[m] for r in results["ce"]]) for m in ("lm_loss", "kl")}
    fu = {m: np.mean([r[m] for r in full]) for m in ("lm_loss", "kl")}
    lines += ["", "Share of full KD's improvement over CE that each cache recovers "
              "((CE - arm) / (CE - full), from the means):", ""]  # fmt: skip
    for arm in results:
        if arm in ("ce", "full"):
            continue
        rec = {m: (ce[m] - np.mean([r[m] for r in results[arm]])) / (ce[m] - fu[m])
               for m in ("lm_loss", "kl")}  # fmt: skip
        lines.append(f"- {arm}: lm_loss {rec['lm_loss']:.0%}, kl {rec['kl']:.0%}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True, type=Path)
    ap.add_argument("--preset", choices=PRESETS, default="cpu")
    ap.add_argument("--work", type=Path, default=Path("bench-quality"))
    for k, v in PRESETS["cpu"].items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"cpu: {v}")
    ap.add_argument("--fidelity-positions", type=int, default=1024)
    args = ap.parse_args()
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.seed_list = list(range(args.seeds))
    args.work.mkdir(parents=True, exist_ok=True)
    from sparsekd.config import build
    from sparsekd.fidelity import FidelityConfig, load_models, measure
    from sparsekd.schemas.cache import open_cache
    from sparsekd.student_train.model import load_student

    caches = build_caches(args, args.work)
    train_seqs, heldout = rows_of(caches["top64"], args.train_rows)
    per_arm = {arm: rows_of(p, args.train_rows) for arm, p in caches.items()}
    for arm, (tr, ho) in per_arm.items():  # the same rows in every cache
        assert [s.input_ids.tolist() for s in tr + ho] == [
            s.input_ids.tolist() for s in train_seqs + heldout
        ], arm
    teacher = load_student(args.teacher)[0].eval()
    started = time.perf_counter()
    logp = teacher_logp(teacher, train_seqs + heldout, args.batch)
    print(f"teacher over {len(logp)} rows in {time.perf_counter() - started:.1f} s", flush=True)
    fidelity = {}
    for arm, path in caches.items():
        cfg = build(FidelityConfig, {"cache": str(path), "teacher": str(args.teacher),
                                     "positions": args.fidelity_positions})  # fmt: skip
        cache = open_cache(path)
        fidelity[arm] = measure(cache, *load_models(cfg, cache), cfg)
        print(arm, "fidelity", {k: fidelity[arm][k] for k in ("grad_cosine", "grad_cosine_ci95")},
              flush=True)  # fmt: skip
    results = {arm: [] for arm in ARMS}
    costs = {arm: [] for arm in ARMS}
    rows = []
    for seed in args.seed_list:
        student_dir = make_student(args, seed, args.work)
        for arm in ARMS:
            seqs = per_arm[arm][0] if arm in per_arm else train_seqs
            model, seconds = train(args, arm, seed, student_dir, seqs, logp)
            r = score(model, heldout, logp, args.batch)
            results[arm].append(r)
            costs[arm].append(seconds)
            row = {"preset": args.preset, "arm": arm, "seed": seed, "steps": args.steps,
                   "train_s": round(seconds, 1),
                   **{k: round(v, 6) for k, v in r.items()}}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    _results.append_csv("quality.csv", rows)
    text = report(args, results, fidelity, costs)
    (_results.RESULTS / "quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
