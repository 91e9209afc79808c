"""Float64 dense oracles of both kernels: the tests' reference and the benchmarks' baseline.

- `sparse_kl_loss_ref`: materialises the [N, V] logits and writes the loss in terms of q
  from the divergence table, so plain autograd derives every gradient.
- `teacher_head_ref`: float64 logits, log-sum-exp, top-K and inverse-CDF sampling by a
  dense float64 cumulative sum and searchsorted over the whole vocabulary.

Shapes: N rows, D hidden, V vocabulary, S support size, T positions, N samples.
"""

from __future__ import annotations

import torch

from sparsekd.kernels import divergences as DV
from sparsekd.kernels.teacher_head import teacher_head


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
    """Dense oracle of `sparse_kl_loss`, in the input dtype; differentiable by autograd."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logq = torch.log_softmax(logits / temperature, dim=-1)
    mask = ids >= 0
    q_NS = torch.gather(logq, 1, ids.clamp_min(0).long()).exp()
    kd_rows, _, _, _ = DV.row_terms(DV.get(divergence), probs.to(logq.dtype), q_NS, mask, beta)
    has = mask.any(-1)
    loss = kd_weight * (kd_rows * has).sum() / has.sum().clamp_min(1)
    if labels is not None and ce_weight != 0.0:
        lab = labels != ignore_index
        nll = -torch.gather(logq, 1, labels.clamp_min(0).long()[:, None])[:, 0]
        loss = loss + ce_weight * (nll * lab).sum() / lab.sum().clamp_min(1)
    return loss


def draws_dense(z_CV: torch.Tensor, t_CN: torch.Tensor, tau: float):
    """float64 inverse-CDF draws over the whole vocabulary at once."""
    zt = z_CV.double() / tau
    lse_tau = torch.logsumexp(zt, -1)
    R = torch.exp(zt - lse_tau[:, None]).cumsum(-1)
    R[:, -1] = float("inf")
    draws = torch.searchsorted(R, t_CN.double(), right=True).clamp_max(z_CV.shape[1] - 1)
    return draws.to(torch.int32), lse_tau


def teacher_head_ref(hidden, weight, labels, *, k=0, targets=None, tau=1.0, bias=None):
    """float64 dense oracle of `teacher_head`, same outputs."""
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
        sampler=draws_dense,
    )
