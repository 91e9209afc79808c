"""Teacher head: hidden states + LM head -> everything a cache stores, one [C, V] block at a time.

For each position t, from logits z = hidden_t @ W.T (+ b) at teacher temperature 1:
    lse_t        log-sum-exp of z
    token_lp_t   z[label_t] - lse_t (the actual next token's log-prob)
    top-K        the K largest z, as ids and log-probs z - lse
    samples      N draws from the proposal r = softmax(z / tau), returned as distinct ids
                 (ascending) with counts; with tau != 1 also the importance weights p / r,
                 so that count / N * p / r estimates p without bias.

Samplers, both by inverse CDF over the vocabulary in id order, from sorted targets in [0, 1):
    iid         N independent uniforms, sorted (the paper's multinomial draws)
    systematic  one uniform U per position, targets (j + U) / N, j = 0..N-1: every id's
                expected count is N r_i (unbiased) with lower variance than iid
Id i is drawn once for every target in [R_{i-1}, R_i), R the cumulative proposal. The
uniforms come from `sampling_uniforms(seed, seq_id, ...)`, so draws depend only on the seed,
the sequence and the position: a resumed or re-partitioned build reproduces them.

Kernel (`_sample_fwd_kernel`, one program per row, over vocabulary blocks):
    pass 1: online log-sum-exp of z / tau
    pass 2: r = exp(z / tau - lse_tau); R = float64 inclusive cumsum plus the running prefix
            (the previous block's last bound, so intervals are exactly contiguous); each
            target j accumulates #{i : R_i <= t_j}, the id it draws (a searchsorted)
The draws come out sorted; `_distinct_with_counts` turns them into distinct ids and counts.
The last id's bound is +inf, so a target above the computed total still draws an id.
`teacher_head_ref` is the same in float64 torch (the oracle).

Shapes: T positions, C positions in a chunk, D hidden, V vocabulary, K top-k, N samples.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sparsekd.kernels._triton_common import row_logsumexp
from sparsekd.kernels.reference import _logits

SAMPLERS = ("iid", "systematic")
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_MAX_BLOCK_V = 16384 if _INTERPRETED else 2048


def sampling_uniforms(seed: int, seq_id: int, positions: int, n: int, sampler: str) -> torch.Tensor:
    """Sorted targets in [0, 1) for one sequence: float64 [positions, n]."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    g = torch.Generator().manual_seed((seed * 1_000_003 + seq_id) % (2**63 - 1))
    if sampler == "iid":
        return torch.rand(positions, n, generator=g, dtype=torch.float64).sort(dim=1).values
    u = torch.rand(positions, 1, generator=g, dtype=torch.float64)
    return (torch.arange(n, dtype=torch.float64)[None, :] + u) / n


@triton.jit
def _sample_fwd_kernel(
    # pointers
    z_ptr,  # [C, V] float32 logits at temperature 1
    t_ptr,  # [C, N] float64 sorted targets in [0, 1)
    draw_ptr,  # [C, N] int32 out: the id drawn by each target (sorted, as the targets are)
    lse_ptr,  # [C] float32 out: log-sum-exp of z / tau
    # strides
    stride_z,
    stride_t,
    stride_d,
    # sizes
    V,
    N,
    inv_tau,
    BLOCK_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    # pass 1: online log-sum-exp of z / tau
    lse = row_logsumexp(z_row, V, inv_tau, BLOCK_V)
    tl.store(lse_ptr + row, lse)

    # pass 2: the id target j draws is #{i : R_i <= t_j}, R the cumulative proposal
    n_offs = tl.arange(0, BLOCK_N)
    n_ok = n_offs < N
    t = tl.load(t_ptr + row * stride_t + n_offs, mask=n_ok, other=0.0)
    draw = tl.zeros([BLOCK_N], dtype=tl.int32)
    prefix = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float64), 0)  # float64 running total
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")) * inv_tau
        r = tl.exp(x - lse).to(tl.float64)
        R = tl.cumsum(r, 0) + prefix  # float64: no drift across 128k ids
        # the last id (and the masked tail) bounds everything: a target above the computed
        # total (~1e-7 short of 1) still draws an id
        R = tl.where(offs >= V - 1, float("inf"), R)
        draw += tl.sum((R[:, None] <= t[None, :]).to(tl.int32), 0)
        # carry the block's last finite bound itself, so the intervals stay contiguous
        prefix = tl.max(tl.where(offs < V - 1, R, 0.0), 0)
    tl.store(draw_ptr + row * stride_d + n_offs, draw, mask=n_ok)


def _draws_triton(z_CV: torch.Tensor, t_CN: torch.Tensor, tau: float):
    C, V = z_CV.shape
    N = t_CN.shape[1]
    draws = torch.empty((C, N), dtype=torch.int32, device=z_CV.device)
    lse_tau = torch.empty(C, dtype=torch.float32, device=z_CV.device)
    t = t_CN.to(torch.float64).contiguous()
    _sample_fwd_kernel[(C,)](
        z_CV,
        t,
        draws,
        lse_tau,
        z_CV.stride(0),
        t.stride(0),
        draws.stride(0),
        V,
        N,
        1.0 / tau,
        BLOCK_V=min(_MAX_BLOCK_V, triton.next_power_of_2(V)),
        BLOCK_N=max(triton.next_power_of_2(N), 2),
    )
    return draws, lse_tau


def _draws_torch(z_CV: torch.Tensor, t_CN: torch.Tensor, tau: float):
    """float64 inverse-CDF draws (the oracle)."""
    zt = z_CV.double() / tau
    lse_tau = torch.logsumexp(zt, -1)
    R = torch.exp(zt - lse_tau[:, None]).cumsum(-1)
    R[:, -1] = float("inf")
    draws = torch.searchsorted(R, t_CN.double(), right=True).clamp_max(z_CV.shape[1] - 1)
    return draws.to(torch.int32), lse_tau.float()


def _distinct_with_counts(draws_CN: torch.Tensor):
    """Sorted draws -> (ids, counts) [C, N]: distinct ids ascending first, -1 / 0 after."""
    C, N = draws_CN.shape
    first = torch.ones_like(draws_CN, dtype=torch.bool)
    first[:, 1:] = draws_CN[:, 1:] != draws_CN[:, :-1]
    run = torch.cumsum(first.to(torch.int64), 1) - 1  # which distinct id each draw belongs to
    ids = torch.full((C, N), -1, dtype=torch.int32, device=draws_CN.device)
    cnt = torch.zeros((C, N), dtype=torch.int32, device=draws_CN.device)
    ids.scatter_(1, run, draws_CN)
    cnt.scatter_add_(1, run, torch.ones_like(draws_CN))
    return ids, cnt


def teacher_head(
    hidden,
    weight,
    labels,
    *,
    k: int = 0,
    targets=None,
    tau: float = 1.0,
    bias=None,
    chunk_rows: int = 1024,
    backend: str = "auto",
) -> dict:
    """The sparse view of the teacher's next-token distributions.

    Args:
        hidden: [T, D] final hidden states. weight: [V, D] LM head. bias: [V] optional.
        labels: [T] actual next tokens.
        k: top-K size (0: none).
        targets: [T, N] sorted sampling targets in [0, 1) (`sampling_uniforms`), or None.
        tau: proposal temperature for sampling.
        backend: "triton" | "torch" | "auto" (triton on CUDA).
    Returns dict of tensors: lse [T], token_logprob [T]; with k: topk_ids [T, K] (ascending
    id), topk_logprobs [T, K]; with targets: sample_ids [T, N] int32 (-1 padded, distinct,
    ascending), sample_counts [T, N] int32, and with tau != 1 sample_weights [T, N] (p / r).
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be auto, torch or triton, got {backend!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [T, D] and weight [V, D] expected, got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}"
        )
    T, V = hidden.shape[0], weight.shape[0]
    if labels.shape != (T,):
        raise ValueError(f"labels must be [T={T}]")
    if not 0 <= k <= V:
        raise ValueError(f"k must be in 0..{V}, got {k}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if targets is not None and (targets.dim() != 2 or targets.shape[0] != T):
        raise ValueError(f"targets must be [T={T}, N]")
    use_triton = backend == "triton" or (backend == "auto" and hidden.is_cuda)
    if use_triton and not hidden.is_cuda and not _INTERPRETED:
        raise ValueError("backend 'triton' needs CUDA or TRITON_INTERPRET=1 set before import")
    out: dict[str, list] = {}
    for r0 in range(0, T, chunk_rows):
        r1 = min(T, r0 + chunk_rows)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        z_CV = _logits(hidden[r0:r1], weight, bias, acc)  # the one [C, V] block
        lse = torch.logsumexp(z_CV, -1)
        lab = labels[r0:r1].long()
        out.setdefault("lse", []).append(lse)
        out.setdefault("token_logprob", []).append(z_CV.gather(1, lab[:, None])[:, 0] - lse)
        if k:
            top_z, top_i = z_CV.topk(k, dim=-1)
            order = top_i.argsort(dim=-1)
            out.setdefault("topk_ids", []).append(top_i.gather(1, order).to(torch.int32))
            out.setdefault("topk_logprobs", []).append(top_z.gather(1, order) - lse[:, None])
        if targets is not None:
            t = targets[r0:r1].to(z_CV.device)
            draws, lse_tau = (_draws_triton if use_triton else _draws_torch)(z_CV, t, tau)
            ids, cnt = _distinct_with_counts(draws)
            out.setdefault("sample_ids", []).append(ids)
            out.setdefault("sample_counts", []).append(cnt)
            if tau != 1.0:
                zi = z_CV.gather(1, ids.clamp_min(0).long())
                w = torch.exp((zi - lse[:, None]) - (zi / tau - lse_tau[:, None]))
                out.setdefault("sample_weights", []).append(torch.where(ids >= 0, w, 0.0))
    return {key: torch.cat(v) for key, v in out.items()}


def teacher_head_ref(hidden, weight, labels, *, k=0, targets=None, tau=1.0, bias=None):
    """float64 dense oracle with the same outputs (ids and counts from float64 sampling)."""
    return teacher_head(
        hidden.double(),
        weight.double(),
        labels,
        k=k,
        targets=targets,
        tau=tau,
        bias=None if bias is None else bias.double(),
        chunk_rows=1 << 30,
        backend="torch",
    )
