"""MiniPLM Difference Sampling (`sparsekd refine`) on a corpus of half natural text and half
random-character junk, with the real SmolLM2 teacher and a small reference model trained
by `train-student --loss ce` on the same corpus, as docs/miniplm.md recommends."""

from __future__ import annotations

import json
import random
import string

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from sparsekd.inspection import verify_cache
from sparsekd.schemas.cache import open_cache
from tests.helpers import error_line, run_cli

L = 64


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, smollm2_dir, tiny_student):
    """Corpus, per-sequence kind (natural / junk / mixed), teacher and reference caches."""
    from transformers import AutoTokenizer

    from sparsekd.cache_builder.corpus import builtin_documents

    root = tmp_path_factory.mktemp("refine")
    rng = random.Random(0)
    natural = []
    for _, text in builtin_documents():
        natural += [text[i : i + 900] for i in range(0, min(len(text), 2700), 900)]
        if len(natural) >= 4:
            break
    tok = AutoTokenizer.from_pretrained(smollm2_dir)

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    # Random characters, as many tokens as the natural document beside them.
    alphabet = string.ascii_letters + string.digits + string.punctuation + " "
    junk = []
    for text in natural[:4]:
        j = ""
        while n_tokens(j) < n_tokens(text):
            j += "".join(rng.choice(alphabet) for _ in range(10))
        junk.append(j)
    docs = [d for pair in zip(natural[:4], junk) for d in pair]  # natural, junk, natural...
    corpus = root / "mixed.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    # Which document every stream position came from (packing: tokens + EOS per document).
    owner = np.concatenate([np.full(n_tokens(d) + 1, i % 2) for i, d in enumerate(docs)])
    n_seq = (len(owner) - 1) // L
    kinds = []
    for s in range(n_seq):
        span = owner[s * L : (s + 1) * L + 1]  # its tokens and their targets
        kinds.append("natural" if span.max() == 0 else "junk" if span.min() == 1 else "mixed")

    def build(teacher, out, *extra):
        run_cli(
            "build-cache",
            "--teacher",
            teacher,
            "--corpus",
            corpus,
            "--out",
            out,
            "--engine",
            "hf",
            "--seq-len",
            L,
            "--quiet",
            *extra,
            check=True,
        )
        return out

    teacher_cache = build(smollm2_dir, root / "teacher", "--mode", "logprob")
    # The small reference: the tiny student trained with plain CE on the same corpus.
    run_cli(
        "train-student",
        "--cache",
        teacher_cache,
        "--student",
        tiny_student,
        "--out",
        root / "ref-run",
        "--loss",
        "ce",
        "--steps",
        30,
        "--batch-size",
        4,
        "--lr",
        3e-3,
        "--quiet",
        check=True,
    )
    reference = root / "ref-run" / "final"
    reference_cache = build(reference, root / "reference", "--mode", "logprob")
    return {
        "root": root,
        "corpus": corpus,
        "kinds": kinds,
        "teacher": smollm2_dir,
        "reference": reference,
        "teacher_cache": teacher_cache,
        "reference_cache": reference_cache,
        "build": build,
    }


def _refine(m, out, *extra, check=True):
    return run_cli(
        "refine",
        "--teacher-cache",
        m["teacher_cache"],
        "--reference-cache",
        m["reference_cache"],
        "--out",
        out,
        *extra,
        check=check,
    )


@torch.no_grad()
def _direct_scores(m) -> np.ndarray:
    """The difference score of every sequence, straight from transformers in float64."""
    from transformers import AutoModelForCausalLM

    cache = open_cache(m["teacher_cache"])
    x = torch.tensor(np.stack([s.input_ids for s in cache]), dtype=torch.long)
    labels = torch.tensor(np.stack([s.labels for s in cache]), dtype=torch.long)
    pos = torch.from_numpy(np.stack([s.position_ids for s in cache]))  # documents apart
    means = []
    for path in (m["teacher"], m["reference"]):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        logits = model(input_ids=x, position_ids=pos, use_cache=False).logits
        lp = torch.log_softmax(logits.double(), -1)
        means.append(lp.gather(-1, labels[..., None])[..., 0].mean(-1).numpy())
    return means[0] - means[1]


def test_junk_lands_below_the_cut_and_scores_match_transformers(mixed, tmp_path):
    out = tmp_path / "refined"
    proc = _refine(mixed, out, "--ratio", "0.4", "--plot")
    kinds = np.array(mixed["kinds"])
    assert (kinds == "natural").sum() >= 6 and (kinds == "junk").sum() >= 6
    assert "score distribution" in proc.stdout and "lowest scores" in proc.stdout
    assert (out / "scores.png").stat().st_size > 10_000

    scores = pq.read_table(out / "scores.parquet").to_pydict()
    assert scores["seq_id"] == list(range(len(kinds)))  # one corpus file: domain 0
    s = np.array(scores["score"])
    kept = np.array(scores["kept"])
    # Every junk sequence scores below the cut, every kept one is (at least part) text.
    assert kept.sum() == round(0.4 * len(kinds))
    assert s[kinds == "junk"].max() < s[kept].min()
    assert not np.any(kept & (kinds == "junk"))
    assert s[kinds == "natural"].mean() > s[kinds == "junk"].mean() + 1.0

    # Scores from the two caches equal the direct transformers computation: the only error
    # is the cache's log-prob quantisation (<= 0.5/1024 nats per token, per model).
    np.testing.assert_allclose(s, _direct_scores(mixed), atol=1.2e-3, rtol=0)

    # The refined set: a verifiable cache of the kept sequences in corpus order, with text.
    assert verify_cache(out) == []
    refined = open_cache(out)
    assert refined.meta["refined"]["ratio"] == 0.4 and len(refined) == kept.sum()
    table = pq.read_table(refined.shard_path(0))
    assert table.column("seq_id").to_pylist() == np.flatnonzero(kept).tolist()
    np.testing.assert_allclose(table.column("score").to_numpy(), s[kept], rtol=1e-6)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mixed["teacher"])
    assert table.column("text").to_pylist() == tok.batch_decode(
        table.column("input_ids").to_pylist()
    )
    shown = run_cli("inspect", out, "--verify", check=True).stdout
    assert f"kept {kept.sum()} of {len(kinds)} sequences (ratio 0.4" in shown
    # The same command again reuses the finished set.
    again = _refine(mixed, out, "--ratio", "0.4")
    assert "already there" in again.stdout


def test_train_student_on_the_refined_set_ce_and_kd(mixed, tmp_path, tiny_student):
    out = tmp_path / "refined"
    _refine(mixed, out, "--ratio", "0.5")
    kept = {s.seq_id for s in open_cache(out)}
    # The refined set of log-prob caches trains with CE; KD asks for targets.
    run_cli(
        "train-student",
        "--cache",
        out,
        "--student",
        tiny_student,
        "--out",
        tmp_path / "ce",
        "--loss",
        "ce",
        "--steps",
        4,
        "--batch-size",
        2,
        "--quiet",
        check=True,
    )
    proc = run_cli(
        "train-student",
        "--cache",
        out,
        "--student",
        tiny_student,
        "--out",
        tmp_path / "x",
        "--steps",
        2,
        "--quiet",
    )
    assert proc.returncode == 2 and "needs teacher targets" in error_line(proc)
    # KD: the targets of the refined sequences come from a top-K cache of the same corpus.
    topk = mixed["build"](mixed["teacher"], mixed["root"] / "teacher-topk", "--k", "8")
    run_cli(
        "train-student",
        "--cache",
        out,
        "--teacher-cache",
        topk,
        "--student",
        tiny_student,
        "--out",
        tmp_path / "kd",
        "--steps",
        6,
        "--batch-size",
        2,
        "--quiet",
        check=True,
    )
    for run in ("ce", "kd"):
        lines = (tmp_path / run / "data" / "rank-0.txt").read_text().splitlines()
        seen = {int(i) for ln in lines for i in ln.split()[1:]}
        assert seen <= kept and len(seen) >= 4
    log = (tmp_path / "kd" / "metrics.jsonl").read_text()
    metrics = [json.loads(ln) for ln in log.splitlines()]
    assert all(r["kd"] > 0 for r in metrics)


def test_refine_refuses_mismatched_or_nonsensical_input(mixed, tmp_path):
    other_len = mixed["build"](
        mixed["reference"], mixed["root"] / "ref-len32", "--mode", "logprob", "--seq-len", "32"
    )
    cases = {
        "packing (seq_len)": ("--reference-cache", other_len),
        "same model": ("--reference-cache", mixed["teacher_cache"]),
        "--ratio must be in (0, 1]": ("--ratio", "0"),
        "not a sparsekd cache": ("--reference-cache", tmp_path),
    }
    for want, (flag, value) in cases.items():
        args = {
            "--teacher-cache": mixed["teacher_cache"],
            "--reference-cache": mixed["reference_cache"],
            "--ratio": "0.5",
            flag: value,
        }
        proc = run_cli("refine", *[x for kv in args.items() for x in kv], "--out", tmp_path / "o")
        assert proc.returncode == 2, proc.stderr
        assert want in error_line(proc) and error_line(proc).startswith("sparsekd: error:")
    # An --out holding something else is refused and left as it was.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    proc = _refine(mixed, busy, check=False)
    assert proc.returncode == 2 and "not empty" in error_line(proc)
    assert (busy / "keep.txt").read_text() == "mine"


def test_verify_checks_the_order_across_a_refined_sets_shards(mixed, tmp_path):
    import pyarrow as pa

    from sparsekd.cache_builder.refine import RefineConfig, run
    from sparsekd.cache_builder.writer import write_shard
    from sparsekd.schemas.manifest import ShardIndex, write_manifest
    from sparsekd.storage import LocalStore

    good = tmp_path / "good"
    cfg = RefineConfig(
        teacher_cache=str(mixed["teacher_cache"]),
        reference_cache=str(mixed["reference_cache"]),
        out=str(good),
        shard_sequences=3,
    )
    run(cfg)
    refined = open_cache(good)
    assert len(refined.index) >= 2 and verify_cache(good) == []

    # The same kept rows dealt alternately into two shards: each shard is increasing and
    # starts at its first_seq, but their ranges interleave, so a sequence order is broken.
    rows = pa.concat_tables(pq.read_table(refined.shard_path(i)) for i in range(len(refined.index)))
    rows = rows.replace_schema_metadata(None).slice(0, 4)
    bad = tmp_path / "bad"
    store = LocalStore(bad)
    entries = [write_shard(store, u, 0, rows.take([u, u + 2]), refined.meta) for u in (0, 1)]
    write_manifest(
        store,
        meta=refined.meta,
        fingerprint=refined.fingerprint,
        shards=ShardIndex.from_entries(entries),
        tables={"kept": pa.table({"seq_id": rows.column("seq_id")})},
    )
    problems = verify_cache(bad)
    assert len(problems) == 1 and "overlap the shard before it" in problems[0], problems


def test_refine_reads_and_writes_an_object_store(mixed, tmp_path, s3_server, s3_bucket):
    """Both caches on S3, the refined set written to S3: the same kept sequences, scores
    and rows as the local refine, and a cache that verifies and trains."""
    from tests.helpers import copy_cache

    teacher = copy_cache(mixed["teacher_cache"], f"{s3_bucket}/teacher")
    reference = copy_cache(mixed["reference_cache"], f"{s3_bucket}/reference")
    local, remote = tmp_path / "refined", f"{s3_bucket}/refined"
    _refine(mixed, local, "--ratio", "0.5")
    run_cli(
        "refine", "--teacher-cache", teacher, "--reference-cache", reference,
        "--out", remote, "--ratio", "0.5", "--plot", check=True,
    )  # fmt: skip
    assert verify_cache(remote) == []
    a, b = open_cache(local), open_cache(remote)
    rows = lambda c: [(s.seq_id, s.input_ids.tolist(), s.token_logprobs.tolist()) for s in c]  # noqa: E731
    assert rows(b) == rows(a) and b.meta["refined"]["teacher_cache"] == teacher
    bucket = s3_bucket.removeprefix("s3://")
    objs = s3_server.objects(bucket, "refined")
    assert objs["scores.parquet"] == (local / "scores.parquet").read_bytes()
    assert objs["scores.png"][:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli(
        "refine", "--teacher-cache", teacher, "--reference-cache", reference,
        "--out", remote, "--ratio", "0.5", check=True,
    )  # fmt: skip
    assert "already there" in again.stdout
