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
    beta,
    log_inv_beta,
    SUPPORT_FN: tl.constexpr,
    OFF_FN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    o = tl.arange(0, BLOCK)
    m = o < N
    p = tl.load(p_ptr + o, mask=m, other=0.0)
    q = tl.load(q_ptr + o, mask=m, other=1.0)
    f, g = SUPPORT_FN(p, q, beta)
    tl.store(f_ptr + o, f, mask=m)
    tl.store(g_ptr + o, g, mask=m)
    h, g_out = OFF_FN(
        tl.sum(tl.where(m, p, 0.0), 0), tl.sum(tl.where(m, q, 0.0), 0), beta, log_inv_beta
    )
    tl.store(h_ptr, h)
    tl.store(h_ptr + 1, g_out)


@pytest.mark.parametrize("name", DV.NAMES)
def test_triton_terms_equal_torch_terms(name):
    d = DV.get(name)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    p = torch.rand(13, generator=g) * 0.06
    p[3] = 0.0  # a stored id the teacher gave no mass
    q = torch.rand(13, generator=g) * 0.05 + 1e-4
    beta = 0.2
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
        beta,
        float(torch.log(torch.tensor(1 / beta))),
        SUPPORT_FN=d.triton_support,
        OFF_FN=d.triton_off,
        BLOCK=16,
    )
    f_t, g_t = d.torch_support(p.double(), q.double(), beta)
    h_t, g_out_t = d.torch_off(p.sum().double(), q.sum().double(), beta)
    torch.testing.assert_close(f.cpu().double(), f_t, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gg.cpu().double(), g_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.cpu().double(), torch.stack([h_t, g_out_t]), rtol=1e-5, atol=1e-7)
