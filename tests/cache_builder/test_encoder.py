"""The sparse encoder: sample and logprob caches through the hidden-state path on the real
SmolLM2 teacher (the stored targets are what the teacher head drew, deterministic,
inspectable), the hidden path's top-K equal to vLLM's log-prob path's, and the encoder
settings that make no sense together refused."""

import json

import numpy as np
import pytest

from sparsekd import open_cache
from sparsekd.cache_builder.build import run
from sparsekd.cache_builder.config import BuildConfig
from sparsekd.cache_builder.encoder import EncoderConfig, teacher_view
from sparsekd.cache_builder.engines import VllmHiddenEngine
from sparsekd.cache_builder.teacher import TeacherConfig, load_lm_head
from sparsekd.config import build
from sparsekd.errors import ConfigError, TeacherError
from sparsekd.inspection import cache_stats, verify_cache
from tests.helpers import digests, error_line, run_cli


def _build(teacher, out, engine="hf", workers=(1, 0), **enc):
    cfg = {
        "teacher": {"path": str(teacher), "engine": engine},
        "corpus": {"seq_len": 48, "max_sequences": 8},
        "encoder": enc,
        "writer": {
            "out": str(out),
            "shard_sequences": 4,
            "num_workers": workers[0],
            "worker_index": workers[1],
        },
        "progress": False,
    }
    return run(build(BuildConfig, cfg))


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("sample") / "c"
    _build(smollm2_dir, out, mode="sample", samples=50)
    return out


def test_sample_cache_targets(sample_cache):
    cache = open_cache(sample_cache)
    assert cache.meta["mode"] == "sample" and cache.meta["samples"] == 50
    assert verify_cache(sample_cache) == []
    for seq in cache:
        offsets, ids, probs = seq.targets()
        counts = seq.values["counts"]
        for p in range(len(seq.input_ids)):
            sl = slice(offsets[p], offsets[p + 1])
            assert np.all(np.diff(ids[sl]) > 0), "distinct ids, ascending"
            assert counts[sl].sum() == 50 and np.isclose(probs[sl].sum(), 1.0)
    stats = cache_stats(cache)
    assert 5 < stats["mean_support"] < 50 and stats["tail_mass"] is None
    assert 0 < stats["teacher_entropy"] < 10 and 0 < stats["top1_agreement"] < 1


def test_sample_cache_is_deterministic_across_worker_splits(tmp_path, smollm2_dir, sample_cache):
    out = tmp_path / "w"
    for i in range(2):
        _build(smollm2_dir, out, workers=(2, i), mode="sample", samples=50)
    assert digests(out) == digests(sample_cache)


def test_tempered_proposal_stores_weights_and_stays_unbiased_in_mean(tmp_path, smollm2_dir):
    out = tmp_path / "t"
    _build(smollm2_dir, out, mode="sample", samples=200, proposal_temperature=0.8)
    cache = open_cache(out)
    assert cache.meta["weighted"]
    seq = next(iter(cache))
    assert "weights" in seq.values and (seq.values["weights"] > 0).all()
    offsets, _, probs = seq.targets()
    mass = np.add.reduceat(probs, offsets[:-1])
    # importance-weighted estimates of p: per position the total is ~1 on average
    assert abs(mass.mean() - 1.0) < 0.1


def test_logprob_mode_stores_only_token_logprobs(tmp_path, smollm2_dir, hf_topk_cache):
    out = tmp_path / "lp"
    cfg = {
        "teacher": {"path": str(smollm2_dir), "engine": "hf"},
        "corpus": {"seq_len": 64, "max_sequences": 10},
        "encoder": {"mode": "logprob"},
        "writer": {"out": str(out), "shard_sequences": 4},
        "progress": False,
    }
    run(build(BuildConfig, cfg))
    a, b = open_cache(out), open_cache(hf_topk_cache)
    assert verify_cache(out) == []
    for x, y in zip(a, b):
        assert x.support_size.sum() == 0 and len(x.targets()[1]) == 0
        np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=2e-3)
    # (at 10 rows of 64 tokens the per-column overheads of a shard are a large part of it)
    assert open_cache(out).manifest["bytes"] < 0.6 * open_cache(hf_topk_cache).manifest["bytes"]


@pytest.mark.parametrize(
    "enc, match",
    [
        (dict(mode="sample", path="logprob"), "needs the hidden-state path"),
        (
            dict(mode="topk", samples=50),
            r"encoder.samples \(--samples\) applies to --mode sample only",
        ),
        (dict(mode="topk", sampler="systematic"), "encoder.sampler .* applies to --mode sample"),
        (dict(mode="logprob", k=4), r"encoder.k \(--k\) applies to --mode topk only"),
        (dict(mode="sample", proposal_temperature=0.0), "proposal_temperature must be > 0"),
        (dict(mode="topk", k=0), "encoder.k must be in 1..1024"),
        (dict(mode="sample", samples=70_000), "encoder.samples must be in 1..65535"),
    ],
)
def test_settings_that_make_no_sense_together_are_refused(enc, match):
    with pytest.raises(ConfigError, match=match):
        EncoderConfig(**enc)


def test_sample_mode_refuses_the_logprob_path_in_one_line(tmp_path, smollm2_dir):
    proc = run_cli(
        "build-cache",
        "--teacher",
        smollm2_dir,
        "--out",
        tmp_path / "c",
        "--mode",
        "sample",
        "--path",
        "logprob",
        "--engine",
        "hf",
        "--seq-len",
        "16",
    )
    assert proc.returncode == 2 and "needs the hidden-state path" in error_line(proc)


@pytest.mark.slow
@pytest.mark.xdist_group("vllm")
def test_hidden_path_topk_equals_logprob_path_topk_on_smollm2(smollm2_dir, smollm2_engine):
    """Also: through the hidden path, vLLM's states times the tied head are the logits. The
    log-prob path runs on the run's shared SmolLM2 engine (conftest.py)."""
    from transformers import AutoTokenizer

    from sparsekd.cache_builder.corpus import builtin_documents
    from sparsekd.cache_builder.packing import pack

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    docs = [t for _, t in builtin_documents()]
    seqs = list(pack(docs, tok, tok.eos_token_id, 48, limit=6))
    sid, ids, nxt = list(range(6)), [s[0] for s in seqs], [s[1] for s in seqs]
    cfg = TeacherConfig(path=str(smollm2_dir))
    views = {}
    for path in ("hidden", "logprob"):
        own = path == "hidden"
        eng = VllmHiddenEngine(cfg, k=8, seq_len=48) if own else smollm2_engine
        try:
            enc = EncoderConfig(mode="topk", k=8, path=path)
            views[path] = teacher_view(
                eng,
                enc,
                0,
                sid,
                ids,
                nxt,
                [s.loss_mask for s in seqs],
                [s.doc_starts for s in seqs],
            )
            if path == "hidden":  # SmolLM2's head is tied: the embedding, as the model uses it
                _check_hidden_times_head(eng, smollm2_dir, tied=True)
        finally:
            if own:
                eng.close()
    (tl_h, sup_h) = views["hidden"].token_logprobs, views["hidden"].supports
    (tl_l, sup_l) = views["logprob"].token_logprobs, views["logprob"].supports
    agree = total = 0
    for a, b, x, y in zip(sup_h, sup_l, tl_h, tl_l):
        np.testing.assert_allclose(x, y, atol=2e-3)
        ha, hb = a.ids.reshape(-1, 8), b.ids.reshape(-1, 8)
        agree += sum(set(r) == set(s) for r, s in zip(ha.tolist(), hb.tolist()))
        total += len(ha)
        la = a.values["logprobs"].reshape(-1, 8).astype(int)
        lb = b.values["logprobs"].reshape(-1, 8).astype(int)
        same = (ha == hb).all(1)
        assert np.abs(la[same] - lb[same]).max() <= 2  # <= 2 / 1024 nats
    assert agree >= 0.97 * total  # the rest: a tie at rank K within float noise


def _check_hidden_times_head(eng, model_dir, tied: bool):
    """vLLM's final hidden states times the head sparsekd loads are the model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = np.arange(100, 140, dtype=np.int32)
    (h,) = eng.hidden([ids], [0])
    w, b = eng.lm_head()
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert ref.config.tie_word_embeddings == tied
    with torch.no_grad():
        logits = ref(torch.from_numpy(ids).long()[None]).logits[0]
    torch.testing.assert_close(h.float() @ w.float().T, logits, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_vllm_hidden_states_times_an_untied_head_reproduce_transformers_logits(tiny_llama_dir):
    eng = VllmHiddenEngine(TeacherConfig(path=str(tiny_llama_dir)), k=1, seq_len=40)
    try:
        _check_hidden_times_head(eng, tiny_llama_dir, tied=False)
    finally:
        eng.close()


def test_soft_capped_head_is_refused_on_the_hidden_path(tmp_path, tiny_llama_dir):
    import shutil

    d = tmp_path / "capped"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["final_logit_softcapping"] = 30.0
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TeacherError, match="final_logit_softcapping=30.0"):
        load_lm_head(str(d))


def test_trainer_learns_from_a_sample_cache(tmp_path, sample_cache, tiny_student):
    from sparsekd.student_train.config import TrainConfig
    from sparsekd.student_train.trainer import run as train

    cfg = {
        "student": str(tiny_student),
        "out": str(tmp_path / "run"),
        "steps": 8,
        "data": {"cache": str(sample_cache), "batch_size": 2},
        "optim": {"lr": 3e-3, "warmup": 1},
        "progress": False,
        "tensorboard": False,
    }
    rec = train(build(TrainConfig, cfg))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec["step"] == 8 and lines[-1]["kd"] < lines[0]["kd"]
