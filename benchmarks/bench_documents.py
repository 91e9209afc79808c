"""Documents kept apart: what it costs the teacher and the student, in one run each, with the
defaults a user gets.

  teacher   the same packed rows through SmolLM2 on vLLM (top-8, the log-prob path), read
            one request per document (`corpus.attention=document`, the default) against
            one request per row (`row`), alternated, on three corpora: the built-in text
            corpus (long documents: the standard library's documentation), the same text
            cut into its paragraphs (short documents, several per row), and the built-in
            chat corpus (best-fit rows of conversations); teacher tokens/s and the ratio
  student   train steps of the demo's student (4 layers, 256 wide, SDPA) on rows of the
            short-document corpus, with position ids that restart at each document (a
            block-diagonal causal mask) against one sequence per row (plain causal
            attention), alternated; the step time and the ratio

    python benchmarks/bench_documents.py --teacher teacher/

Appends to results/documents.csv and writes results/documents.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import _results
import numpy as np

ROWS: list[dict] = []
SEQ_LEN = 512


def emit(section: str, **row):
    ROWS.append({"section": section, **row})
    print(section, row, flush=True)


def paragraphs_corpus(path: Path) -> Path:
    """The built-in corpus cut into its paragraphs (blank-line separated), one per line."""
    from sparsekd.cache_builder.corpus import builtin_documents

    with open(path, "w") as f:
        for _, text in builtin_documents():
            for para in text.split("\n\n"):
                if para.strip():
                    f.write(json.dumps({"text": para.strip()}) + "\n")
    return path


def packed_rows(teacher: str, corpus: str, n: int, seq_len: int = SEQ_LEN):
    """The first n rows of `corpus` as build-cache packs them, with document boundaries."""
    from sparsekd.cache_builder.build import _pack
    from sparsekd.cache_builder.corpus import DomainReader, ZstStreams
    from sparsekd.cache_builder.plan import plan_build

    cfg = _results.build_config(teacher, "/nonexistent", corpus=[corpus], seq_len=seq_len, n=n)
    plan = plan_build(cfg)
    rows = []
    for d in plan.domains:
        c = plan.cfg.corpus
        reader = DomainReader(d, c.text_field, False, ZstStreams(), kind=c.kind,
                              messages_field=c.messages_field)  # fmt: skip
        rows += list(_pack(plan, reader, n - len(rows)))
        if len(rows) >= n:
            break
    return rows[:n]


def bench_teacher(teacher: str, tmp: Path, n_rows: int, reps: int):
    from sparsekd.cache_builder.encoder import EncoderConfig, teacher_view
    from sparsekd.cache_builder.engines import VllmEngine
    from sparsekd.cache_builder.teacher import TeacherConfig
    from sparsekd.schemas import format as F

    corpora = {
        "text, long documents (built-in)": "builtin:stdlib-docs",
        "text, short documents (its paragraphs)": str(paragraphs_corpus(tmp / "paras.jsonl")),
        "chat, best fit (built-in)": "builtin:stdlib-chat",
    }
    engine = VllmEngine(TeacherConfig(path=teacher), k=8, seq_len=SEQ_LEN)
    enc = EncoderConfig(mode="topk", k=8)
    try:
        for name, corpus in corpora.items():
            rows = packed_rows(teacher, corpus, n_rows)
            args = (
                [r.input_ids for r in rows],
                [r.next_token for r in rows],
                [r.loss_mask for r in rows],
            )
            starts = {"document": [r.doc_starts for r in rows], "row": [F.ROW_START] * len(rows)}
            teacher_view(engine, enc, 0, list(range(len(rows))), *args, starts["row"])  # warm
            times = {k: [] for k in starts}
            for _ in range(reps):
                for k, st in starts.items():
                    t0 = time.perf_counter()
                    teacher_view(engine, enc, 0, list(range(len(rows))), *args, st)
                    times[k].append(time.perf_counter() - t0)
            tokens = len(rows) * SEQ_LEN
            doc_s, row_s = (statistics.median(times[k]) for k in ("document", "row"))
            emit(
                "teacher",
                corpus=name,
                rows=len(rows),
                documents_per_row=round(float(np.mean([len(r.doc_starts) for r in rows])), 2),
                learnt_fraction=round(float(np.mean([r.loss_mask.mean() for r in rows])), 3),
                document_tok_s=round(tokens / doc_s, 1),
                row_tok_s=round(tokens / row_s, 1),
                ratio=round(row_s / doc_s, 3),
            )
    finally:
        engine.close()


def bench_student(teacher: str, tmp: Path, steps: int, L: int = 256):
    import torch

    from sparsekd.config import build
    from sparsekd.student_train.config import LossConfig
    from sparsekd.student_train.loss import KDLoss
    from sparsekd.student_train.model import (
        DistillModule,
        InitStudentConfig,
        init_student,
        load_student,
    )

    torch.manual_seed(0)
    cfg = {"like": teacher, "layers": 4, "hidden": 256, "heads": 4, "out": str(tmp / "student")}
    init_student(build(InitStudentConfig, cfg))
    model, _ = load_student(tmp / "student")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    loss = KDLoss(LossConfig(kd_weight=0.9), steps=steps)  # backend auto: Triton on CUDA
    module = DistillModule(model, loss)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, K = 8, 12
    rows = packed_rows(teacher, str(paragraphs_corpus(tmp / "paras.jsonl")), B, seq_len=L)
    from sparsekd.schemas import format as F

    x = torch.from_numpy(np.stack([r.input_ids for r in rows]).astype(np.int64))
    pos = torch.from_numpy(np.stack([F.position_ids_of(r.doc_starts, L) for r in rows]))
    labels = torch.roll(x, -1, 1)
    V = model.config.vocab_size
    ids = torch.randint(0, V - 8 * K, (B, L, 1)) + 7 * torch.arange(K)  # K distinct, ascending
    probs = torch.softmax(torch.randn(B, L, K), -1) * 0.9
    x, pos, labels, ids, probs = (t.to(device) for t in (x, pos, labels, ids, probs))
    variants = {"document": pos, "row": None}

    def step(p):
        loss, _, _ = module(x, labels, ids, probs, position_ids=p)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()

    for p in variants.values():
        step(p)  # warm
    times = {k: [] for k in variants}
    for _ in range(steps):
        for k, p in variants.items():
            t0 = time.perf_counter()
            step(p)
            times[k].append(time.perf_counter() - t0)
    doc_s, row_s = (statistics.median(times[k]) for k in ("document", "row"))
    emit(
        "student",
        batch=f"{B} x {L}",
        documents_per_row=round(float(np.mean([len(r.doc_starts) for r in rows])), 2),
        document_step_s=round(doc_s, 4),
        row_step_s=round(row_s, 4),
        ratio=round(doc_s / row_s, 3),
        attention=model.config._attn_implementation,
    )


def write_markdown(teacher: str) -> None:
    path = _results.RESULTS / "documents.md"
    lines = [
        "# Documents kept apart (benchmarks/bench_documents.py)",
        "",
        f"Machine: {_results.machine()}; commit {_results.commit()}; teacher `{Path(teacher).name}`"
        f" through vLLM, top-8, seq_len {SEQ_LEN}.",
        "",
        "| corpus | rows | documents per row | learnt fraction | per document tok/s | "
        "per row tok/s | per document / per row speed |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ROWS:
        if r["section"] == "teacher":
            lines.append(
                f"| {r['corpus']} | {r['rows']} | {r['documents_per_row']} | "
                f"{r['learnt_fraction']} | {r['document_tok_s']} | {r['row_tok_s']} | "
                f"{r['ratio']} |"
            )
    lines += ["", "| student step | documents per row | document mask s | one sequence s | "
              "ratio | attention |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in ROWS:
        if r["section"] == "student":
            lines.append(
                f"| {r['batch']} | {r['documents_per_row']} | {r['document_step_s']} | "
                f"{r['row_step_s']} | {r['ratio']} | {r['attention']} |"
            )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--student-len", type=int, default=256, help="tokens per student row")
    ap.add_argument("--only", choices=("teacher", "student"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.only in (None, "student"):
            bench_student(a.teacher, Path(tmp), a.steps, a.student_len)
        if a.only in (None, "teacher"):
            bench_teacher(a.teacher, Path(tmp), a.rows, a.reps)
    _results.append_csv("documents.csv", ROWS)
    if a.only != "student":  # (the GPU script runs the student part alone)
        write_markdown(a.teacher)


if __name__ == "__main__":
    main()
