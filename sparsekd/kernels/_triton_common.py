"""Device functions shared by the Triton kernels."""

import triton
import triton.language as tl


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
