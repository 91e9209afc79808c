"""`sparse_kl_loss`: LM head + full-vocabulary log-softmax + divergence to a sparse teacher
target, forward and backward, without ever holding a [N, V] logits tensor.

Math (divergences.py has each divergence's terms f, h and their derivatives g, g_out):

    z = (hidden @ weight.T + bias) / T,  q = softmax(z) over all V
    KD_row = sum_S f(p, q) + h(P, q_S)           CE_row = -log q[label]
    loss = kd_weight * mean(KD over rows with support) + ce_weight * mean(CE over labelled)
    dL/dz_j = q_j (kd_scale (g_out - G) + ce_scale) / T   (dense, every j)
            + kd_scale q_i (g_i - g_out) / T at the support ids, - ce_scale / T at the label
    G = sum_S q g + (1 - q_S) g_out

How it runs: rows in chunks of C (`chunk_rows`, by default from a memory budget). Per
chunk, z_C = hidden_C @ weight.T (+ bias) is one [C, V] float32 buffer (float64 for
float64 inputs); the row pass turns it in place into dL/dz; two matmuls give the chunk's
d_hidden and its share of d_weight. The gradients are complete after the forward, so the
backward only scales them by the upstream gradient (the fused-linear-loss pattern).

The row pass, per row (`_sparse_kl_fwd_kernel`, one Triton program per row;
`sparse_kl_rows_torch` does the same in plain torch):
    pass 1 over vocabulary blocks: online log-sum-exp of z
        m' = max(m, max(x)),  d' = d exp(m - m') + sum exp(x - m'),  lse = m + log d
    support pass A (blocks of BLOCK_S ids): q_S = sum q, P = sum p; then h and g_out
    support pass B: KD += sum f, G += sum q g; the sparse correction q (g - g_out) is
        returned, not written, so no thread reads an address another thread writes
    pass 2 over vocabulary blocks: z_j <- q_j (kd_scale (g_out - G) + ce_scale) / T

Backends: "triton" (compiled on CUDA; the interpreter on CPU when TRITON_INTERPRET=1 is
set before import), "torch", "auto" (triton on CUDA, torch otherwise).

Shape legend: N rows (tokens), C rows in a chunk, D hidden, V vocabulary, S support size.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from sparsekd.kernels import divergences as DV
from sparsekd.kernels._common import lm_logits, row_logsumexp

BACKENDS = ("auto", "torch", "triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Vocabulary block of the row pass. The interpreter runs each block op as one numpy call,
# so larger blocks are faster there; compiled, 4096 fp32 per program keeps registers low.
COMPILED_MAX_BLOCK_V = 4096
MAX_BLOCK_V = 16384 if INTERPRETED else COMPILED_MAX_BLOCK_V
MAX_BLOCK_S = 256  # support ids per block; larger supports loop (top-K 1024, N = 65535)
# Extra memory the chunk loop may use for its [C, V] logits buffer, by device type.
CHUNK_BUDGET_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 16, 8192


def default_chunk_rows(vocab: int, device: torch.device | str) -> int:
    """Rows per chunk so that the [C, V] float32 buffer fits the device's budget: a power of
    two in [16, 8192] (512 rows at V = 32,000 on CPU, 1,024 at V = 128,256 on CUDA)."""
    budget = CHUNK_BUDGET_BYTES.get(torch.device(device).type, CHUNK_BUDGET_BYTES["cuda"])
    rows = max(1, budget // (4 * vocab))
    rows = 1 << (rows.bit_length() - 1)
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, rows))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseKLConfig:
    """Everything about the loss except the tensors. Fields are `sparse_kl_loss` keywords.
    The loss's settings and defaults are declared once, by `train-student`'s `loss` section
    (student_train/config.py `LossConfig.kernel_config`, which makes this); a direct call
    names the divergence and both weights, and a divergence's parameter defaults to its
    entry in divergences.py."""

    divergence: str  # see divergences.py
    kd_weight: float
    ce_weight: float
    temperature: float = 1.0  # student logits are divided by it (the teacher is as stored)
    beta: float | None = None  # mixture weight of skew_fkl, skew_rkl and jsd
    t: float | None = None  # TAID's interpolation (a schedule passes its value: `param`)
    ignore_index: int = -100  # labels equal to it are not in the CE mean
    backend: str = "auto"
    chunk_rows: int | None = None  # None: from CHUNK_BUDGET_BYTES and V
    validate: bool = True  # check id/label values: one host sync per call on a GPU

    def __post_init__(self):
        DV.get(self.divergence)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.beta is not None and not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {self.beta}")
        if self.t is not None and not 0.0 <= self.t <= 1.0:
            raise ValueError(f"t must be in [0, 1], got {self.t}")

    @property
    def param_value(self) -> float:
        """The divergence's parameter: as given, else its default (divergences.py)."""
        div = DV.get(self.divergence)
        if div.param is None:
            return 0.0
        given = getattr(self, div.param)
        return div.default if given is None else given
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")


# One Triton program per row, kept in one body (about 80 lines with its argument list): the
# passes share the row's lse, q_S and G in registers, and the house kernel style puts the
# math of each pass as a comment above it.
@triton.jit
def _sparse_kl_fwd_kernel(
    # pointers
    z_ptr,  # [C, V] float32 logits (before 1/T); overwritten with the dense part of dL/dz
    ids_ptr,  # [C, S] int64 support ids, -1 = padding
    p_ptr,  # [C, S] float32 teacher probabilities
    labels_ptr,  # [C] int64 CE targets, -1 = none
    kd_scale_ptr,  # [C] float32 kd_weight / n_kd on rows with support, else 0
    ce_scale_ptr,  # [C] float32 ce_weight / n_ce on labelled rows, else 0
    kd_out_ptr,  # [C] float32 out: per-row KD loss
    ce_out_ptr,  # [C] float32 out: per-row CE loss
    corr_ptr,  # [C, S] float32 out: sparse part of dL/dz at the ids
    # strides
    stride_z,
    stride_ids,
    stride_p,
    stride_corr,
    par_ptr,  # [2] float32: the divergence's parameter a and its constant c (divergences.py)
    # sizes and scalars
    V,
    S,
    inv_temp,
    SUPPORT_FN: tl.constexpr,  # (p, q, a) -> (f, g): divergences.<name>.triton_support
    OFF_FN: tl.constexpr,  # (P, q_S, a, c) -> (h, g_out)
    BLOCK_V: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    a = tl.load(par_ptr)
    c = tl.load(par_ptr + 1)
    z_row = z_ptr + row * stride_z
    ids_row = ids_ptr + row * stride_ids
    p_row = p_ptr + row * stride_p

    # pass 1: lse = log sum_j exp(z_j / T), online over vocabulary blocks
    lse = row_logsumexp(z_row, V, inv_temp, BLOCK_V)

    # CE: -log q[label] = lse - z_label / T (read before pass 2 overwrites z)
    label = tl.load(labels_ptr + row)
    z_lab = tl.load(z_row + tl.maximum(label, 0)).to(tl.float32) * inv_temp
    ce = tl.where(label >= 0, lse - z_lab, 0.0)

    # support pass A: q_S = sum_S q, P = sum_S p; then the off-support terms h, g_out
    q_S = 0.0
    P = 0.0
    for s0 in range(0, S, BLOCK_S):
        so = s0 + tl.arange(0, BLOCK_S)
        ids = tl.load(ids_row + so, mask=so < S, other=-1)
        valid = ids >= 0
        zs = tl.load(z_row + tl.maximum(ids, 0), mask=valid, other=0.0).to(tl.float32)
        q_S += tl.sum(tl.where(valid, tl.exp(zs * inv_temp - lse), 0.0), 0)
        P += tl.sum(tl.load(p_row + so, mask=valid, other=0.0).to(tl.float32), 0)
    kd, g_out = OFF_FN(P, q_S, a, c)

    # support pass B: KD += sum_S f(p, q), G = sum_S q g + (1 - q_S) g_out, and the sparse
    # correction kd_scale q (g - g_out) / T returned for the caller to scatter-add
    kd_scale = tl.load(kd_scale_ptr + row)
    G = (1.0 - q_S) * g_out
    for s0 in range(0, S, BLOCK_S):
        so = s0 + tl.arange(0, BLOCK_S)
        ids = tl.load(ids_row + so, mask=so < S, other=-1)
        valid = ids >= 0
        zs = tl.load(z_row + tl.maximum(ids, 0), mask=valid, other=0.0).to(tl.float32)
        p = tl.load(p_row + so, mask=valid, other=0.0).to(tl.float32)
        q = tl.where(valid, tl.exp(zs * inv_temp - lse), 1.0)  # 1: a safe divisor on padding
        f, g = SUPPORT_FN(p, q, a)
        f = tl.where(valid, f, 0.0)
        g = tl.where(valid, g, 0.0)
        q = tl.where(valid, q, 0.0)
        kd += tl.sum(f, 0)
        G += tl.sum(q * g, 0)
        corr = tl.where(valid, kd_scale * q * (g - g_out) * inv_temp, 0.0)
        tl.store(corr_ptr + row * stride_corr + so, corr, mask=so < S)
    tl.store(kd_out_ptr + row, kd)
    tl.store(ce_out_ptr + row, ce)

    # pass 2: the dense part of dL/dz, in place over the logits
    dense = (kd_scale * (g_out - G) + tl.load(ce_scale_ptr + row)) * inv_temp
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
        tl.store(z_row + offs, tl.exp(x - lse) * dense, mask=offs < V)


def block_sizes(V: int, S: int) -> tuple[int, int]:
    """(BLOCK_V, BLOCK_S) the launcher uses for a vocabulary V and support width S."""
    return min(MAX_BLOCK_V, triton.next_power_of_2(V)), min(
        MAX_BLOCK_S, max(triton.next_power_of_2(S), 2)
    )


def sparse_kl_rows_triton(z_CV, ids_CS, p_CS, labels_C, kd_scale_C, ce_scale_C, cfg, par):
    """Launcher with the contract of `sparse_kl_rows_torch`."""
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
    div = DV.get(cfg.divergence)
    block_v, block_s = block_sizes(V, S)
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
        par.to(torch.float32).contiguous(),
        V,
        S,
        1.0 / cfg.temperature,
        SUPPORT_FN=div.triton_support,
        OFF_FN=div.triton_off,
        BLOCK_V=block_v,
        BLOCK_S=block_s,
    )
    return kd_C, ce_C, corr_CS


def aot_targets(vocabs):
    """Every specialisation the launcher can produce for these vocabularies, for
    `kernels.aot`: (name, shown constexprs, vocabularies, kernel, signature, constexprs)."""
    sig = {
        "z_ptr": "*fp32", "ids_ptr": "*i64", "p_ptr": "*fp32", "labels_ptr": "*i64",
        "kd_scale_ptr": "*fp32", "ce_scale_ptr": "*fp32", "kd_out_ptr": "*fp32",
        "ce_out_ptr": "*fp32", "corr_ptr": "*fp32", "stride_z": "i32", "stride_ids": "i32",
        "stride_p": "i32", "stride_corr": "i32", "par_ptr": "*fp32", "V": "i32", "S": "i32",
        "inv_temp": "fp32",
    }  # fmt: skip
    block_vs: dict[int, list[int]] = {}
    for V in vocabs:
        block_vs.setdefault(min(COMPILED_MAX_BLOCK_V, triton.next_power_of_2(V)), []).append(V)
    out = []
    for name, d in DV.DIVERGENCES.items():
        for bv, vs in block_vs.items():
            for bs in (1 << i for i in range(1, MAX_BLOCK_S.bit_length())):
                ce = {
                    "SUPPORT_FN": d.triton_support,
                    "OFF_FN": d.triton_off,
                    "BLOCK_V": bv,
                    "BLOCK_S": bs,
                }
                shown = {"DIV": name, "BLOCK_V": bv, "BLOCK_S": bs}
                sig_ce = {**sig, **{k: "constexpr" for k in ce}}
                out.append(("_sparse_kl_fwd_kernel", shown, vs, _sparse_kl_fwd_kernel, sig_ce, ce))
    return out


def sparse_kl_rows_torch(z_CV, ids_CS, p_CS, labels_C, kd_scale_C, ce_scale_C, cfg, par):
    """The row pass in plain torch.

    z_CV: [C, V] float32/64 logits before temperature; overwritten with the dense part of
    dL/dlogits. Returns (kd_C, ce_C, corr_CS): per-row KD and CE losses (unscaled) and the
    sparse correction kd_scale * q * (g - g_out) / T for the caller to add at the ids.
    """
    T = cfg.temperature
    z_CV /= T
    lse_C = torch.logsumexp(z_CV, dim=-1)
    q_CV = z_CV.sub_(lse_C[:, None]).exp_()  # q in place: the chunk's only [C, V] buffer
    mask_CS = ids_CS >= 0
    q_CS = torch.gather(q_CV, 1, ids_CS.clamp_min(0))
    kd_C, g_CS, g_out_C, q_S = DV.row_terms(
        DV.get(cfg.divergence), p_CS.to(q_CV.dtype), q_CS, mask_CS, par.to(q_CV.dtype)
    )
    q_lab = torch.gather(q_CV, 1, labels_C.clamp_min(0)[:, None])[:, 0]
    ce_C = torch.where(labels_C >= 0, -torch.log(q_lab.clamp_min(DV.TINY)), 0.0)
    G_C = (q_CS * g_CS).sum(-1) + (1.0 - q_S) * g_out_C
    q_CV.mul_(((kd_scale_C * (g_out_C - G_C) + ce_scale_C) / T)[:, None])
    corr_CS = kd_scale_C[:, None] * q_CS * (g_CS - g_out_C[:, None]) * mask_CS / T
    return kd_C, ce_C, corr_CS


def sparse_kl_chunked(hidden, weight, bias, ids, probs, labels, cfg, param=None, need_grad=True):
    """Loss and gradients for hidden/weight/bias, computed chunk by chunk over rows.
    `param`: a 0-d tensor overriding the divergence's parameter (a schedule's value).

    Returns (loss 0-d, (weighted KD part, weighted CE part), d_hidden [N, D] | None,
    d_weight [V, D] | None, d_bias [V] | None), in the accumulation dtype.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    use_triton = cfg.backend == "triton" or (cfg.backend == "auto" and hidden.is_cuda)
    row_pass = sparse_kl_rows_triton if use_triton else sparse_kl_rows_torch
    C = cfg.chunk_rows or default_chunk_rows(V, dev)
    div = DV.get(cfg.divergence)
    value = param if param is not None else cfg.param_value
    par = DV.param_tensor(div, value, dev, acc)
    # per-row scales: the means' denominators stay on the device (no host sync)
    has_N = (ids >= 0).any(-1)
    kd_scale_N = has_N.to(acc) * (cfg.kd_weight / has_N.sum().clamp_min(1).to(acc))
    if labels is not None and cfg.ce_weight != 0.0:
        lab_N = labels != cfg.ignore_index
        ce_scale_N = lab_N.to(acc) * (cfg.ce_weight / lab_N.sum().clamp_min(1).to(acc))
        labels_N = torch.where(lab_N, labels, -1).long()
    else:
        ce_scale_N = torch.zeros(N, dtype=acc, device=dev)
        labels_N = torch.full((N,), -1, dtype=torch.long, device=dev)
    kd_sum = torch.zeros((), dtype=acc, device=dev)
    ce_sum = torch.zeros((), dtype=acc, device=dev)
    d_h = torch.empty(N, D, dtype=hidden.dtype, device=dev) if need_grad else None
    d_w = torch.zeros(V, D, dtype=acc, device=dev) if need_grad else None
    d_b = torch.zeros(V, dtype=acc, device=dev) if need_grad and bias is not None else None
    low_precision = hidden.dtype in (torch.bfloat16, torch.float16)
    for r0 in range(0, N, C):
        rows = slice(r0, min(N, r0 + C))
        ids_CS, lab_C, kd_s, ce_s = (
            ids[rows].long(),
            labels_N[rows],
            kd_scale_N[rows],
            ce_scale_N[rows],
        )
        z_CV = lm_logits(hidden[rows], weight, bias, acc)
        kd_C, ce_C, corr_CS = row_pass(z_CV, ids_CS, probs[rows], lab_C, kd_s, ce_s, cfg, par)
        kd_sum += (kd_C * kd_s).sum()
        ce_sum += (ce_C * ce_s).sum()
        if not need_grad:
            continue
        dz_CV = z_CV
        dz_CV.scatter_add_(1, ids_CS.clamp_min(0), corr_CS.to(acc))
        dz_CV.scatter_add_(1, lab_C.clamp_min(0)[:, None], (-ce_s / cfg.temperature)[:, None])
        if low_precision:  # the gradient matmuls run in the input dtype, accumulate in fp32
            dz_lp = dz_CV.to(hidden.dtype)
            d_h[rows] = dz_lp @ weight
            if dz_lp.is_cuda:
                d_w += torch.mm(dz_lp.T, hidden[rows], out_dtype=acc)
            else:
                d_w += (dz_lp.T @ hidden[rows]).to(acc)
        else:
            d_h[rows] = (dz_CV @ weight.to(acc)).to(hidden.dtype)
            d_w.addmm_(dz_CV.T, hidden[rows].to(acc))
        if d_b is not None:
            d_b += dz_CV.sum(0)
    return kd_sum + ce_sum, (kd_sum, ce_sum), d_h, d_w, d_b


def check_inputs(hidden, weight, ids, probs, labels, bias, cfg: SparseKLConfig) -> None:
    """Shapes, dtypes and devices always (no sync); id and label values when cfg.validate
    (a host synchronisation on a GPU: the trainer validates on the CPU, in the reader)."""
    if cfg.backend == "triton" and not hidden.is_cuda and not INTERPRETED:
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
    if not cfg.validate:
        return
    if ids.numel():
        if int(ids.max()) >= V or int(ids.min()) < -1:
            raise ValueError(f"ids must be in [0, {V}) or -1 for padding")
        srt = ids.sort(dim=1).values
        if bool(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()):
            raise ValueError("ids repeat within a row; the support must be distinct")
    if labels is not None and labels.numel():
        bad = (labels != cfg.ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise ValueError(f"labels must be in [0, {V}) or ignore_index")


class SparseKLFunction(torch.autograd.Function):
    """Forward computes the loss and every gradient; backward scales them by grad_out."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, probs, labels, cfg, param):
        need = (
            hidden.requires_grad
            or weight.requires_grad
            or (bias is not None and bias.requires_grad)
        )
        loss, (kd, ce), d_h, d_w, d_b = sparse_kl_chunked(
            hidden, weight, bias, ids, probs, labels, cfg, param, need_grad=need
        )
        if need:
            ctx.save_for_backward(
                d_h, d_w.to(weight.dtype), d_b.to(bias.dtype) if d_b is not None else None
            )
        kd, ce = kd.to(hidden.dtype), ce.to(hidden.dtype)
        ctx.mark_non_differentiable(kd, ce)
        return loss.to(hidden.dtype), kd, ce

    @staticmethod
    def backward(ctx, grad_out, _grad_kd=None, _grad_ce=None):
        d_h, d_w, d_b = ctx.saved_tensors
        d_b = d_b * grad_out if d_b is not None else None
        return d_h * grad_out, d_w * grad_out, d_b, None, None, None, None, None


def sparse_kl_loss(
    hidden,
    weight,
    ids,
    probs,
    labels=None,
    *,
    bias=None,
    config: SparseKLConfig | None = None,
    return_parts: bool = False,
    param=None,
    **options,
):
    """KD (and optional CE) loss of a student LM head against a sparse teacher target.

    Args:
        hidden: [N, D] student final hidden states.
        weight: [V, D] LM head. bias: [V] optional.
        ids: [N, S] int teacher support, distinct per row, -1 = padding.
        probs: [N, S] teacher probability estimates (0 on padding).
        labels: [N] next-token ids for the CE term, `ignore_index` to skip.
        config: a SparseKLConfig; `**options` (its field names: divergence, kd_weight,
            ce_weight, temperature, beta, t, ignore_index, backend, chunk_rows, validate)
            override it.
        return_parts: also return the weighted KD and CE parts (detached, for logging).
        param: a 0-d tensor on the device overriding the divergence's parameter (beta, or
            TAID's t) for this call: a value that changes during training, read by the
            kernel from the device (no recompilation, no host synchronisation).
    Returns:
        0-d tensor kd_weight * mean KD over rows with support + ce_weight * mean CE over
        labelled rows; with return_parts, `(loss, kd_part, ce_part)`.
    """
    cfg = dataclasses.replace(config, **options) if config else SparseKLConfig(**options)
    check_inputs(hidden, weight, ids, probs, labels, bias, cfg)
    loss, kd, ce = SparseKLFunction.apply(hidden, weight, bias, ids, probs, labels, cfg, param)
    return (loss, kd, ce) if return_parts else loss
