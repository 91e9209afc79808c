"""Pieces both kernels share: the LM-head matmul of one chunk and the online log-sum-exp."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def lm_logits(h_CD: torch.Tensor, w_VD: torch.Tensor, b_V, acc: torch.dtype) -> torch.Tensor:
    """[C, V] logits in `acc` precision; on CUDA straight from bf16/fp16 operands (float32
    output, never rounded to the input dtype before the softmax)."""
    if h_CD.is_cuda and h_CD.dtype in (torch.bfloat16, torch.float16):
        z = torch.mm(h_CD, w_VD.T, out_dtype=acc)
    else:
        z = h_CD.to(acc) @ w_VD.to(acc).T
    if b_V is not None:
        z += b_V.to(acc)
    return z


@triton.jit
def row_logsumexp(z_row, V, scale, BLOCK_V: tl.constexpr):
    """log sum_i exp(scale * z_row[i]) over V entries, online over blocks of BLOCK_V:
    m' = max(m, max(x)), d' = d exp(m - m') + sum exp(x - m'), result m + log d."""
    m = float("-inf")
    d = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    return m + tl.log(d)
