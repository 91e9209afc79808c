"""Teacher head (Triton under the interpreter on CPU) against the float64 oracle, and the
samplers' statistics: unbiased mean, systematic variance below iid, and a top-K-restricted
sampler caught by the same test."""

import functools
import math

import pytest
import torch

from sparsekd.kernels import teacher_head as TH
from sparsekd.kernels.teacher_head import sampling_uniforms, teacher_head, teacher_head_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(T, D, V, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g)
    w = torch.randn(V, D, generator=g) * scale
    lab = torch.randint(0, V, (T,), generator=g)
    return h.to(DEV), w.to(DEV), lab.to(DEV)


@pytest.mark.parametrize("block_v", [512, None], ids=["blocks-of-512", "default-blocks"])
@pytest.mark.parametrize("T, D, V, K", [(37, 32, 3001, 8), (9, 16, 70_001, 1), (5, 8, 257, 64)])
@pytest.mark.parametrize("sampler", ["iid", "systematic"])
def test_kernel_matches_float64_oracle(monkeypatch, block_v, T, D, V, K, sampler):
    if block_v:
        monkeypatch.setattr(TH, "_MAX_BLOCK_V", block_v)
    h, w, lab = _problem(T, D, V)
    N = 50
    t = sampling_uniforms(3, 11, T, N, sampler)
    a = teacher_head(h, w, lab, k=K, targets=t, backend="triton", chunk_rows=16)
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

    # draw for draw against float64 sampling: the fp32 log-sum-exp (relative error ~1e-6)
    # moves interval bounds slightly, which matters only for targets right at a bound
    def expand(i, c):
        return torch.repeat_interleave(i[c > 0].long().cpu(), c[c > 0].long().cpu())

    ours = torch.stack([expand(i, c) for i, c in zip(ids, cnt)])
    ref = torch.stack([expand(i, c) for i, c in zip(r["sample_ids"], r["sample_counts"])])
    same = (ours == ref).float().mean()
    assert same >= 0.95, f"only {same:.3f} of draws equal the float64 oracle's"


@functools.cache
def _estimates(sampler, tau, R=2000, N=16, V=40, restrict_topk=None, backend="triton"):
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


@pytest.mark.parametrize("sampler", ["iid", "systematic"])
@pytest.mark.parametrize("tau", [1.0, 0.8])
def test_estimate_is_unbiased(sampler, tau):
    p, est = _estimates(sampler, tau)
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
