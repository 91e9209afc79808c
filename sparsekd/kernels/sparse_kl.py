"""`sparse_kl_loss`: LM head + full-vocabulary log-softmax + divergence to a sparse teacher
target, forward and backward, without ever holding a [N, V] logits tensor.

Rows are processed in chunks of C. Per chunk: z = hidden_C @ weight.T (+ bias), one [C, V]
float32 buffer; the row pass turns it, in place, into dL/dz; two matmuls then give the
chunk's d_hidden and its share of d_weight. The gradients are complete after the forward,
so the backward only scales them by the upstream gradient (the fused-linear-loss pattern).

The row pass (`_sparse_kl_fwd_kernel`, one program per row; `sparse_kl_rows_torch` is the
same in plain torch):
    pass 1, over vocabulary blocks: online log-sum-exp of z / T
        m' = max(m, max(x)),  d' = d exp(m - m') + sum exp(x - m'),  lse = m + log d
    support (S ids): q_i = exp(z_i / T - lse), q_S = sum q_i; per divergence the loss and
        g_i = dL/dq_i on S, g_out = dL/dq_i off S (constant); G = sum q g + (1 - q_S) g_out
        (formulas: kernels/reference.py); CE: -log q[label]
    pass 2, over vocabulary blocks: dz_j = q_j (kd_scale (g_out - G) + ce_scale) / T
    returned, not written: the sparse part kd_scale q_i (g_i - g_out) / T at each id (the
        caller scatter-adds it, with -ce_scale / T at the label), so no thread reads an
        address another thread of the program writes.

Backends: "triton" (this kernel; compiled on CUDA, the Triton interpreter on CPU when
TRITON_INTERPRET=1 is set before import), "torch", "auto" (triton on CUDA, torch otherwise).

Shape legend: N rows (tokens), C rows in a chunk, D hidden, V vocabulary, S support size.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from sparsekd.kernels._triton_common import row_logsumexp
from sparsekd.kernels.reference import DIVERGENCES, sparse_kl_chunked_fwd, sparse_kl_rows_torch

BACKENDS = ("auto", "torch", "triton")
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_DIV_CODE = {name: i for i, name in enumerate(DIVERGENCES)}  # fkl ghost skew_fkl skew_rkl jsd
_TINY = 1e-30
# The interpreter runs each block op as one numpy call: larger blocks are faster there.
_MAX_BLOCK_V = 16384 if _INTERPRETED else 4096


@triton.jit
def _xlogx(a, b):
    # a log(a / b), defined as 0 where a == 0
    return tl.where(a > 0, a * (tl.log(tl.maximum(a, 1e-30)) - tl.log(b)), 0.0)


@triton.jit
def _sparse_kl_fwd_kernel(
    # pointers
    z_ptr,  # [C, V] float32 logits (before 1/T); overwritten with the dense part of dL/dz
    ids_ptr,  # [C, S] int64 support ids, -1 = padding
    p_ptr,  # [C, S] teacher probabilities
    labels_ptr,  # [C] int64 CE targets, -1 = none
    kd_scale_ptr,  # [C] float32 kd_weight / n_kd on rows with support, else 0
    ce_scale_ptr,  # [C] float32 ce_weight / n_ce on labelled rows, else 0
    kd_out_ptr,  # [C] float32 per-row KD loss
    ce_out_ptr,  # [C] float32 per-row CE loss
    corr_ptr,  # [C, S] float32 sparse part of dL/dz at ids
    # strides
    stride_z,
    stride_ids,
    stride_p,
    stride_corr,
    # sizes and scalars
    V,
    S,
    inv_temp,
    beta,
    log_inv_beta,
    DIV: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z

    # pass 1: online log-sum-exp over vocabulary blocks
    lse = row_logsumexp(z_row, V, inv_temp, BLOCK_V)

    # CE: -log q[label] (read before pass 2 overwrites z)
    label = tl.load(labels_ptr + row)
    z_lab = tl.load(z_row + tl.maximum(label, 0)).to(tl.float32) * inv_temp
    ce = tl.where(label >= 0, lse - z_lab, 0.0)

    # the support: q, loss and g = dL/dq per divergence
    so = tl.arange(0, BLOCK_S)
    ids = tl.load(ids_ptr + row * stride_ids + so, mask=so < S, other=-1)
    valid = ids >= 0
    p = tl.load(p_ptr + row * stride_p + so, mask=valid, other=0.0).to(tl.float32)
    zs = tl.load(z_row + tl.maximum(ids, 0), mask=valid, other=0.0).to(tl.float32) * inv_temp
    q = tl.where(valid, tl.exp(zs - lse), 0.0)
    q_S = tl.sum(q, 0)
    qv = tl.where(valid, q, 1.0)  # safe divisor / log argument on padding
    g_out = 0.0
    if DIV == 0 or DIV == 1:  # fkl, ghost
        kd = tl.sum(_xlogx(p, qv), 0)
        g = -p / qv
        if DIV == 1:
            p_t = tl.maximum(1.0 - tl.sum(p, 0), 0.0)
            q_t = tl.maximum(1.0 - q_S, 1e-30)
            kd += _xlogx(p_t, q_t)
            g_out = -p_t / q_t
    elif DIV == 2:  # skew_fkl: m = b p + (1 - b) q
        mix = beta * p + (1.0 - beta) * qv
        kd = tl.sum(_xlogx(p, mix), 0)
        g = -(1.0 - beta) * p / mix
    elif DIV == 3:  # skew_rkl: m = (1 - b) p + b q
        mix = (1.0 - beta) * p + beta * qv
        kd = tl.sum(tl.where(valid, _xlogx(qv, mix), 0.0), 0) + (1.0 - q_S) * log_inv_beta
        g = tl.log(qv / mix) + (1.0 - beta) * p / mix
        g_out = log_inv_beta
    else:  # jsd: m = (1 - b) p + b q, b the student's weight
        mix = (1.0 - beta) * p + beta * qv
        kd = tl.sum(tl.where(valid, beta * _xlogx(qv, mix), 0.0) + (1.0 - beta) * _xlogx(p, mix), 0)
        kd += beta * (1.0 - q_S) * log_inv_beta
        g = beta * tl.log(qv / mix)
        g_out = beta * log_inv_beta
    g = tl.where(valid, g, 0.0)
    G = tl.sum(q * g, 0) + (1.0 - q_S) * g_out

    kd_scale = tl.load(kd_scale_ptr + row)
    ce_scale = tl.load(ce_scale_ptr + row)
    tl.store(kd_out_ptr + row, kd)
    tl.store(ce_out_ptr + row, ce)
    corr = kd_scale * q * (g - g_out) * inv_temp
    tl.store(corr_ptr + row * stride_corr + so, tl.where(valid, corr, 0.0), mask=so < S)

    # pass 2: the dense part of dL/dz, in place over the logits
    dense = (kd_scale * (g_out - G) + ce_scale) * inv_temp
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
        tl.store(z_row + offs, tl.exp(x - lse) * dense, mask=offs < V)


def sparse_kl_rows_triton(
    z_CV, ids_CS, p_CS, labels_C, kd_scale_C, ce_scale_C, *, divergence, temperature, beta
):
    """Launcher with the contract of `reference.sparse_kl_rows_torch`."""
    C, V = z_CV.shape
    S = ids_CS.shape[1]
    if z_CV.dtype != torch.float32 or not z_CV.is_contiguous():
        raise ValueError("the Triton row pass needs a contiguous float32 logits chunk")
    dev = z_CV.device
    ids_CS = ids_CS.contiguous()
    p_CS = p_CS.to(torch.float32).contiguous()
    kd_C = torch.empty(C, dtype=torch.float32, device=dev)
    ce_C = torch.empty(C, dtype=torch.float32, device=dev)
    corr_CS = torch.empty(C, S, dtype=torch.float32, device=dev)
    _sparse_kl_fwd_kernel[(C,)](
        z_CV,
        ids_CS,
        p_CS,
        labels_C.contiguous(),
        kd_scale_C.to(torch.float32).contiguous(),
        ce_scale_C.to(torch.float32).contiguous(),
        kd_C,
        ce_C,
        corr_CS,
        z_CV.stride(0),
        ids_CS.stride(0),
        p_CS.stride(0),
        corr_CS.stride(0),
        V,
        S,
        1.0 / temperature,
        beta,
        float(torch.log(torch.tensor(1.0 / beta))),
        DIV=_DIV_CODE[divergence],
        BLOCK_V=min(_MAX_BLOCK_V, triton.next_power_of_2(V)),
        BLOCK_S=max(triton.next_power_of_2(S), 2),
    )
    return kd_C, ce_C, corr_CS


def _validate(
    hidden, weight, ids, probs, labels, bias, divergence, temperature, beta, backend, ignore_index
):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not hidden.is_cuda and not _INTERPRETED:
        raise ValueError(
            "backend 'triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set "
            "before sparsekd is imported (CPU interpreter)"
        )
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, D] and weight [V, D] expected, got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}"
        )
    N, V = hidden.shape[0], weight.shape[0]
    if ids.dim() != 2 or ids.shape[0] != N or probs.shape != ids.shape:
        raise ValueError(
            f"ids and probs must both be [N={N}, S], got {tuple(ids.shape)} and "
            f"{tuple(probs.shape)}"
        )
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32 or int64, got {ids.dtype}")
    if not probs.is_floating_point() or not hidden.is_floating_point():
        raise ValueError("hidden, weight and probs must be floating point")
    if labels is not None and (labels.shape != (N,) or labels.is_floating_point()):
        raise ValueError(f"labels must be an integer tensor [N={N}]")
    if bias is not None and bias.shape != (V,):
        raise ValueError(f"bias must be [V={V}], got {tuple(bias.shape)}")
    devices = {t.device for t in (hidden, weight, ids, probs, labels, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if ids.numel():
        if int(ids.max()) >= V or int(ids.min()) < -1:
            raise ValueError(f"ids must be in [0, {V}) or -1 for padding")
        srt = ids.sort(dim=1).values
        if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
            raise ValueError("ids repeat within a row; the support must be distinct")
    if labels is not None and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, {V}) or ignore_index")


class SparseKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, probs, labels, opts):
        need = (
            hidden.requires_grad
            or weight.requires_grad
            or (bias is not None and bias.requires_grad)
        )
        loss, (kd, ce), d_h, d_w, d_b = sparse_kl_chunked_fwd(
            hidden, weight, ids, probs, labels, bias, need_grad=need, **opts
        )
        if need:
            ctx.save_for_backward(
                d_h, d_w.to(weight.dtype), d_b.to(bias.dtype) if d_b is not None else None
            )
        ctx.has_bias = bias is not None
        kd, ce = kd.to(hidden.dtype), ce.to(hidden.dtype)
        ctx.mark_non_differentiable(kd, ce)
        return loss.to(hidden.dtype), kd, ce

    @staticmethod
    def backward(ctx, grad_out, _grad_kd=None, _grad_ce=None):
        d_h, d_w, d_b = ctx.saved_tensors
        return (
            d_h * grad_out,
            d_w * grad_out,
            d_b * grad_out if d_b is not None else None,
            None,
            None,
            None,
            None,
        )


def sparse_kl_loss(
    hidden,
    weight,
    ids,
    probs,
    labels=None,
    *,
    divergence="fkl",
    kd_weight=1.0,
    ce_weight=0.0,
    temperature=1.0,
    beta=0.1,
    ignore_index=-100,
    backend="auto",
    bias=None,
    chunk_rows=1024,
):
    """KD (and optional CE) loss of a student LM head against a sparse teacher target.

    Args:
        hidden: [N, D] student final hidden states.
        weight: [V, D] LM head. bias: [V] optional.
        ids: [N, S] int teacher support, distinct per row, -1 = padding.
        probs: [N, S] teacher probability estimates (0 on padding).
        labels: [N] next-token ids for the CE term, `ignore_index` to skip.
        divergence: fkl | ghost | skew_fkl | skew_rkl | jsd (see kernels/reference.py).
        backend: triton | torch | auto (triton on CUDA, torch otherwise).
        chunk_rows: rows per chunk; extra memory is about chunk_rows x V x 4 bytes.
    Returns:
        0-d tensor: kd_weight * mean KD over rows with support + ce_weight * mean CE over
        labelled rows.
    """
    return _sparse_kl(
        hidden,
        weight,
        ids,
        probs,
        labels,
        divergence=divergence,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        temperature=temperature,
        beta=beta,
        ignore_index=ignore_index,
        backend=backend,
        bias=bias,
        chunk_rows=chunk_rows,
    )[0]


def sparse_kl_loss_parts(hidden, weight, ids, probs, labels=None, **kwargs):
    """As `sparse_kl_loss` (same keyword arguments), returning `(loss, kd_part, ce_part)`:
    the weighted KD and CE parts, detached, for logging (`loss = kd_part + ce_part`)."""
    params = inspect.signature(sparse_kl_loss).parameters
    defaults = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unknown argument(s) {sorted(unknown)}")
    return _sparse_kl(hidden, weight, ids, probs, labels, **{**defaults, **kwargs})


def _sparse_kl(
    hidden,
    weight,
    ids,
    probs,
    labels,
    *,
    divergence,
    kd_weight,
    ce_weight,
    temperature,
    beta,
    ignore_index,
    backend,
    bias,
    chunk_rows,
):
    _validate(
        hidden,
        weight,
        ids,
        probs,
        labels,
        bias,
        divergence,
        temperature,
        beta,
        backend,
        ignore_index,
    )
    row_pass = (
        sparse_kl_rows_triton
        if backend == "triton" or (backend == "auto" and hidden.is_cuda)
        else sparse_kl_rows_torch
    )
    opts = dict(
        divergence=divergence,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        temperature=temperature,
        beta=beta,
        ignore_index=ignore_index,
        chunk_rows=chunk_rows,
        row_pass=row_pass,
    )
    return SparseKLFunction.apply(hidden, weight, bias, ids, probs, labels, opts)
