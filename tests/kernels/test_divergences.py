"""The divergence table: one definition per divergence, the same in docs/losses.md, and its
torch and Triton functions agreeing term by term."""

from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from sparsekd.kernels import divergences as DV

DOCS = Path(__file__).resolve().parents[2] / "docs" / "losses.md"


def test_docs_table_is_the_registry():
    assert DV.markdown_table() in DOCS.read_text(), (
        "docs/losses.md's divergence table must be python -c 'from sparsekd.kernels."
        "divergences import markdown_table; print(markdown_table())'"
    )


def test_cli_choices_are_the_registry():
    from sparsekd.student_train.config import LOSSES

    assert LOSSES == ("ce", *DV.DIVERGENCES)


@triton.jit
def _terms_kernel(
    p_ptr,
    q_ptr,
    f_ptr,
    g_ptr,
    h_ptr,
    N,
    a,
    c,
    SUPPORT_FN: tl.constexpr,
    OFF_FN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    o = tl.arange(0, BLOCK)
    m = o < N
    p = tl.load(p_ptr + o, mask=m, other=0.0)
    q = tl.load(q_ptr + o, mask=m, other=1.0)
    f, g = SUPPORT_FN(p, q, a)
    tl.store(f_ptr + o, f, mask=m)
    tl.store(g_ptr + o, g, mask=m)
    h, g_out = OFF_FN(tl.sum(tl.where(m, p, 0.0), 0), tl.sum(tl.where(m, q, 0.0), 0), a, c)
    tl.store(h_ptr, h)
    tl.store(h_ptr + 1, g_out)


@pytest.mark.parametrize(
    "name,a",
    [(n, 0.2) for n in DV.NAMES] + [("taid", 0.0), ("taid", 0.7), ("taid", 1.0)],
)
def test_triton_terms_equal_torch_terms(name, a):
    d = DV.get(name)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    p = torch.rand(13, generator=g) * 0.06
    p[3] = 0.0  # a stored id the teacher gave no mass
    q = torch.rand(13, generator=g) * 0.05 + 1e-4
    f, gg, h = (
        torch.empty(13, device=dev),
        torch.empty(13, device=dev),
        torch.empty(2, device=dev),
    )
    _terms_kernel[(1,)](
        p.to(dev),
        q.to(dev),
        f,
        gg,
        h,
        13,
        a,
        float(d.const(torch.tensor(a, dtype=torch.float64))),
        SUPPORT_FN=d.triton_support,
        OFF_FN=d.triton_off,
        BLOCK=16,
    )
    par = DV.param_tensor(d, a, "cpu", torch.float64)
    f_t, g_t = d.torch_support(p.double(), q.double(), par[0])
    h_t, g_out_t = d.torch_off(p.sum().double(), q.sum().double(), par[0], par[1])
    torch.testing.assert_close(f.cpu().double(), f_t, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gg.cpu().double(), g_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.cpu().double(), torch.stack([h_t, g_out_t]), rtol=1e-5, atol=1e-7)


def _dense_taid(p_V, z_V, t):
    """TAID over the whole vocabulary from its definition, float64, by autograd."""
    z = z_V.clone().requires_grad_(True)
    logq = torch.log_softmax(z, -1)
    m = t * p_V + (1 - t) * logq.detach().exp()
    loss = torch.where(m > 0, m * (torch.log(m.clamp_min(1e-300)) - logq), 0.0).sum()
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("t", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("target", ["topk", "full"])
def test_taid_closed_form_equals_the_definition(t, target):
    """The support sum plus the closed-form off-support term, and the gradient
    q_j (g_j - G), equal KL(m || q) and its autograd gradient over the whole vocabulary,
    for a truncated top-K target (P < 1) and one summing to 1."""
    g = torch.Generator().manual_seed(1)
    V, S = 50, 7
    z = torch.randn(V, generator=g, dtype=torch.float64) * 2
    p_full = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 3, -1)
    ids = torch.topk(p_full, S).indices
    p_S = p_full[ids] if target == "topk" else p_full[ids] / p_full[ids].sum()
    p_V = torch.zeros(V, dtype=torch.float64).scatter(0, ids, p_S)
    want_loss, want_grad = _dense_taid(p_V, z, t)

    d = DV.get("taid")
    q = torch.softmax(z, -1)
    par = DV.param_tensor(d, t, "cpu", torch.float64)
    loss, g_S, g_out, q_S = DV.row_terms(
        d, p_S[None], q[ids][None], torch.ones(1, S, dtype=torch.bool), par
    )
    G = (q[ids] * g_S[0]).sum() + (1 - q_S[0]) * g_out[0]
    grad = q * (g_out[0] - G)
    grad[ids] = q[ids] * (g_S[0] - G)
    torch.testing.assert_close(loss[0], want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    if t == 1.0:  # forward KL on the same target, exactly
        f_loss, *_ = DV.row_terms(
            DV.get("fkl"),
            p_S[None],
            q[ids][None],
            torch.ones(1, S, dtype=torch.bool),
            DV.param_tensor(DV.get("fkl"), 0.0, "cpu", torch.float64),
        )
        torch.testing.assert_close(loss, f_loss, rtol=0, atol=0)
