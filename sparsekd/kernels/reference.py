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
    beta=None,
    t=None,
    ignore_index=-100,
    bias=None,
):
    """Dense oracle of `sparse_kl_loss`, in the input dtype; differentiable by autograd.
    TAID is written from its definition over the whole vocabulary: KL(m || q) with
    m = t p + (1 - t) q.detach(), p the sparse target scattered over V (0 elsewhere)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logq = torch.log_softmax(logits / temperature, dim=-1)
    mask = ids >= 0
    div = DV.get(divergence)
    given = {"beta": beta, "t": t}.get(div.param)  # (None: the divergence's default)
    a = 0.0 if div.param is None else div.default if given is None else given
    beta = t = a
    if divergence == "taid":
        p_NV = torch.zeros_like(logq).scatter_add(  # add: padding's 0 lands on id 0 too
            1, ids.clamp_min(0).long(), torch.where(mask, probs.to(logq.dtype), 0.0)
        )
        m = t * p_NV + (1.0 - t) * logq.detach().exp()
        kd_rows = torch.where(m > 0, m * (torch.log(m.clamp_min(1e-300)) - logq), 0.0).sum(-1)
    else:
        q_NS = torch.gather(logq, 1, ids.clamp_min(0).long()).exp()
        par = DV.param_tensor(div, beta, logq.device, logq.dtype)
        kd_rows, _, _, _ = DV.row_terms(div, probs.to(logq.dtype), q_NS, mask, par)
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
