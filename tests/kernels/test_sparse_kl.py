"""sparse_kl_loss, both backends (Triton: the interpreter on CPU, compiled on a GPU), against
the dense float64 oracle: loss and gradients for hidden, weight and bias, every divergence,
with and without CE, odd shapes, supports wider than one block, padding, low precision,
and the same training curve with either backend."""

import inspect
import os
import subprocess
import sys

import pytest
import torch

from sparsekd.kernels import sparse_kl as K
from sparsekd.kernels.divergences import NAMES
from sparsekd.kernels.reference import sparse_kl_loss_ref
from tests.helpers import LOSS_TOL, TOL

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "triton")
# The backend's computation dtype: the torch path follows its input (float64 here), the
# Triton row pass is float32.
DTYPE = {"torch": torch.float64, "triton": torch.float32}
# The kernel has no defaults of the loss's own (they are train-student's `loss` settings):
# these tests run it at the oracle's settings wherever a test does not name its own.
ORACLE = {
    k: v.default
    for k, v in inspect.signature(sparse_kl_loss_ref).parameters.items()
    if k in ("divergence", "kd_weight", "ce_weight")
}


def sparse_kl_loss(*args, **kw):
    if kw.get("config") is None:
        kw = {**ORACLE, **kw}
    return K.sparse_kl_loss(*args, **kw)


def _case(N, D, V, S, seed=0, dtype=torch.float64, pad_rows=(), topk_like=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=dtype)
    weight = torch.randn(V, D, generator=g, dtype=dtype) * 0.3
    bias = torch.randn(V, generator=g, dtype=dtype) * 0.1
    ids = torch.stack([torch.randperm(V, generator=g)[:S] for _ in range(N)])
    p = torch.rand(N, S, generator=g, dtype=dtype) + 0.05
    p = p / p.sum(-1, keepdim=True) * (0.8 if topk_like else 1.0)
    if S > 1:  # some padding inside rows, and whole padded rows
        ids[::3, -1] = -1
        p[::3, -1] = 0.0
    for r in pad_rows:
        ids[r] = -1
        p[r] = 0.0
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::4] = -100
    return tuple(t.to(DEV) for t in (hidden, weight, bias, ids, p, labels))


def _loss_and_grads(fn, *tensors):
    """Loss of fn on fresh leaf copies, and their gradients under an upstream 2.0."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out * 2.0).backward()
    return out, [t.grad for t in leaves]


@pytest.fixture(params=[256, None], ids=["vblocks-256", "default-vblocks"])
def block_v(request, monkeypatch):
    """Small vocabulary blocks make every odd shape span several blocks (online lse)."""
    if request.param is not None:
        monkeypatch.setattr(K, "MAX_BLOCK_V", request.param)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", NAMES)
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
@pytest.mark.parametrize(
    "N, D, V, S", [(41, 40, 1271, 8), (9, 16, 257, 1), (7, 8, 300, 64), (5, 8, 700, 300)]
)
def test_loss_and_grads_match_dense_float64(block_v, backend, divergence, ce_weight, N, D, V, S):
    dtype = DTYPE[backend]
    h, w, b, ids, p, labels = _case(N, D, V, S, dtype=dtype, pad_rows=(2,))
    kw = dict(divergence=divergence, kd_weight=0.7, ce_weight=ce_weight, temperature=1.3)
    if divergence == "taid":
        kw["t"] = 0.6
    out, grads = _loss_and_grads(
        lambda h, w, b: sparse_kl_loss(
            h, w, ids, p, labels, bias=b, backend=backend, chunk_rows=16, **kw
        ),
        h,
        w,
        b,
    )
    ref, ref_grads = _loss_and_grads(
        lambda h, w, b: sparse_kl_loss_ref(h, w, ids, p.double(), labels, bias=b, **kw),
        h.double(),
        w.double(),
        b.double(),
    )
    torch.testing.assert_close(out.double(), ref, **LOSS_TOL[dtype])
    for a, r, name in zip(grads, ref_grads, ("hidden", "weight", "bias")):
        scale = r.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(a.double() / scale, r / scale, **TOL[dtype], msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("div", ["fkl", "ghost", "jsd"])
def test_vocab_above_65536(backend, div):
    h, w, b, ids, p, labels = _case(6, 8, 70_001, 8, dtype=torch.float32)
    out, grads = _loss_and_grads(
        lambda h, w: sparse_kl_loss(
            h, w, ids, p, labels, divergence=div, ce_weight=1.0, backend=backend, chunk_rows=4
        ),
        h,
        w,
    )
    ref, ref_grads = _loss_and_grads(
        lambda h, w: sparse_kl_loss_ref(
            h, w, ids, p.double(), labels, divergence=div, ce_weight=1.0
        ),
        h.double(),
        w.double(),
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, ref_grads):
        scale = r.abs().max()
        torch.testing.assert_close(a.double() / scale, r / scale, **TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_padded_gives_zero_and_ce_still_trains(backend):
    h, w, b, ids, p, labels = _case(5, 8, 100, 4, dtype=torch.float32, pad_rows=range(5))
    out, (gh,) = _loss_and_grads(lambda h: sparse_kl_loss(h, w, ids, p, backend=backend), h)
    assert out.item() == 0.0 and torch.count_nonzero(gh) == 0
    a = sparse_kl_loss(h, w, ids, p, labels, ce_weight=1.0, backend=backend)
    r = sparse_kl_loss_ref(h.double(), w.double(), ids, p.double(), labels, ce_weight=1.0)
    torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [0.0, 0.25, 0.8, 1.0])
@pytest.mark.parametrize("N, D, V, S", [(13, 12, 301, 5), (6, 8, 129, 40)])
def test_taid_at_several_t_matches_the_oracle(backend, t, N, D, V, S):
    """t given as a device tensor (`param`, as a schedule passes it) and as a setting give
    the oracle's loss and gradients; padded rows, ignored labels, upstream gradient 2."""
    dtype = DTYPE[backend]
    h, w, b, ids, p, labels = _case(N, D, V, S, dtype=dtype, pad_rows=(1,))
    ref, ref_grads = _loss_and_grads(
        lambda h, w, b: sparse_kl_loss_ref(
            h, w, ids, p.double(), labels, bias=b, divergence="taid", t=t, ce_weight=0.2
        ),
        h.double(),
        w.double(),
        b.double(),
    )
    for how in ({"param": torch.tensor(t, dtype=torch.float64, device=DEV)}, {"t": t}):
        out, grads = _loss_and_grads(
            lambda h, w, b, how=how: sparse_kl_loss(
                h, w, ids, p, labels, bias=b, divergence="taid", ce_weight=0.2,
                backend=backend, chunk_rows=4, **how,
            ),
            h,
            w,
            b,
        )  # fmt: skip
        torch.testing.assert_close(out.double(), ref, **LOSS_TOL[dtype])
        for a, r, name in zip(grads, ref_grads, ("hidden", "weight", "bias")):
            scale = r.abs().max().clamp_min(1e-12)
            torch.testing.assert_close(a.double() / scale, r / scale, **TOL[dtype], msg=name)
    if t == 1.0:  # forward KL on the same target
        fkl = sparse_kl_loss(h, w, ids, p, labels, bias=b, ce_weight=0.2, backend=backend)
        torch.testing.assert_close(out, fkl, rtol=1e-6, atol=1e-7)


# TAID's target holds the student's q constant (stopgrad), so its gradient is not the
# finite-difference derivative of its loss: the oracle above checks it instead.
@pytest.mark.parametrize("divergence", [n for n in NAMES if n != "taid"])
def test_gradcheck_float64(divergence):
    h, w, b, ids, p, labels = (t.cpu() for t in _case(5, 4, 23, 3, seed=3))
    fn = lambda h, w, b: sparse_kl_loss(  # noqa: E731
        h,
        w,
        ids,
        p,
        labels,
        divergence=divergence,
        ce_weight=0.3,
        bias=b,
        backend="torch",
        chunk_rows=2,
    )
    assert torch.autograd.gradcheck(fn, tuple(t.clone().requires_grad_() for t in (h, w, b)))


def test_custom_ignore_index_is_skipped_not_rejected():
    h, w, b, ids, p, labels = _case(8, 8, 60, 4)
    labels = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    kw = dict(ce_weight=1.0, ignore_index=-1)
    out = sparse_kl_loss(h, w, ids, p, labels, backend="torch", **kw)
    torch.testing.assert_close(
        out, sparse_kl_loss_ref(h, w, ids, p, labels, **kw), **LOSS_TOL[torch.float64]
    )


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
        (lambda a: a.update(labels=a["labels"] + 1000), "labels must be in"),
    ],
)
def test_validation_errors(mutate, match):
    h, w, b, ids, p, labels = _case(6, 8, 50, 4)
    args = dict(hidden=h, weight=w, ids=ids, probs=p, labels=labels)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        sparse_kl_loss(**args)


def test_validate_false_skips_only_the_value_checks():
    """The trainer's path: ids and labels checked on the CPU by the reader, not here."""
    h, w, b, ids, p, labels = _case(6, 8, 50, 4)
    out = sparse_kl_loss(h, w, ids, p, labels, ce_weight=0.5, validate=False)
    torch.testing.assert_close(out, sparse_kl_loss(h, w, ids, p, labels, ce_weight=0.5))
    with pytest.raises(ValueError, match="ids and probs must both be"):
        sparse_kl_loss(h, w, ids, p[:, :2], labels, validate=False)


def test_parts_add_up_and_match_separate_calls():
    h, w, b, ids, p, labels = _case(12, 8, 200, 4)
    loss, kd, ce = sparse_kl_loss(
        h, w, ids, p, labels, kd_weight=0.6, ce_weight=0.4, backend="torch", return_parts=True
    )
    only_kd = sparse_kl_loss(h, w, ids, p, labels, kd_weight=0.6, ce_weight=0.0, backend="torch")
    only_ce = sparse_kl_loss(h, w, ids, p, labels, kd_weight=0.0, ce_weight=0.4, backend="torch")
    torch.testing.assert_close(kd, only_kd)
    torch.testing.assert_close(ce, only_ce)
    torch.testing.assert_close(loss, kd + ce)
    with pytest.raises(TypeError, match="kd_wieght"):
        sparse_kl_loss(h, w, ids, p, labels, kd_wieght=1.0)


def test_default_chunk_rows_follow_the_memory_budget():
    # the [C, V] float32 buffer stays within the budget, a power of two
    assert K.default_chunk_rows(32_000, "cpu") == 512
    assert K.default_chunk_rows(128_256, "cuda") == 1024
    for V in (32_000, 49_152, 128_256, 151_936, 201_088):
        c = K.default_chunk_rows(V, "cpu")
        assert c & (c - 1) == 0 and c * V * 4 <= K.CHUNK_BUDGET_BYTES["cpu"]


def test_same_loss_curve_with_triton_and_torch_backends():
    """A tiny student (embedding -> LM head) trained 30 steps on a fixed sparse target."""
    curves = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        V, D, N, S = 300, 16, 64, 8
        emb = torch.nn.Embedding(V, D).to(DEV)
        head = torch.nn.Linear(D, V, bias=False).to(DEV)
        opt = torch.optim.AdamW(list(emb.parameters()) + list(head.parameters()), lr=3e-2)
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, V, (N,), generator=g).to(DEV)
        ids = torch.stack([torch.randperm(V, generator=g)[:S] for _ in range(N)]).to(DEV)
        p = (torch.softmax(torch.randn(N, S, generator=g) * 2, -1) * 0.9).to(DEV)
        curve = []
        for _ in range(30):
            loss = sparse_kl_loss(
                emb(x),
                head.weight,
                ids,
                p,
                ids[:, 0],
                divergence="ghost",
                kd_weight=0.8,
                ce_weight=0.2,
                backend=backend,
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves[backend] = curve
    assert curves["torch"][-1] < 0.5 * curves["torch"][0], "the student must learn"
    torch.testing.assert_close(
        torch.tensor(curves["triton"]), torch.tensor(curves["torch"]), rtol=1e-4, atol=1e-5
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only refusal")
def test_triton_backend_on_cpu_without_interpreter_is_refused():
    code = (
        "import torch; from sparsekd.kernels import sparse_kl_loss\n"
        "h=torch.randn(2,4); w=torch.randn(10,4); i=torch.tensor([[1],[2]]); "
        "p=torch.ones(2,1)\n"
        "try:\n    sparse_kl_loss(h,w,i,p,divergence='fkl',kd_weight=1.0,ce_weight=0.0,"
        "backend='triton')\n"
        "except ValueError as e:\n    print('REFUSED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert "REFUSED backend 'triton' needs a CUDA tensor, or TRITON_INTERPRET=1" in out.stdout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_torchs_own(backend, dtype):
    """bf16/fp16 inputs: error vs the float64 oracle <= 2x that of plain torch computing the
    same dense loss in that dtype, plus atol (the logits are never rounded before softmax)."""
    h, w, b, ids, p, labels = _case(33, 64, 3001, 12, dtype=torch.float32)
    kw = dict(divergence="ghost", ce_weight=0.3, labels=labels)
    hl, wl = h.to(dtype), w.to(dtype)
    exact, (gh_exact, gw_exact) = _loss_and_grads(
        lambda h, w: sparse_kl_loss_ref(h, w, ids, p.double(), **kw), hl.double(), wl.double()
    )
    plain, (gh_plain, gw_plain) = _loss_and_grads(
        lambda h, w: sparse_kl_loss_ref(h, w, ids, p.to(dtype), **kw), hl, wl
    )
    ours, (gh, gw) = _loss_and_grads(
        lambda h, w: sparse_kl_loss(h, w, ids, p, backend=backend, **kw), hl, wl
    )
    assert gh.dtype == dtype and gw.dtype == dtype

    def check(a, a_plain, exact):
        err = (a.double() - exact).abs().max().item()
        plain_err = (a_plain.double() - exact).abs().max().item()
        scale = exact.abs().max().item()
        # plain fp16 overflows to inf/nan in the dense softmax: then hold ours to 1 % of scale
        finite = plain_err == plain_err and plain_err != float("inf")
        bound = 2 * plain_err if finite else 1e-2 * scale
        assert err == err and err <= bound + 1e-3 * scale, (err, plain_err, scale)

    check(ours, plain, exact)
    check(gh, gh_plain, gh_exact)
    check(gw, gw_plain, gw_exact)
