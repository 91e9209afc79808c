"""What the student receives, for every kind of cache: a model evaluated on a cache of its own
outputs gives KL below the quantisation floor and top-1 agreement ~ 1 (and, in any mode,
its log-prob of each actual token equal to the stored one), through `sparsekd evaluate` and
through the integrations' forward. It holds only if every position is read, by the teacher
and by the student, in the same context: rows here hold several documents (short text
documents, best-fit conversations, several prompt + answer pieces), and the same caches
read as one sequence per row miss the floor by orders of magnitude (the check can fail).

The teacher is the real SmolLM2-135M-Instruct; the top-K and generated caches come from one
shared vLLM engine, the sampled cache from the hf engine (the hidden-state path), the
refined set from `sparsekd refine`, the S3 cache from moto's server. A new kind of cache
is one more entry of KINDS."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsekd import cli, open_cache
from sparsekd.cache_builder.build import run as build_run
from sparsekd.cache_builder.config import BuildConfig
from sparsekd.config import build
from sparsekd.schemas import format as F
from sparsekd.student_train.evaluate import MetricSums, evaluate_model
from tests.helpers import copy_cache

pytestmark = pytest.mark.xdist_group("vllm")

L, K = 128, 8
FLOOR = 1e-3  # quantised log-probs: at most 4.9e-4 nats off each; the engines' float noise
WORDS = "the of and to in is for on that with as by this are from be or it an at which".split()
TOPICS = ["lists", "tuples", "sets", "dicts", "files", "loops", "classes", "modules"]
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": f"What are Python {t}?"},
                  {"role": "assistant", "content": f"Python {t} are a built-in feature."}]}
    for t in TOPICS
] + [
    {"prompt": [{"role": "user", "content": "Two plus two?"}],
     "completion": [{"role": "assistant", "content": "Four."}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "Another?"},
                  {"role": "assistant", "content": "Red."}]},
]  # fmt: skip
PROMPTS = [{"prompt": f"In one short sentence, what are Python {t}?"} for t in TOPICS[:6]]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("invariant")
    rng = np.random.default_rng(0)
    text = [
        " ".join(rng.choice(WORDS, size=int(rng.integers(4, 50)))).capitalize() + "."
        for _ in range(30)
    ]
    out = {"text": d / "text.jsonl", "chat": d / "chat.jsonl", "prompts": d / "prompts.jsonl"}
    for key, rows in (
        ("text", [{"text": t} for t in text]),
        ("chat", CONVERSATIONS),
        ("prompts", PROMPTS),
    ):
        out[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def engine(smollm2_engine):
    assert smollm2_engine.k >= K and smollm2_engine.generating
    return smollm2_engine


def _build(teacher, data, out, engine=None, **sections) -> str:
    cfg = {
        "teacher": {"path": str(teacher), "engine": "vllm" if engine else "hf"},
        "corpus": {"paths": [str(data)], "seq_len": L},
        "encoder": {"mode": "topk", "k": K},
        "writer": {"out": str(out), "shard_sequences": 4},
        "progress": False,
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    build_run(build(BuildConfig, cfg), engine=engine)
    return str(out)


# Each kind of cache: how it is built (from the module's teacher, corpora and engine).
KINDS = {
    "text, document attention": lambda t, c, e, d: _build(t, c["text"], d, e),
    "text, row attention": lambda t, c, e, d: _build(
        t, c["text"], d, e, corpus={"attention": "row"}
    ),
    "chat, best fit": lambda t, c, e, d: _build(t, c["chat"], d, e),
    "chat, one per row": lambda t, c, e, d: _build(
        t, c["chat"], d, e, corpus={"chat_packing": "one_per_row"}
    ),
    "generated, captured while generating": lambda t, c, e, d: _build(
        t, c["prompts"], d, e, generate={"enabled": True, "n": 2, "max_new_tokens": 24}
    ),
    "generated, second pass": lambda t, c, e, d: _build(
        t,
        c["prompts"],
        d,
        e,
        generate={"enabled": True, "n": 2, "max_new_tokens": 24, "capture": "second_pass"},
    ),  # fmt: skip
    "sampled (RS-KD, hidden-state path)": lambda t, c, e, d: _build(
        t,
        c["text"],
        d,
        encoder={"mode": "sample", "samples": 50, "k": None},
        corpus={"max_sequences": 6},
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def caches(tmp_path_factory, smollm2_dir, corpora, engine):
    root = tmp_path_factory.mktemp("kinds")
    return {
        kind: make(smollm2_dir, corpora, engine, root / f"c{i}")
        for i, (kind, make) in enumerate(KINDS.items())
    }


@pytest.fixture(scope="module")
def refined(tmp_path_factory, caches, tiny_llama_dir, corpora):
    """A refined set (MiniPLM) cut from the text cache, with a tiny model's logprob cache
    of the same rows as the reference."""
    root = tmp_path_factory.mktemp("refined")
    ref = _build(
        tiny_llama_dir, corpora["text"], root / "ref", encoder={"mode": "logprob", "k": None}
    )
    out = root / "refined"
    code = cli.main(
        ["refine", "--teacher-cache", caches["text, document attention"], "--reference-cache",
         ref, "--out", str(out), "--ratio", "0.5"]
    )  # fmt: skip
    assert code == 0
    return str(out)


@pytest.fixture(scope="module")
def teacher_model(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def _evaluate_cli(capsys, teacher, cache) -> dict:
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(teacher), "--cache", str(cache), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _integrations(model, cache, respect_documents=True) -> dict:
    """The metrics through CacheDataset + collate and a plain forward, as a user's loop runs
    it (or, with respect_documents False, reading each row as one sequence)."""
    from sparsekd.integrations.torch import CacheDataset, collate

    sums = MetricSums()
    loader = torch.utils.data.DataLoader(
        CacheDataset(cache, shuffle=False), batch_size=4, collate_fn=collate
    )
    with torch.no_grad():
        for b in loader:
            pos = b["position_ids"] if respect_documents else None
            logits = model(input_ids=b["input_ids"], position_ids=pos, use_cache=False).logits
            learnt = (b["labels"] >= 0).flatten()
            rows = learnt.numel()
            sums.add(
                torch.log_softmax(logits.float(), -1).reshape(rows, -1)[learnt],
                b["labels"].flatten()[learnt],
                b["teacher_ids"].flatten(0, 1)[learnt],
                b["teacher_probs"].flatten(0, 1)[learnt],
                b["teacher_label_logprob"].flatten()[learnt],
            )
    return sums.result()


def _assert_at_the_floor(m: dict, mode: str, where: str) -> None:
    assert m["tokens"] > 0, where
    assert m["logprob_gap"] < FLOOR, (where, m)
    if mode == "topk":
        assert abs(m["kl"]) < FLOOR and m["top1_agreement"] > 0.99, (where, m)


def _documents_per_row(cache) -> int:
    return max(len(s.doc_starts) for s in open_cache(cache))


def _all_kinds(caches, refined, s3_copy):
    return {**caches, "refined set (MiniPLM)": refined, "on S3": s3_copy}


@pytest.fixture(scope="module")
def s3_copy(caches, s3_server):
    uri = s3_server.make_bucket("invariant") + "/chat"
    return copy_cache(caches["chat, best fit"], uri)


def test_a_model_on_a_cache_of_its_own_outputs_is_at_the_floor_for_every_kind(
    caches, refined, s3_copy, teacher_model
):
    """Through evaluate's own loop (the function `sparsekd evaluate` runs) and through the
    integrations' (CacheDataset, collate, a plain forward)."""
    for kind, cache in _all_kinds(caches, refined, s3_copy).items():
        c = open_cache(cache)
        mode, attention = c.meta["mode"], F.attention_of(c.meta)
        assert attention == ("row" if "row attention" in kind else "document"), kind
        m = evaluate_model(teacher_model, c)
        _assert_at_the_floor(m, mode, f"{kind}: evaluate")
        _assert_at_the_floor(_integrations(teacher_model, cache), mode, f"{kind}: integrations")


@pytest.mark.parametrize("kind", ["chat, best fit", "generated, captured while generating"])
def test_sparsekd_evaluate_on_the_teachers_own_cache_is_at_the_floor(
    caches, smollm2_dir, capsys, kind
):
    """The command a user runs: `sparsekd evaluate --model TEACHER --cache C --json`."""
    _assert_at_the_floor(_evaluate_cli(capsys, smollm2_dir, caches[kind]), "topk", kind)


def test_the_same_caches_read_as_one_sequence_per_row_miss_the_floor(caches, teacher_model):
    """The fixtures can exhibit the defect: their rows hold several documents, and a
    student that ignores the boundaries is far from its own targets."""
    for kind, cache in caches.items():
        if "row attention" in kind or "one per row" in kind:
            continue
        assert _documents_per_row(cache) >= 3, kind
        m = _integrations(teacher_model, cache, respect_documents=False)
        assert m["logprob_gap"] > 20 * FLOOR, (kind, m)


def test_generated_and_chat_rows_hold_several_pieces(caches):
    for kind in ("chat, best fit", "generated, captured while generating"):
        c = open_cache(caches[kind])
        learnt_docs = [
            sum(bool(s.loss_mask[a:b].any()) for a, b in F.doc_spans(s.doc_starts, L)) for s in c
        ]
        assert max(learnt_docs) >= 2, (kind, learnt_docs)


def _per_document_logprobs(model, seq) -> np.ndarray:
    """float64 [L, V]: log-softmax at every position, each document forwarded alone."""
    out = []
    for a, b in F.doc_spans(seq.doc_starts, len(seq.input_ids)):
        x = torch.from_numpy(seq.input_ids[a:b].astype(np.int64))[None]
        with torch.no_grad():
            out.append(torch.log_softmax(model(input_ids=x).logits[0].double(), -1))
    return torch.cat(out).numpy()


@pytest.mark.parametrize(
    "kind", ["chat, best fit", "generated, captured while generating", "generated, second pass"]
)
def test_stored_targets_equal_a_forward_over_each_document_alone(caches, teacher_model, kind):
    for seq in open_cache(caches[kind]):
        if not seq.loss_mask.any():
            continue
        logp = _per_document_logprobs(teacher_model, seq)
        offsets, ids, probs = seq.targets()
        for p in np.flatnonzero(seq.loss_mask):
            got = probs[offsets[p] : offsets[p + 1]]
            want = np.exp(logp[p, ids[offsets[p] : offsets[p + 1]]])
            assert np.abs(got - want).max() < 3e-3, (kind, seq.seq_id, p)
            assert abs(seq.token_logprobs[p] - logp[p, seq.labels[p]]) < 3e-3


def test_student_logits_at_a_document_equal_a_forward_over_it_alone(caches, tiny_student):
    """train-student's model call (DistillModule), evaluation's and the transformers
    mixin's, on a tiny random student."""
    from sparsekd.integrations.torch import CacheDataset, collate
    from sparsekd.integrations.transformers import student_forward
    from sparsekd.student_train.config import LossConfig
    from sparsekd.student_train.loss import KDLoss
    from sparsekd.student_train.model import DistillModule, load_student

    model, _ = load_student(tiny_student)
    model.eval()
    module = DistillModule(model, KDLoss(LossConfig(backend="torch"), steps=1))
    cache = caches["chat, best fit"]
    by_id = {s.seq_id: s for s in open_cache(cache)}
    b = next(
        iter(torch.utils.data.DataLoader(CacheDataset(cache), batch_size=4, collate_fn=collate))
    )
    with torch.no_grad():
        logits = module(b["input_ids"], position_ids=b["position_ids"], logits_only=True)
        hidden = module.hidden(b["input_ids"], b["position_ids"])
        mixin = student_forward(model, b).hidden_states[-1]
    head = model.get_output_embeddings().weight
    assert max(len(by_id[s].doc_starts) for s in b["seq_id"].tolist()) >= 3
    for r, sid in enumerate(b["seq_id"].tolist()):
        want = torch.from_numpy(_per_document_logprobs(model, by_id[sid]))
        for where, lg in (("eval", logits[r]), ("train", hidden[r] @ head.T),
                          ("mixin", mixin[r] @ head.T)):  # fmt: skip
            got = torch.log_softmax(lg.double(), -1)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=where)


def test_earlier_caches_evaluate_as_they_were_built(smollm2_dir, capsys):
    """A version-3 chat cache (several conversations per row, each row read whole by the
    teacher) is read as it was built: one sequence per row, at the floor."""
    from pathlib import Path

    v3 = Path(__file__).resolve().parent / "data" / "v3-chat-cache"
    c = open_cache(v3)
    assert c.version == 3 and F.attention_of(c.meta) == "row"
    assert all(len(s.doc_starts) == 1 for s in c)
    _assert_at_the_floor(_evaluate_cli(capsys, smollm2_dir, v3), "topk", "v3 chat cache")
