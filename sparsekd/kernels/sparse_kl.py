"""`sparse_kl_loss`: LM head + full-vocabulary log-softmax + divergence to a sparse teacher
target, without a [N, V] logits tensor. The maths is in `kernels/reference.py`.

Backends: "torch" (chunked over rows, gradients computed in the forward so the backward is
a scale; O(chunk x V) extra memory), "auto" (torch for now). The Triton backend is the
next step (issue 4) and is refused with a clear error until it lands.

Shapes: N rows, D hidden, V vocabulary, S support size.
"""

from __future__ import annotations

import torch

from sparsekd.kernels.reference import DIVERGENCES, sparse_kl_chunked_fwd

BACKENDS = ("auto", "torch", "triton")


def _validate(
    hidden, weight, ids, probs, labels, bias, divergence, temperature, beta, backend, ignore_index
):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        raise ValueError("backend 'triton' is not available yet; use 'torch' or 'auto'")
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
        loss, d_h, d_w, d_b = sparse_kl_chunked_fwd(
            hidden, weight, ids, probs, labels, bias, need_grad=need, **opts
        )
        if need:
            ctx.save_for_backward(
                d_h, d_w.to(weight.dtype), d_b.to(bias.dtype) if d_b is not None else None
            )
        ctx.has_bias = bias is not None
        return loss.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
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
    Returns:
        0-d tensor: kd_weight * mean KD over rows with support + ce_weight * mean CE over
        labelled rows.
    """
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
    opts = dict(
        divergence=divergence,
        kd_weight=kd_weight,
        ce_weight=ce_weight,
        temperature=temperature,
        beta=beta,
        ignore_index=ignore_index,
        chunk_rows=chunk_rows,
    )
    return SparseKLFunction.apply(hidden, weight, bias, ids, probs, labels, opts)
