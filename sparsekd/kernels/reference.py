"""Plain-torch sparse-KL loss: the dense oracle and the chunked CPU path.

Shapes: N rows (tokens), D hidden, V vocabulary, S support size per row.

Student logits z = (hidden @ weight.T + bias) / T, q = softmax(z) over all V. The teacher
target is sparse: ids [N, S] (-1 = padding) with probabilities p [N, S] (may sum to < 1).
With q_S = sum over the support of q:

    fkl       sum_S p log(p / q)
    ghost     fkl + p_t log(p_t / q_t),  p_t = 1 - sum_S p, q_t = 1 - q_S
    skew_fkl  sum_S p log(p / m),  m = b p + (1 - b) q
    skew_rkl  sum_S q log(q / m) + (1 - q_S) log(1 / b),  m = (1 - b) p + b q
    jsd       b sum_S q log(q / m) + (1 - b) sum_S p log(p / m) + b (1 - q_S) log(1 / b),
              m = (1 - b) p + b q

Gradient, one form for all: with g_i = dL/dq_i on the support and g_out the (constant)
dL/dq_i outside it, dL/dz_j = q_j (g_j - G), G = sum_S q_i g_i + (1 - q_S) g_out:

    fkl       g = -p / q                                   g_out = 0
    ghost     g = -p / q                                   g_out = -p_t / q_t
    skew_fkl  g = -(1 - b) p / m                           g_out = 0
    skew_rkl  g = log(q / m) + (1 - b) p / m               g_out = log(1 / b)
    jsd       g = b log(q / m)                             g_out = b log(1 / b)

Loss = kd_weight * mean over rows with any support of KD + ce_weight * mean over labelled
rows of -log q[label]. `sparse_kl_loss_ref` computes it densely in the input dtype (the test
oracle, run in float64); `sparse_kl_chunked_fwd` never holds more than [chunk, V].
"""

from __future__ import annotations

import math

import torch

DIVERGENCES = ("fkl", "ghost", "skew_fkl", "skew_rkl", "jsd")
_TINY = 1e-30


def _support_terms(divergence: str, p_NS, q_NS, mask_NS, beta: float):
    """Per-row KD loss [N] and (g_NS, g_out_N) for the gradient formula above."""
    p = torch.where(mask_NS, p_NS, torch.zeros_like(p_NS))
    q = torch.where(mask_NS, q_NS, torch.ones_like(q_NS))
    q_S = (q_NS * mask_NS).sum(-1)
    zero = torch.zeros_like(q_S)
    xlogx = lambda a, b: torch.where(
        a > 0,
        a * (torch.log(a.clamp_min(_TINY)) - torch.log(b)),  # noqa: E731
        torch.zeros_like(a),
    )
    if divergence in ("fkl", "ghost"):
        loss = xlogx(p, q).sum(-1)
        g = -p / q
        g_out = zero
        if divergence == "ghost":
            p_t = (1.0 - p.sum(-1)).clamp_min(0.0)
            q_t = (1.0 - q_S).clamp_min(_TINY)
            loss = loss + xlogx(p_t, q_t)
            g_out = -p_t / q_t
    elif divergence == "skew_fkl":
        m = beta * p + (1.0 - beta) * q
        loss = xlogx(p, m).sum(-1)
        g = -(1.0 - beta) * p / m
        g_out = zero
    elif divergence == "skew_rkl":
        m = (1.0 - beta) * p + beta * q
        loss = (xlogx(q, m) * mask_NS).sum(-1) + (1.0 - q_S) * math.log(1.0 / beta)
        g = torch.log(q / m) + (1.0 - beta) * p / m
        g_out = zero + math.log(1.0 / beta)
    elif divergence == "jsd":
        m = (1.0 - beta) * p + beta * q
        loss = (beta * xlogx(q, m) * mask_NS + (1.0 - beta) * xlogx(p, m)).sum(-1)
        loss = loss + beta * (1.0 - q_S) * math.log(1.0 / beta)
        g = beta * torch.log(q / m)
        g_out = zero + beta * math.log(1.0 / beta)
    else:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    return loss, torch.where(mask_NS, g, torch.zeros_like(g)), g_out, q_S


def sparse_kl_loss_ref(
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
    bias=None,
):
    """Dense oracle: materialises [N, V] logits; differentiable by plain autograd."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logq = torch.log_softmax(logits / temperature, dim=-1)
    mask = ids >= 0
    q_NS = torch.gather(logq, 1, ids.clamp_min(0).long()).exp()
    # dense autograd path: write the loss directly in terms of q so autograd derives it
    kd_rows, _, _, _ = _support_terms(divergence, probs.to(logq.dtype), q_NS, mask, beta)
    has = mask.any(-1)
    n_kd = has.sum()
    kd = (kd_rows * has).sum() / n_kd.clamp_min(1)
    loss = kd_weight * kd
    if labels is not None and ce_weight != 0.0:
        lab = labels != ignore_index
        nll = -torch.gather(logq, 1, labels.clamp_min(0).long()[:, None])[:, 0]
        loss = loss + ce_weight * (nll * lab).sum() / lab.sum().clamp_min(1)
    return loss


def sparse_kl_rows_torch(
    z_CV, ids_CS, p_CS, labels_C, kd_scale_C, ce_scale_C, *, divergence, temperature, beta
):
    """The per-row pass in plain torch (the Triton kernel does the same in one program per row).

    z_CV: [C, V] float32/64 logits before temperature; overwritten with the dense part of
    dL/dlogits, q * (kd_scale * (g_out - G) + ce_scale) / T. Returns (kd_C, ce_C, corr_CS):
    per-row KD and CE losses (unscaled) and the sparse correction kd_scale * q * (g - g_out) / T
    that the caller adds at ids (the label's -ce_scale / T too).
    """
    z_CV /= temperature
    lse_C = torch.logsumexp(z_CV, dim=-1)
    q_CV = z_CV.sub_(lse_C[:, None]).exp_()  # q in place: the chunk's only [C, V] buffer
    mask_CS = ids_CS >= 0
    q_CS = torch.gather(q_CV, 1, ids_CS.clamp_min(0))
    kd_C, g_CS, g_out_C, q_S = _support_terms(divergence, p_CS.to(q_CV.dtype), q_CS, mask_CS, beta)
    q_lab = torch.gather(q_CV, 1, labels_C.clamp_min(0)[:, None])[:, 0]
    ce_C = torch.where(labels_C >= 0, -torch.log(q_lab.clamp_min(_TINY)), torch.zeros_like(q_lab))
    G_C = (q_CS * g_CS).sum(-1) + (1.0 - q_S) * g_out_C
    dense_C = kd_scale_C * (g_out_C - G_C) + ce_scale_C
    q_CV.mul_(dense_C[:, None] / temperature)
    corr_CS = kd_scale_C[:, None] * q_CS * (g_CS - g_out_C[:, None]) * mask_CS / temperature
    return kd_C, ce_C, corr_CS


def _logits(h_CD, w_VD, b_V, acc):
    """[C, V] logits in `acc` precision; on CUDA straight from bf16/fp16 operands."""
    if h_CD.is_cuda and h_CD.dtype in (torch.bfloat16, torch.float16):
        z = torch.mm(h_CD, w_VD.T, out_dtype=acc)
    else:
        z = h_CD.to(acc) @ w_VD.to(acc).T
    if b_V is not None:
        z += b_V.to(acc)
    return z


def sparse_kl_chunked_fwd(
    hidden,
    weight,
    ids,
    probs,
    labels,
    bias,
    *,
    divergence,
    kd_weight,
    ce_weight,
    temperature,
    beta,
    ignore_index,
    chunk_rows=1024,
    need_grad=True,
    row_pass=sparse_kl_rows_torch,
):
    """Loss and gradients for hidden/weight/bias, computed chunk by chunk over rows.

    Per chunk: logits by one matmul, the row pass (torch or Triton) turns them into
    dL/dlogits in place, then two matmuls give the chunk's d_hidden and its share of
    d_weight. Extra memory O(chunk_rows x V) in float32 (float64 for float64 inputs).
    Returns (loss 0-d, (weighted KD part, weighted CE part), d_hidden [N, D] | None,
    d_weight [V, D] | None, d_bias [V] | None).
    """
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # per-row scales: the means' denominators stay on the device (no host sync)
    has_N = (ids >= 0).any(-1)
    kd_scale_N = has_N.to(acc) * (kd_weight / has_N.sum().clamp_min(1).to(acc))
    if labels is not None and ce_weight != 0.0:
        lab_N = labels != ignore_index
        ce_scale_N = lab_N.to(acc) * (ce_weight / lab_N.sum().clamp_min(1).to(acc))
        labels_N = torch.where(lab_N, labels, torch.full_like(labels, -1)).long()
    else:
        ce_scale_N = torch.zeros(N, dtype=acc, device=dev)
        labels_N = torch.full((N,), -1, dtype=torch.long, device=dev)
    kd_sum = torch.zeros((), dtype=acc, device=dev)
    ce_sum = torch.zeros((), dtype=acc, device=dev)
    d_h = torch.empty(N, D, dtype=hidden.dtype, device=dev) if need_grad else None
    d_w = torch.zeros(V, D, dtype=acc, device=dev) if need_grad else None
    d_b = torch.zeros(V, dtype=acc, device=dev) if need_grad and bias is not None else None
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        ids_CS = ids[r0:r1].long()
        lab_C = labels_N[r0:r1]
        z_CV = _logits(hidden[r0:r1], weight, bias, acc)
        kd_C, ce_C, corr_CS = row_pass(
            z_CV,
            ids_CS,
            probs[r0:r1],
            lab_C,
            kd_scale_N[r0:r1],
            ce_scale_N[r0:r1],
            divergence=divergence,
            temperature=temperature,
            beta=beta,
        )
        kd_sum += (kd_C * kd_scale_N[r0:r1]).sum()
        ce_sum += (ce_C * ce_scale_N[r0:r1]).sum()
        if not need_grad:
            continue
        dz_CV = z_CV
        dz_CV.scatter_add_(1, ids_CS.clamp_min(0), corr_CS.to(acc))
        dz_CV.scatter_add_(
            1, lab_C.clamp_min(0)[:, None], (-ce_scale_N[r0:r1] / temperature)[:, None]
        )
        if hidden.dtype in (torch.bfloat16, torch.float16):
            dz_lp = dz_CV.to(hidden.dtype)  # the gradient matmuls run in the input dtype
            d_h[r0:r1] = dz_lp @ weight
            if dz_lp.is_cuda:
                d_w += torch.mm(dz_lp.T, hidden[r0:r1], out_dtype=acc)
            else:
                d_w += (dz_lp.T @ hidden[r0:r1]).to(acc)
        else:
            w = weight.to(acc)
            d_h[r0:r1] = (dz_CV @ w).to(hidden.dtype)
            d_w.addmm_(dz_CV.T, hidden[r0:r1].to(acc))
        if d_b is not None:
            d_b += dz_CV.sum(0)
    return kd_sum + ce_sum, (kd_sum, ce_sum), d_h, d_w, d_b
