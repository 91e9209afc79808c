"""Torch backend of sparse_kl_loss against the dense float64 oracle: loss and gradients for
hidden, weight and bias, every divergence, with and without CE, odd shapes, padding."""

import pytest
import torch

from sparsekd.kernels import sparse_kl_loss
from sparsekd.kernels.reference import DIVERGENCES, sparse_kl_loss_ref


def _case(N, D, V, S, seed=0, dtype=torch.float64, pad_rows=(), topk_like=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=dtype)
    weight = torch.randn(V, D, generator=g, dtype=dtype) * 0.3
    bias = torch.randn(V, generator=g, dtype=dtype) * 0.1
    ids = torch.stack([torch.randperm(V, generator=g)[:S] for _ in range(N)])
    p = torch.rand(N, S, generator=g, dtype=dtype) + 0.05
    p = p / p.sum(-1, keepdim=True) * (0.8 if topk_like else 1.0)
    # some padding inside rows, and whole padded rows
    if S > 1:
        ids[::3, -1] = -1
        p[::3, -1] = 0.0
    for r in pad_rows:
        ids[r] = -1
        p[r] = 0.0
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    return hidden, weight, bias, ids, p, labels


def _loss_and_grads(fn, *tensors):
    """Loss of fn on fresh leaf copies, and their gradients under an upstream 2.0."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out * 2.0).backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
@pytest.mark.parametrize("N, D, V, S", [(41, 40, 1271, 8), (9, 16, 257, 1), (7, 8, 300, 64)])
def test_loss_and_grads_match_dense_float64(divergence, ce_weight, N, D, V, S):
    h, w, b, ids, p, labels = _case(N, D, V, S, pad_rows=(2,))
    kw = dict(divergence=divergence, kd_weight=0.7, ce_weight=ce_weight, temperature=1.3)
    out, grads = _loss_and_grads(
        lambda h, w, b: sparse_kl_loss(
            h, w, ids, p, labels, bias=b, backend="torch", chunk_rows=16, **kw
        ),
        h,
        w,
        b,
    )
    ref, ref_grads = _loss_and_grads(
        lambda h, w, b: sparse_kl_loss_ref(h, w, ids, p, labels, bias=b, **kw), h, w, b
    )
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    for a, r, name in zip(grads, ref_grads, ("hidden", "weight", "bias")):
        torch.testing.assert_close(a, r, rtol=1e-7, atol=1e-10, msg=name)


def test_custom_ignore_index_is_skipped_not_rejected():
    h, w, b, ids, p, labels = _case(8, 8, 60, 4)
    labels = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    kw = dict(ce_weight=1.0, ignore_index=-1)
    out = sparse_kl_loss(h, w, ids, p, labels, backend="torch", **kw)
    ref = sparse_kl_loss_ref(h, w, ids, p, labels, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)


def test_every_row_padded_and_no_labels_gives_zero():
    h, w, b, ids, p, _ = _case(5, 8, 100, 4, pad_rows=range(5))
    hh = h.clone().requires_grad_()
    out = sparse_kl_loss(hh, w, ids, p, None, backend="torch")
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(hh.grad) == 0


def test_vocab_above_65536_float32():
    h, w, b, ids, p, labels = _case(6, 8, 70_001, 8, dtype=torch.float32)
    for div in ("fkl", "jsd"):
        out = sparse_kl_loss(
            h, w, ids, p, labels, divergence=div, ce_weight=1.0, backend="torch", chunk_rows=4
        )
        ref = sparse_kl_loss_ref(
            h.double(), w.double(), ids, p.double(), labels, divergence=div, ce_weight=1.0
        )
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_float64(divergence):
    h, w, b, ids, p, labels = _case(5, 4, 23, 3, seed=3)
    fn = lambda h, w, b: sparse_kl_loss(
        h,
        w,
        ids,
        p,
        labels,
        divergence=divergence,  # noqa: E731
        ce_weight=0.3,
        bias=b,
        backend="torch",
        chunk_rows=2,
    )
    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (h, w, b)))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(ids=a["ids"] + 10_000), "ids must be in"),
        (lambda a: a["ids"].__setitem__((0, 1), a["ids"][0, 0]), "ids repeat"),
        (lambda a: a.update(probs=a["probs"][:, :2]), "ids and probs must both be"),
        (lambda a: a.update(weight=a["weight"][:, :3]), "hidden \\[N, D\\] and weight"),
        (lambda a: a.update(ids=a["ids"].float()), "ids must be int32 or int64"),
        (lambda a: a.update(divergence="rkl"), "divergence must be one of"),
        (lambda a: a.update(labels=a["labels"][:3]), "labels must be an integer tensor"),
    ],
)
def test_validation_errors(mutate, match):
    h, w, b, ids, p, labels = _case(6, 8, 50, 4)
    args = dict(hidden=h, weight=w, ids=ids, probs=p, labels=labels)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        sparse_kl_loss(**args)


def test_parts_add_up_and_match_separate_calls():
    from sparsekd.kernels import sparse_kl_loss_parts

    h, w, b, ids, p, labels = _case(12, 8, 200, 4)
    loss, kd, ce = sparse_kl_loss_parts(
        h, w, ids, p, labels, kd_weight=0.6, ce_weight=0.4, backend="torch"
    )
    only_kd = sparse_kl_loss(h, w, ids, p, labels, kd_weight=0.6, ce_weight=0.0, backend="torch")
    only_ce = sparse_kl_loss(h, w, ids, p, labels, kd_weight=0.0, ce_weight=0.4, backend="torch")
    torch.testing.assert_close(kd, only_kd)
    torch.testing.assert_close(ce, only_ce)
    torch.testing.assert_close(loss, kd + ce)
    with pytest.raises(TypeError, match="unknown argument"):
        sparse_kl_loss_parts(h, w, ids, p, labels, kd_wieght=1.0)
