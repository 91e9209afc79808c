"""Chat data: targets at the learnt positions only against every position, and whole-
conversation packing against one conversation per row, in one run, with the real SmolLM2
teacher through vLLM and the defaults a user gets (top-8 on the log-prob path; sample
N = 50 on the hidden-state path).

  learn     the built-in chat corpus (2,569 conversations made from the standard library's
            documentation: a question about a name and its documentation as the answer;
            every third with a system prompt, every third with a second turn), seq_len 256:
            bytes per token, bytes per learnt token and build throughput with
            `corpus.learn=assistant` (the default) against `corpus.learn=all`
  packing   the first 600 of those conversations: rows, padding fraction and build
            throughput (conversations/s) of best-fit packing (the default) against one
            conversation per row

    python benchmarks/bench_chat.py --teacher teacher/

Appends to results/chat.csv and writes results/chat.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _results

ROWS: list[dict] = []
SEQ_LEN = 256


def emit(section: str, **row):
    ROWS.append({"section": section, **row})
    print(section, row, flush=True)


def config(teacher: str, corpus: str, out: Path, mode: str, **chat):
    from sparsekd.cache_builder.config import BuildConfig
    from sparsekd.config import build

    enc = {"mode": mode, **({"samples": 50} if mode == "sample" else {})}
    return build(
        BuildConfig,
        {
            "teacher": {"path": teacher},
            "corpus": {"paths": [corpus], "seq_len": SEQ_LEN, **chat},
            "encoder": enc,
            "writer": {"out": str(out)},
            "progress": False,
        },
    )


def measure(section: str, cfg, engine, **labels) -> dict:
    from sparsekd import open_cache
    from sparsekd.cache_builder.build import run
    from sparsekd.inspection import cache_stats

    t0 = time.perf_counter()
    s = run(cfg, engine=engine)
    wall = time.perf_counter() - t0
    st = cache_stats(open_cache(cfg.writer.out))
    chat = st["chat"]
    row = dict(
        **labels,
        conversations=chat["conversations"],
        rows=st["sequences"],
        tokens=st["tokens"],
        learnt=st["learnt_positions"],
        padding_fraction=round(chat["padding_fraction"], 4),
        bytes=st["bytes"],
        bytes_per_token=round(st["bytes_per_token"], 2),
        bytes_per_learnt_token=round(st["bytes_per_learnt_token"], 2),
        wall_s=round(wall, 1),
        teacher_s=s["teacher_s"],
        tok_s=round(st["tokens"] / wall, 1),
        conversations_per_s=round(chat["conversations"] / wall, 2),
    )
    emit(section, **row)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--only", default="learn,packing")
    a = ap.parse_args()
    from sparsekd.cache_builder.corpus import DEFAULT_CHAT_CORPUS, builtin_conversations
    from sparsekd.cache_builder.engines import VllmEngine, VllmHiddenEngine
    from sparsekd.cache_builder.teacher import TeacherConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-chat-"))
    subset = tmp / "first600.jsonl"
    subset.write_text("".join(json.dumps(r) + "\n" for _, r in list(builtin_conversations())[:600]))
    only = set(a.only.split(","))
    tcfg = TeacherConfig(path=a.teacher)
    engine = VllmEngine(tcfg, k=8, seq_len=SEQ_LEN)
    try:
        if "learn" in only:
            for learn in ("assistant", "all"):
                out = tmp / f"topk-{learn}"
                cfg = config(a.teacher, DEFAULT_CHAT_CORPUS, out, "topk", learn=learn)
                measure("learn", cfg, engine, mode="topk 8", learn=learn)
        if "packing" in only:
            for packing in ("best_fit", "one_per_row"):
                out = tmp / f"pack-{packing}"
                cfg = config(a.teacher, str(subset), out, "topk", chat_packing=packing)
                measure("packing", cfg, engine, mode="topk 8", packing=packing)
    finally:
        engine.close()
    if "learn" in only:
        engine = VllmHiddenEngine(tcfg, k=8, seq_len=SEQ_LEN)
        try:
            for learn in ("assistant", "all"):
                out = tmp / f"sample-{learn}"
                cfg = config(a.teacher, str(subset), out, "sample", learn=learn)
                measure("learn", cfg, engine, mode="sample 50 (first 600)", learn=learn)
        finally:
            engine.close()
    _results.append_csv("chat.csv", [{"row": json.dumps(r)} for r in ROWS])
    (_results.RESULTS / "chat.md").write_text(markdown(a.teacher))


def _teacher(path: str) -> str:
    """The teacher in words: its folder's name and its shape (a tiny random teacher's
    bytes per token say nothing about a real one's)."""
    c = json.loads((Path(path) / "config.json").read_text())
    n = c.get("num_hidden_layers"), c.get("hidden_size")
    return f"teacher `{Path(path).name}` ({n[0]} layers, hidden {n[1]})"


def markdown(teacher: str) -> str:
    cols = ["mode", "learn", "packing", "conversations", "rows", "tokens", "learnt",
            "padding_fraction", "bytes_per_token", "bytes_per_learnt_token", "wall_s", "tok_s",
            "conversations_per_s"]  # fmt: skip
    lines = [
        "# Chat data (benchmarks/bench_chat.py)",
        "",
        f"Machine: {_results.machine()}; commit {_results.commit()}. {_teacher(teacher)} "
        f"through vLLM (CPU), seq_len {SEQ_LEN}, the built-in chat corpus.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in ROWS]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
