"""sparsekd fidelity: its figures against an independent float64 computation (each
document run alone, the divergences written out densely, autograd in float64), the order
the method predicts (RS-KD's gradient closer to full KD's than top-K's on the same
positions), and its refusals.

The caches are real SmolLM2 caches (hf engine); the student is a tiny one of SmolLM2's
vocabulary, so the gradient is over a real 49,152-entry head."""

import json
import math

import numpy as np
import pytest
import torch

from sparsekd.config import build
from sparsekd.fidelity import FidelityConfig, draw_rows, measure
from sparsekd.schemas.cache import open_cache
from sparsekd.student_train.model import load_student
from tests.conftest import hf_cache
from tests.helpers import error_line, run_cli


def _cfg(cache, teacher, student, **kw) -> FidelityConfig:
    return build(FidelityConfig, {"cache": str(cache), "teacher": str(teacher),
                                  "student": str(student), **kw})  # fmt: skip


def _oracle(cache, teacher_dir, student_dir, positions, seed, divergence):
    """The figures, computed densely in float64: every document of a drawn row run alone
    through float64 copies of both models; the loss over the target and over the teacher's
    whole distribution written out; gradients by autograd."""
    teacher = load_student(teacher_dir)[0].double().eval()
    student = load_student(student_dir)[0].double().eval()
    params = [p for p in student.parameters()]
    loss_t = loss_f = 0.0
    mass, rev, tok_err = [], [], []
    for seq in draw_rows(cache, positions, seed):
        off, ids, probs = seq.targets()
        starts = list(seq.doc_starts) + [len(seq.input_ids)]
        labels = seq.labels
        for a, b in zip(starts[:-1], starts[1:]):
            x = torch.tensor(seq.input_ids[a:b], dtype=torch.long)[None]
            with torch.no_grad():
                logp_T = torch.log_softmax(teacher(input_ids=x).logits[0], -1)
            logq = torch.log_softmax(student(input_ids=x).logits[0], -1)
            for i in range(b - a):
                p = a + i
                if not seq.loss_mask[p]:
                    continue
                tok_err.append(abs(logp_T[i, labels[p]].item() - float(seq.token_logprobs[p])))
                s = slice(off[p], off[p + 1])
                if s.stop == s.start:
                    continue
                sid = torch.tensor(ids[s], dtype=torch.long)
                r = torch.tensor(probs[s], dtype=torch.float64)
                pT = logp_T[i].exp()
                if divergence == "fkl":  # sum_S r log(r / q); full: sum_V p log(p / q)
                    loss_t = loss_t + (r * (r.log() - logq[i, sid])).sum()
                    loss_f = loss_f + (pT * (logp_T[i] - logq[i])).sum()
                else:  # ghost: plus the tail bucket
                    R, Q = r.sum(), logq[i, sid].exp().sum()
                    loss_t = loss_t + (r * (r.log() - logq[i, sid])).sum()
                    loss_t = loss_t + (1 - R) * ((1 - R).log() - (1 - Q).log())
                    loss_f = loss_f + (pT * (logp_T[i] - logq[i])).sum()
                P = pT[sid].sum().item()
                mass.append(P)
                R = r.sum().item()
                kr = (r * (r.log() - logp_T[i, sid])).sum().item()
                if 1 - R > 1e-3:  # a tail below 1e-3 is counted as none (quantisation)
                    kr += (1 - R) * math.log((1 - R) / max(1 - P, 1e-300))
                rev.append(kr)
    g_t = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_t, params, retain_graph=True)])
    g_f = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_f, params)])
    cos = (g_t @ g_f / (g_t.norm() * g_f.norm())).item()
    return {"grad_cosine": cos, "grad_norm_ratio": (g_t.norm() / g_f.norm()).item(),
            "mass_covered": float(np.mean(mass)), "kl_reverse": float(np.mean(rev)),
            "logprob_max_error": max(tok_err), "positions": len(tok_err)}  # fmt: skip


@pytest.mark.parametrize("divergence", ["fkl", "ghost"])
def test_figures_equal_an_independent_float64_computation(
    divergence, hf_topk_cache, smollm2_dir, tiny_student
):
    cache = open_cache(hf_topk_cache)
    cfg = _cfg(hf_topk_cache, smollm2_dir, tiny_student, positions=150, groups=3,
               loss={"kind": divergence})  # fmt: skip
    teacher, student = load_student(smollm2_dir)[0].eval(), load_student(tiny_student)[0].eval()
    got = measure(cache, teacher, student, cfg)
    want = _oracle(cache, smollm2_dir, tiny_student, 150, 0, divergence)
    assert got["positions"] == want["positions"] == 150
    assert got["grad_cosine"] == pytest.approx(want["grad_cosine"], abs=2e-4), (got, want)
    assert got["grad_norm_ratio"] == pytest.approx(want["grad_norm_ratio"], rel=1e-3)
    assert got["mass_covered"] == pytest.approx(want["mass_covered"], abs=1e-5)
    assert got["kl_reverse"] == pytest.approx(want["kl_reverse"], abs=1e-4)
    assert got["logprob_max_error"] == pytest.approx(want["logprob_max_error"], abs=1e-4)
    # a SmolLM2 cache of float32 teacher log-probs: quantisation is all that separates them
    assert got["logprob_max_error"] < 1e-3 and got["support_logprob_max_error"] < 1e-3
    assert 0 < got["kl_finite_fraction"] <= 1 and got["kl"] > 0
    assert 0 < got["grad_cosine"] < 1 and got["grad_cosine_ci95"] > 0


@pytest.fixture(scope="module")
def same_rows(tmp_path_factory, smollm2_dir):
    """Top-12 and RS-KD N = 50 caches of the same rows of SmolLM2 (hf engine)."""
    rows = {"seq_len": 64, "max_sequences": 8}
    top = hf_cache(tmp_path_factory, smollm2_dir, "fid-top12", {"mode": "topk", "k": 12}, **rows)
    rs = hf_cache(tmp_path_factory, smollm2_dir, "fid-rs50",
                  {"mode": "sample", "samples": 50}, **rows)  # fmt: skip
    return top, rs


def test_rs_kd_carries_the_gradient_of_full_kd_better_than_top_k(same_rows, smollm2_dir):
    """The Sparse Logit Sampling paper's measure, on the same 200 positions of SmolLM2 and
    the default student (the teacher perturbed, near it): the RS-KD N = 50 gradient is
    closer to full KD's than the top-12 gradient, beyond both intervals; a sample target
    leaves no mass off its draws (kl null, kl_reverse finite)."""
    res = {}
    for name, cache in zip(("top12", "rs50"), same_rows):
        proc = run_cli("fidelity", "--cache", cache, "--teacher", smollm2_dir,
                       "--positions", "200", "--json", check=True)  # fmt: skip
        res[name] = json.loads(proc.stdout)
    top, rs = res["top12"], res["rs50"]
    assert top["positions"] == rs["positions"] == 200
    assert (
        rs["grad_cosine"] - rs["grad_cosine_ci95"] > top["grad_cosine"] + top["grad_cosine_ci95"]
    ), res
    # draws hold all a sample target's mass: its kl is finite only where the teacher has
    # no tail (p_t < 1e-3); top-12 leaves the rest its mass nearly everywhere
    assert rs["kl_finite_fraction"] < 0.5 < top["kl_finite_fraction"] and rs["kl_reverse"] > 0
    assert top["mass_covered"] < 1
    assert rs["support_logprob_max_error"] is None  # counts, not log-probs
    assert rs["logprob_max_error"] < 1e-3


def test_bad_input_is_one_line(hf_topk_cache, tiny_llama_dir, smollm2_dir, tiny_student):
    for args, named in (
        (["--teacher", tiny_llama_dir], "is not the teacher"),
        (["--teacher", smollm2_dir, "--loss", "ce"], "--loss ce has no KD term"),
        (["--teacher", smollm2_dir, "--positions", "0"], "--positions must be >= 1"),
        (["--teacher", smollm2_dir, "--kd-weight", "0.5"], "loss.kd_weight has no effect"),
        (["--teacher", smollm2_dir, "--student", f"{tiny_llama_dir}-none"], "no config.json"),
        (
            ["--teacher", smollm2_dir, "--student", tiny_student, "--set", "student_noise=0.1"],
            "with --student it has no effect",
        ),
    ):
        proc = run_cli("fidelity", "--cache", hf_topk_cache, *args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert named in error_line(proc), error_line(proc)
