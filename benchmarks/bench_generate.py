"""Generate-and-capture in one pass against vLLM generation alone and against generation
followed by a second capture pass, in one run, on one engine, with the real SmolLM2
teacher and the defaults a user gets (`--generate`: temperature 1, top-p 1, top-8 targets),
on 200 prompts from the built-in documentation (the questions of the built-in chat
corpus; their documentation answers dropped). `--max-new-tokens` is the benchmark's one
change from the defaults (64 by default here, so that a CPU run ends in minutes).

  alone     llm.generate with no log-probs: what a generation job costs
  one_pass  VllmEngine.generate with targets: the answers and each answer token's top-K and
            log-prob from the same steps (what `build-cache --generate` runs)
  two_pass  generation alone, then the teacher over prompt + answer with prompt log-probs
            (top-8): the route of the tools that generate with one program and capture with
            another

tokens/s counts generated answer tokens over each variant's wall time. The variants run in
turn, `--rounds` times (alternating, first round discarded as warm-up when rounds > 1).
The answers of the three are the same ids (same seeds); the one-pass and two-pass targets
are compared (max abs difference of the top-K log-probs where the ids agree).

    python benchmarks/bench_generate.py --teacher teacher/

Appends to results/generate.csv and writes results/generate.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _results
import numpy as np

SEQ_LEN, K = 512, 8


def prompts(tok, n: int) -> list[np.ndarray]:
    from sparsekd.cache_builder.corpus import builtin_conversations
    from sparsekd.cache_builder.generate import prompt_of

    out = []
    for _, row in builtin_conversations():
        msgs = prompt_of(row, "messages").messages
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
        if len(ids) < SEQ_LEN // 2:
            out.append(ids)
        if len(out) == n:
            return out
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from sparsekd.cache_builder.engines import VllmEngine
    from sparsekd.cache_builder.generate import GenerateConfig, answer_seed
    from sparsekd.cache_builder.teacher import TeacherConfig

    tok = AutoTokenizer.from_pretrained(a.teacher)
    ps = prompts(tok, a.prompts)
    gen = GenerateConfig(enabled=True, max_new_tokens=a.max_new_tokens)
    seeds = [answer_seed(0, 0, i, 0) for i in range(len(ps))]
    budgets = [min(a.max_new_tokens, SEQ_LEN + 1 - len(p)) for p in ps]
    engine = VllmEngine(TeacherConfig(path=a.teacher), k=K, seq_len=SEQ_LEN, generating=True)

    def alone():
        params = [
            SamplingParams(temperature=gen.temperature, top_p=gen.top_p, max_tokens=b, seed=s,
                           detokenize=False)
            for s, b in zip(seeds, budgets)
        ]  # fmt: skip
        outs = engine.llm.generate(
            [TokensPrompt(prompt_token_ids=p.tolist()) for p in ps], params, use_tqdm=False
        )
        return [np.asarray(o.outputs[0].token_ids, np.int32) for o in outs], None

    def one_pass():
        outs = engine.generate(ps, seeds, budgets, gen, k=K, targets=True)
        return [o.token_ids for o in outs], [o.targets for o in outs]

    def two_pass():
        answers, _ = alone()
        rows = [np.concatenate([p, x]) for p, x in zip(ps, answers)]
        tb = engine.run([r[:-1] for r in rows], [int(r[-1]) for r in rows], k=K)
        targets = [
            (i[len(p) - 1 :], lp[len(p) - 1 :], t[len(p) - 1 :])
            for p, i, lp, t in zip(ps, tb.topk_ids, tb.topk_logprobs, tb.token_logprobs)
        ]
        return answers, targets

    variants = {"alone": alone, "one_pass": one_pass, "two_pass": two_pass}
    times = {k: [] for k in variants}
    got = {}
    try:
        for r in range(a.rounds):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                got[name] = fn()
                times[name].append(time.perf_counter() - t0)
                print(name, r, round(times[name][-1], 2), flush=True)
    finally:
        engine.close()
    tokens = sum(len(x) for x in got["alone"][0])
    same = all(
        np.array_equal(x, y) and np.array_equal(x, z)
        for x, y, z in zip(got["alone"][0], got["one_pass"][0], got["two_pass"][0])
    )
    diff = 0.0
    for (i1, l1, t1), (i2, l2, t2) in zip(got["one_pass"][1], got["two_pass"][1]):
        agree = (i1 == i2).all(1)
        if agree.any():
            diff = max(diff, float(np.abs(l1[agree] - l2[agree]).max()))
        diff = max(diff, float(np.abs(t1 - t2).max()))
    keep = slice(1, None) if a.rounds > 1 else slice(None)
    wall = {k: float(np.median(v[keep])) for k, v in times.items()}
    rows = []
    for name in variants:
        rows.append(
            dict(
                variant=name,
                prompts=len(ps),
                answer_tokens=tokens,
                max_new_tokens=a.max_new_tokens,
                wall_s=round(wall[name], 2),
                tok_s=round(tokens / wall[name], 1),
                vs_alone=round(wall[name] / wall["alone"], 3),
                same_answers=same,
                max_target_diff=round(diff, 5),
            )
        )
        print(rows[-1], flush=True)
    _results.append_csv("generate.csv", [{"row": json.dumps(r)} for r in rows])
    (_results.RESULTS / "generate.md").write_text(markdown(a, rows))


def markdown(a, rows) -> str:
    cols = ["variant", "prompts", "answer_tokens", "max_new_tokens", "wall_s", "tok_s",
            "vs_alone", "same_answers", "max_target_diff"]  # fmt: skip
    lines = [
        "# Generate and capture (benchmarks/bench_generate.py)",
        "",
        f"Machine: {_results.machine()}; commit {_results.commit()}. Teacher "
        f"`{Path(a.teacher).name}` through vLLM, {a.rounds} rounds (the first a warm-up), "
        f"top-{K}, temperature 1, top-p 1. vs_alone: wall time over generation alone's.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
