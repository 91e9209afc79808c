"""Teacher head, both backends (Triton: the interpreter on CPU; torch: the blocked CPU
sampler) against the float64 oracle, and the samplers' statistics: unbiased mean,
systematic variance below iid, and a top-K-restricted sampler caught by the same test."""

import functools
import math

import pytest
import torch

from sparsekd.kernels import teacher_head as TH
from sparsekd.kernels.reference import teacher_head_ref
from sparsekd.kernels.teacher_head import sampling_uniforms, teacher_head

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(T, D, V, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g)
    w = torch.randn(V, D, generator=g) * scale
    lab = torch.randint(0, V, (T,), generator=g)
    return h.to(DEV), w.to(DEV), lab.to(DEV)


def _expand(ids, cnt):
    """The sorted draws behind (distinct ids, counts) rows."""
    return torch.stack(
        [
            torch.repeat_interleave(i[c > 0].long().cpu(), c[c > 0].long().cpu())
            for i, c in zip(ids, cnt)
        ]
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("block_v", [512, None], ids=["vblocks-512", "default-vblocks"])
@pytest.mark.parametrize("T, D, V, K", [(37, 32, 3001, 8), (9, 16, 70_001, 1), (5, 8, 257, 64)])
@pytest.mark.parametrize("sampler", ["iid", "systematic"])
def test_head_matches_float64_oracle(monkeypatch, backend, block_v, T, D, V, K, sampler):
    if block_v:
        monkeypatch.setattr(TH, "MAX_BLOCK_V", block_v)
    h, w, lab = _problem(T, D, V)
    N = 50
    t = sampling_uniforms(3, 11, T, N, sampler)
    a = teacher_head(h, w, lab, k=K, targets=t, backend=backend, chunk_rows=16)
    r = teacher_head_ref(h, w, lab, k=K, targets=t)
    torch.testing.assert_close(a["lse"].double(), r["lse"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(a["token_logprob"].double(), r["token_logprob"], atol=1e-4, rtol=0)
    assert torch.equal(a["topk_ids"].cpu(), r["topk_ids"].cpu())
    torch.testing.assert_close(a["topk_logprobs"].double(), r["topk_logprobs"], atol=1e-4, rtol=0)
    ids, cnt = a["sample_ids"], a["sample_counts"]
    assert (cnt.sum(1) == N).all(), "every position holds exactly N draws"
    valid = ids >= 0
    assert ((ids[:, 1:] > ids[:, :-1]) | ~valid[:, 1:]).all(), "distinct, ascending"
    assert ((cnt > 0) == valid).all()
    # draw for draw against float64 sampling: the fp32 proposal (relative error ~1e-7)
    # moves interval bounds slightly, which matters only for targets right at a bound
    same = (_expand(ids, cnt) == _expand(r["sample_ids"], r["sample_counts"])).float().mean()
    assert same >= 0.95, f"only {same:.3f} of draws equal the float64 oracle's"


def test_cpu_sampler_agrees_with_the_oracle_at_least_as_well_as_the_kernel():
    """On a peaked 49,152-id distribution (the demo's vocabulary), the blocked torch sampler's
    draws equal the float64 oracle's at least as often as the Triton kernel's do."""
    h, w, lab = _problem(64, 32, 49_152, scale=0.6)
    t = torch.cat([sampling_uniforms(0, s, 8, 50, "iid") for s in range(8)])
    r = teacher_head_ref(h, w, lab, targets=t)
    ref = _expand(r["sample_ids"], r["sample_counts"])
    agree = {}
    for backend in ("torch", "triton"):
        a = teacher_head(h, w, lab, targets=t, backend=backend)
        agree[backend] = (_expand(a["sample_ids"], a["sample_counts"]) == ref).float().mean().item()
    assert agree["torch"] >= agree["triton"] - 1e-3 and agree["torch"] > 0.99, agree


@functools.cache
def _estimates(sampler, tau, R=2000, N=16, V=40, restrict_topk=None, backend="torch"):
    """R independent estimates (rows) of p from one fixed teacher distribution."""
    h, w, lab = _problem(1, 8, V, seed=5, scale=0.8)
    p = torch.softmax((h @ w.T).double(), -1)[0].cpu()
    H, L = h.expand(R, -1).contiguous(), lab.expand(R).contiguous()
    if restrict_topk:  # the biased sampler: draw only among the top-K, renormalised
        keep = p.topk(restrict_topk).indices
        wk = w.clone()
        mask = torch.ones(V, dtype=torch.bool)
        mask[keep] = False
        bias = torch.zeros(V, device=DEV)
        bias[mask.to(DEV)] = -1e4
    else:
        wk, bias = w, None
    t = torch.cat([sampling_uniforms(9, s, 1, N, sampler) for s in range(R)])
    out = teacher_head(H, wk, L, targets=t, tau=tau, bias=bias, backend=backend)
    est = torch.zeros(R, V, dtype=torch.float64)
    vals = out["sample_counts"].double().cpu() / N
    if "sample_weights" in out:
        vals = vals * out["sample_weights"].double().cpu()
    ids = out["sample_ids"].long().cpu()
    est.scatter_add_(1, ids.clamp_min(0), torch.where(ids >= 0, vals, 0.0))
    return p, est


def _max_z(p, est):
    mean, sd = est.mean(0), est.std(0)
    R = est.shape[0]
    # tokens never drawn have sd 0: test them against the binomial sd they should have had
    floor = torch.sqrt(p * (1 - p) / (R * 16))
    z = (mean - p).abs() / torch.maximum(sd / math.sqrt(R), floor)
    return z.max().item()


# |z| < 4.5 for each of 40 tokens: false-alarm rate about 40 * 6.8e-6 = 3e-4 per test
Z_LIMIT = 4.5


@pytest.mark.parametrize(
    "backend, sampler, tau",
    [
        ("torch", "iid", 1.0),
        ("torch", "systematic", 1.0),
        ("torch", "iid", 0.8),
        ("torch", "systematic", 0.8),
        ("triton", "iid", 1.0),  # the interpreter is slow: two cases of the kernel
        ("triton", "systematic", 0.8),
    ],
)
def test_estimate_is_unbiased(backend, sampler, tau):
    p, est = _estimates(sampler, tau, backend=backend)
    assert _max_z(p, est) < Z_LIMIT


def test_systematic_variance_below_iid():
    _, iid = _estimates("iid", 1.0)
    _, sys_ = _estimates("systematic", 1.0)
    assert sys_.var(0).sum() < 0.7 * iid.var(0).sum()


def test_a_top_k_restricted_sampler_fails_the_same_test():
    p, est = _estimates("iid", 1.0, restrict_topk=5, backend="torch")
    assert _max_z(p, est) > 3 * Z_LIMIT  # the tail gets no mass, the head too much


def test_uniforms_depend_only_on_seed_sequence_and_position():
    a = sampling_uniforms(1, 42, 6, 8, "iid")
    assert torch.equal(a, sampling_uniforms(1, 42, 6, 8, "iid"))
    assert not torch.equal(a, sampling_uniforms(1, 43, 6, 8, "iid"))
    assert not torch.equal(a, sampling_uniforms(2, 42, 6, 8, "iid"))
    assert (a[:, 1:] >= a[:, :-1]).all() and ((a >= 0) & (a < 1)).all()
    s = sampling_uniforms(1, 42, 6, 8, "systematic")
    assert torch.allclose(s[:, 1:] - s[:, :-1], torch.full((6, 7), 1 / 8, dtype=torch.float64))
