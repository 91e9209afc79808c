"""Teacher head: hidden states + LM head -> everything a cache stores, one [C, V] block at a time.

For each position t, from logits z = hidden_t @ W.T (+ b) at teacher temperature 1:
    lse_t        log-sum-exp of z
    token_lp_t   z[label_t] - lse_t (the actual next token's log-prob)
    top-K        the K largest z, as ids (ascending) and log-probs z - lse
    samples      N draws from the proposal r = softmax(z / tau), returned as distinct ids
                 (ascending) with counts; with tau != 1 also the importance weights p / r,
                 so that count / N * p / r estimates p without bias.

Samplers, both by inverse CDF over the vocabulary in id order, from sorted targets in [0, 1):
    iid         N independent uniforms, sorted (the paper's multinomial draws)
    systematic  one uniform U per position, targets (j + U) / N, j = 0..N-1: every id's
                expected count is N r_i (unbiased) with lower variance than iid
Target t draws id #{i : R_i <= t}, R the cumulative proposal with R_{V-1} = +inf (so a
target above the computed total, ~1e-7 short of 1, still draws an id). The uniforms come
from `sampling_uniforms(seed, seq_id, ...)`: draws depend only on the seed, the sequence
and the position, so a resumed or re-partitioned build reproduces them.

Three implementations of the draws, checked against each other by the tests:
    `_sample_fwd_kernel` (Triton, CUDA): per row, pass 1 online log-sum-exp of z / tau;
        pass 2 over vocabulary blocks: R = float64 cumsum of r + the running prefix; a tile
        of targets falling inside the block's [first, last) bound compares against every
        bound, a tile entirely above adds the block's count, one below adds nothing.
    `_draws_blocked` (torch, the CPU path): float32 r, float64 sums per block of
        SAMPLE_BLOCK ids, each target's block by searchsorted, then the bounds inside
        that block only. Never more than [C, V] float32 beside the logits.
    `reference.teacher_head_ref` (float64 dense searchsorted): the oracle.

Memory (`head_memory_bytes`): the head W [V, D] in the teacher's dtype (no float32 copy on
CUDA: the matmul accumulates in float32), plus two [C, V] float32 buffers per chunk.

Shapes: T positions, C positions in a chunk, D hidden, V vocabulary, K top-k, N samples.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsekd.kernels._common import lm_logits, row_logsumexp
from sparsekd.kernels.sparse_kl import INTERPRETED
from sparsekd.schemas.format import SAMPLERS

COMPILED_MAX_BLOCK_V = 1024  # vocabulary block of the sampling kernel
MAX_BLOCK_V = 16384 if INTERPRETED else COMPILED_MAX_BLOCK_V
BLOCK_N = 16  # targets per tile: a [BLOCK_V, BLOCK_N] comparison per tile inside a block
SAMPLE_BLOCK = 128  # ids per block of the torch sampler
# Extra memory per chunk ([C, V] float32 logits and proposal) by device type.
CHUNK_BUDGET_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}


def default_chunk_rows(vocab: int, device) -> int:
    budget = CHUNK_BUDGET_BYTES.get(torch.device(device).type, CHUNK_BUDGET_BYTES["cuda"])
    rows = max(1, budget // (2 * 4 * vocab))
    return max(16, min(4096, 1 << (rows.bit_length() - 1)))


def head_memory_bytes(vocab: int, hidden: int, dtype: torch.dtype, chunk_rows: int) -> int:
    """Device memory the teacher head needs beside the engine: W, one chunk's hidden states,
    its [C, V] logits and proposal buffers (float32), and the per-chunk outputs."""
    w = vocab * hidden * torch.empty((), dtype=dtype).element_size()
    return w + chunk_rows * (hidden * 4 + 2 * vocab * 4 + 4096)


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
    draw_ptr,  # [C, N] int32 in: zeros; out: the id each target draws (sorted, as t is)
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
    t_row = t_ptr + row * stride_t
    d_row = draw_ptr + row * stride_d
    # pass 1: online log-sum-exp of z / tau
    lse = row_logsumexp(z_row, V, inv_tau, BLOCK_V)
    tl.store(lse_ptr + row, lse)

    # pass 2: draw_j = #{i : R_i <= t_j}, accumulated block by block
    prefix = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float64), 0)  # float64 running total
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")) * inv_tau
        r = tl.exp(x - lse).to(tl.float64)
        finite = offs < V - 1  # the last id (and the masked tail) bounds everything
        R = tl.where(finite, tl.cumsum(r, 0) + prefix, float("inf"))
        last = tl.max(tl.where(finite, R, prefix), 0)  # the block's last finite bound
        n_finite = tl.sum(finite.to(tl.int32), 0)
        for n0 in range(0, N, BLOCK_N):
            no = n0 + tl.arange(0, BLOCK_N)
            n_ok = no < N
            t = tl.load(t_row + no, mask=n_ok, other=0.0)
            draw = tl.load(d_row + no, mask=n_ok, other=0)
            inside = n_ok & (t >= prefix) & (t < last)
            if tl.sum(inside.to(tl.int32), 0) > 0:  # some target falls among these bounds
                draw += tl.sum((R[:, None] <= t[None, :]).to(tl.int32), 0)
            else:
                draw += tl.where(t >= last, n_finite, 0)
            tl.store(d_row + no, draw, mask=n_ok)
        # carry the block's last finite bound itself, so the intervals stay contiguous
        prefix = last


def _draws_triton(z_CV: torch.Tensor, t_CN: torch.Tensor, tau: float):
    C, V = z_CV.shape
    N = t_CN.shape[1]
    draws = torch.zeros((C, N), dtype=torch.int32, device=z_CV.device)
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
        BLOCK_V=min(MAX_BLOCK_V, triton.next_power_of_2(V)),
        BLOCK_N=BLOCK_N,
    )
    return draws, lse_tau


def aot_targets(vocabs):
    """The sampling kernel's specialisations for these vocabularies (see `kernels.aot`)."""
    sig = {
        "z_ptr": "*fp32", "t_ptr": "*fp64", "draw_ptr": "*i32", "lse_ptr": "*fp32",
        "stride_z": "i32", "stride_t": "i32", "stride_d": "i32", "V": "i32", "N": "i32",
        "inv_tau": "fp32",
    }  # fmt: skip
    block_vs: dict[int, list[int]] = {}
    for V in vocabs:
        block_vs.setdefault(min(COMPILED_MAX_BLOCK_V, triton.next_power_of_2(V)), []).append(V)
    out = []
    for bv, vs in block_vs.items():
        ce = {"BLOCK_V": bv, "BLOCK_N": BLOCK_N}
        sig_ce = {**sig, **{k: "constexpr" for k in ce}}
        out.append(("_sample_fwd_kernel", dict(ce), vs, _sample_fwd_kernel, sig_ce, ce))
    return out


def _draws_blocked(
    z_CV: torch.Tensor, t_CN: torch.Tensor, tau: float, inplace: bool = False, rows_per_pass=128
):
    """The same draws in torch (the CPU path). e = exp((z - max) / tau) once in float32
    (over z itself when `inplace` and V is a multiple of SAMPLE_BLOCK: no new [C, V]
    buffer); float32 totals per block of SAMPLE_BLOCK ids, summed in float64 across
    blocks, locate each target's block; only that block's bounds are then formed (float64)
    and compared. Targets are scaled by the total instead of normalising e.
    Returns (draws, lse_tau)."""
    C, V = z_CV.shape
    N, B, dev = t_CN.shape[1], SAMPLE_BLOCK, z_CV.device
    nb = -(-V // B)
    m = z_CV.max(-1, keepdim=True).values
    if inplace and V % B == 0 and z_CV.dtype == torch.float32 and z_CV.is_contiguous():
        e = z_CV
    else:
        e = torch.zeros(C, nb * B, dtype=torch.float32, device=dev)
    torch.sub(z_CV, m, out=e[:, :V])
    if tau != 1.0:
        e[:, :V].div_(tau)
    e[:, :V].exp_()
    e_CbB = e.view(C, nb, B)
    ends = e_CbB.sum(-1).cumsum(-1, dtype=torch.float64)  # [C, nb] cumulative block totals
    total = ends[:, -1].clone()
    lse_tau = m[:, 0].double() / tau + torch.log(total)
    ends[:, -1] = float("inf")  # the last block (the last id) bounds everything
    t = t_CN.to(torch.float64) * total[:, None]
    blk = torch.searchsorted(ends, t, right=True).clamp_max(nb - 1)  # [C, N] target's block
    start = torch.where(blk > 0, ends.gather(1, (blk - 1).clamp_min(0)), 0.0)
    draws = torch.empty((C, N), dtype=torch.int64, device=dev)
    offs_B = torch.arange(B, device=dev)
    for c0 in range(0, C, rows_per_pass):  # [rows, N, B] float64 bounds, a few MB at a time
        c1 = min(C, c0 + rows_per_pass)
        b = blk[c0:c1]
        rows = torch.arange(c0, c1, device=dev)[:, None]
        bounds = e_CbB[rows, b].to(torch.float64).cumsum(-1) + start[c0:c1, :, None]
        bounds = torch.where(b[:, :, None] * B + offs_B >= V - 1, float("inf"), bounds)
        draws[c0:c1] = b * B + (bounds <= t[c0:c1, :, None]).sum(-1)
    return draws.to(torch.int32), lse_tau.to(z_CV.dtype)


def distinct_with_counts(draws_CN: torch.Tensor):
    """Sorted draws -> (ids, counts) [C, N]: distinct ids ascending first, -1 / 0 after."""
    C, N = draws_CN.shape
    first = torch.ones_like(draws_CN, dtype=torch.bool)
    first[:, 1:] = draws_CN[:, 1:] != draws_CN[:, :-1]
    run = torch.cumsum(first.to(torch.int64), 1) - 1  # which distinct id each draw belongs to
    ids = torch.full((C, N), -1, dtype=torch.int32, device=draws_CN.device)
    cnt = torch.zeros((C, N), dtype=torch.int32, device=draws_CN.device)
    ids.scatter_(1, run, draws_CN.to(torch.int32))
    cnt.scatter_add_(1, run, torch.ones_like(draws_CN, dtype=torch.int32))
    return ids, cnt


def _check_inputs(hidden, weight, labels, k, targets, tau, backend) -> None:
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
    if use_triton and not hidden.is_cuda and not INTERPRETED:
        raise ValueError("backend 'triton' needs CUDA or TRITON_INTERPRET=1 set before import")


def _head_chunk(h_CD, weight, bias, labels_C, k, t_CN, tau, draw) -> dict:
    """Everything the head returns, for one chunk of positions (one [C, V] logits block)."""
    acc = torch.float64 if h_CD.dtype == torch.float64 else torch.float32
    z_CV = lm_logits(h_CD, weight, bias, acc)
    z_lab = z_CV.gather(1, labels_C.long()[:, None])[:, 0]
    out = {}
    lse = None if t_CN is not None and tau == 1.0 else z_CV.logsumexp(-1)
    if t_CN is not None:  # at tau = 1 the sampler's normaliser is the log-sum-exp
        if draw is _draws_blocked:  # z is needed again only for top-K or the weights
            draws, lse_tau = draw(z_CV, t_CN, tau, inplace=not k and tau == 1.0)
        else:
            draws, lse_tau = draw(z_CV, t_CN, tau)
        lse = lse_tau.to(acc) if lse is None else lse
        out["sample_ids"], out["sample_counts"] = distinct_with_counts(draws)
    out["lse"], out["token_logprob"] = lse, z_lab - lse
    if k:
        top_z, top_i = z_CV.topk(k, dim=-1)
        order = top_i.argsort(dim=-1)
        out["topk_ids"] = top_i.gather(1, order).to(torch.int32)
        out["topk_logprobs"] = top_z.gather(1, order) - lse[:, None]
    if t_CN is not None and tau != 1.0:
        ids = out["sample_ids"]
        zi = z_CV.gather(1, ids.clamp_min(0).long())
        w = torch.exp((zi - lse[:, None]) - (zi / tau - lse_tau[:, None].to(zi.dtype)))
        out["sample_weights"] = torch.where(ids >= 0, w, 0.0)
    return out


def teacher_head(
    hidden,
    weight,
    labels,
    *,
    k: int = 0,
    targets=None,
    tau: float = 1.0,
    bias=None,
    chunk_rows: int | None = None,
    backend: str = "auto",
    sampler=None,
) -> dict:
    """The sparse view of the teacher's next-token distributions.

    Args:
        hidden: [T, D] final hidden states. weight: [V, D] LM head. bias: [V] optional.
        labels: [T] actual next tokens.
        k: top-K size (0: none).
        targets: [T, N] sorted sampling targets in [0, 1) (`sampling_uniforms`), or None.
        tau: proposal temperature for sampling.
        chunk_rows: positions per [C, V] block (default: from CHUNK_BUDGET_BYTES).
        backend: "triton" | "torch" | "auto" (triton on CUDA).
        sampler: override of the draws function (the oracle passes its float64 one).
    Returns dict of tensors: lse [T], token_logprob [T]; with k: topk_ids [T, K] (ascending
    id), topk_logprobs [T, K]; with targets: sample_ids [T, N] int32 (-1 padded, distinct,
    ascending), sample_counts [T, N] int32, and with tau != 1 sample_weights [T, N] (p / r).
    """
    _check_inputs(hidden, weight, labels, k, targets, tau, backend)
    use_triton = backend == "triton" or (backend == "auto" and hidden.is_cuda)
    draw = sampler or (_draws_triton if use_triton else _draws_blocked)
    C = chunk_rows or default_chunk_rows(weight.shape[0], hidden.device)
    out: dict[str, list] = {}
    for r0 in range(0, hidden.shape[0], C):
        rows = slice(r0, min(hidden.shape[0], r0 + C))
        t = None if targets is None else targets[rows].to(hidden.device)
        for key, value in _head_chunk(
            hidden[rows], weight, bias, labels[rows], k, t, tau, draw
        ).items():
            out.setdefault(key, []).append(value)
    return {key: torch.cat(v) for key, v in out.items()}
