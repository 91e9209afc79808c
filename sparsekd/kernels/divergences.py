"""The divergences between a sparse teacher target and the student, each defined once.

The student q = softmax(z) is always over the full vocabulary; the teacher is known on a
support S (ids with probabilities p, summing to <= 1). Every divergence splits into

    loss = sum_{i in S} f(p_i, q_i)  +  h(P, q_S)          P = sum_S p, q_S = sum_S q

and so does its derivative in q: g_i = df/dq_i on the support, g_out = dh/dq_j, the same
for every j off the support. One gradient formula then serves them all:

    dL/dz_j = q_j (g_j - G),   G = sum_S q_i g_i + (1 - q_S) g_out,   g_j = g_out off S

Each entry of `DIVERGENCES` carries its math four times over, side by side so they cannot
drift apart: as text (the CLI help and docs/losses.md, whose table is `markdown_table()`),
as torch functions (the CPU path and the float64 oracle) and as Triton device functions
(the kernel takes them as constexpr arguments).

A divergence has at most one parameter `a` (`param`: `beta`, written b, for the skew and
JSD losses; `t` for TAID) and a constant derived from it, `c = const(a)`, both read by the
kernel from a small device tensor: a parameter can change every step (a schedule,
student_train/schedules.py) with no recompilation and no host synchronisation.

TAID (Shing et al., ICLR 2025) trains towards m = t p + (1 - t) stopgrad(q), a mixture
in probability space, with the loss KL(m || q). The paper mixes logits, softmax((1 - t)
stopgrad(z_q) + t z_p), which needs the teacher's logits over the whole vocabulary; a sparse
cache holds p on its support only, where the mixture of probabilities is exact: off the
support m_j = (1 - t) q_j, whose terms sum in closed form to (1 - q_S) (1 - t) log(1 - t).
The gradient is q_j (t P + 1 - t) - m_j: linear in p, so an unbiased RS-KD target gives an
unbiased gradient; with a top-K target (P < 1) it vanishes only at q = p / P, as forward
KL's on the same target does. At t = 1 it is forward KL exactly.

Shapes: elementwise over the support ([C, S] in torch, [BLOCK_S] in Triton); the
off-support terms per row ([C] in torch, scalars in Triton).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

TINY = 1e-30  # floor of a log argument


def _xlogy_torch(a, b):
    """a log(a / b), 0 where a == 0."""
    return torch.where(a > 0, a * (torch.log(a.clamp_min(TINY)) - torch.log(b)), 0.0)


@triton.jit
def _xlogy(a, b):
    return tl.where(a > 0, a * (tl.log(tl.maximum(a, 1e-30)) - tl.log(b)), 0.0)


# --- torch: support term f and its derivative g; off-support term h and g_out -----------


def _fkl_support(p, q, beta):
    return _xlogy_torch(p, q), -p / q


def _skew_fkl_support(p, q, beta):
    m = beta * p + (1.0 - beta) * q
    return _xlogy_torch(p, m), -(1.0 - beta) * p / m


def _skew_rkl_support(p, q, beta):
    m = (1.0 - beta) * p + beta * q
    return _xlogy_torch(q, m), torch.log(q / m) + (1.0 - beta) * p / m


def _jsd_support(p, q, beta):
    m = (1.0 - beta) * p + beta * q
    return beta * _xlogy_torch(q, m) + (1.0 - beta) * _xlogy_torch(p, m), beta * torch.log(q / m)


def _taid_support(p, q, t):
    m = t * p + (1.0 - t) * q.detach()  # q inside m is held constant (stopgrad)
    return _xlogy_torch(m, q), -m / q


def _zero_off(P, q_S, a, c):
    zero = torch.zeros_like(q_S)
    return zero, zero


def _ghost_off(P, q_S, a, c):
    p_t = (1.0 - P).clamp_min(0.0)
    q_t = (1.0 - q_S).clamp_min(TINY)
    return _xlogy_torch(p_t, q_t), -p_t / q_t


def _skew_rkl_off(P, q_S, beta, log_inv_beta):
    return (1.0 - q_S) * log_inv_beta, log_inv_beta + 0.0 * q_S


def _jsd_off(P, q_S, beta, log_inv_beta):
    return (1.0 - q_S) * beta * log_inv_beta, beta * log_inv_beta + 0.0 * q_S


def _taid_off(P, q_S, t, xlogx):
    return (1.0 - q_S) * xlogx, -(1.0 - t) + 0.0 * q_S


# --- Triton: the same, on a block of the support / per row ------------------------------


@triton.jit
def _fkl_support_tl(p, q, beta):
    return _xlogy(p, q), -p / q


@triton.jit
def _skew_fkl_support_tl(p, q, beta):
    m = beta * p + (1.0 - beta) * q
    return _xlogy(p, m), -(1.0 - beta) * p / m


@triton.jit
def _skew_rkl_support_tl(p, q, beta):
    m = (1.0 - beta) * p + beta * q
    return _xlogy(q, m), tl.log(q / m) + (1.0 - beta) * p / m


@triton.jit
def _jsd_support_tl(p, q, beta):
    m = (1.0 - beta) * p + beta * q
    return beta * _xlogy(q, m) + (1.0 - beta) * _xlogy(p, m), beta * tl.log(q / m)


@triton.jit
def _taid_support_tl(p, q, t):
    m = t * p + (1.0 - t) * q
    return _xlogy(m, q), -m / q


@triton.jit
def _zero_off_tl(P, q_S, a, c):
    return 0.0 * q_S, 0.0 * q_S


@triton.jit
def _ghost_off_tl(P, q_S, a, c):
    p_t = tl.maximum(1.0 - P, 0.0)
    q_t = tl.maximum(1.0 - q_S, 1e-30)
    return _xlogy(p_t, q_t), -p_t / q_t


@triton.jit
def _skew_rkl_off_tl(P, q_S, beta, log_inv_beta):
    return (1.0 - q_S) * log_inv_beta, log_inv_beta + 0.0 * q_S


@triton.jit
def _jsd_off_tl(P, q_S, beta, log_inv_beta):
    return (1.0 - q_S) * beta * log_inv_beta, beta * log_inv_beta + 0.0 * q_S


@triton.jit
def _taid_off_tl(P, q_S, t, xlogx):
    return (1.0 - q_S) * xlogx, -(1.0 - t) + 0.0 * q_S


# --- the derived constant c of each parameter (torch, on the parameter's device) --------


def _no_const(a):
    return torch.zeros_like(a)


def _log_inv(a):
    return torch.log(1.0 / a)


def _xlogx_complement(t):
    return torch.special.xlogy(1.0 - t, 1.0 - t)  # (1 - t) log(1 - t), 0 at t = 1


@dataclass(frozen=True)
class Divergence:
    name: str
    summary: str  # one line for the CLI help
    support: str  # f, summed over S
    off_support: str  # h, exact
    torch_support: Callable  # (p, q, a) -> (f, g)             elementwise
    torch_off: Callable  # (P, q_S, a, c) -> (h, g_out)        per row
    triton_support: object  # the same as @triton.jit functions
    triton_off: object  # (P, q_S, a, c) -> (h, g_out)
    param: str | None = None  # the name of its parameter a (a setting of the loss)
    default: float | None = None  # a's value when none is given (the start of a schedule)
    const: Callable = _no_const  # a -> c, the constant the off-support terms use
    bounds: tuple = (0.0, 1.0)  # a must lie in the open interval (or t in (0, 1])


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence(
            "fkl",
            "forward KL on the support",
            "p log(p/q)",
            "0",
            _fkl_support,
            _zero_off,
            _fkl_support_tl,
            _zero_off_tl,
        ),
        Divergence(
            "ghost",
            "forward KL plus a tail bucket carrying the mass off the support",
            "p log(p/q)",
            "p_t log(p_t/q_t), p_t = 1 - P, q_t = 1 - q_S",
            _fkl_support,
            _ghost_off,
            _fkl_support_tl,
            _ghost_off_tl,
        ),
        Divergence(
            "skew_fkl",
            "skew forward KL, KL(p || b p + (1-b) q)",
            "p log(p/m), m = b p + (1-b) q",
            "0",
            _skew_fkl_support,
            _zero_off,
            _skew_fkl_support_tl,
            _zero_off_tl,
            param="beta",
            default=0.1,
        ),
        Divergence(
            "skew_rkl",
            "skew reverse KL, KL(q || (1-b) p + b q)",
            "q log(q/m), m = (1-b) p + b q",
            "(1 - q_S) log(1/b)",
            _skew_rkl_support,
            _skew_rkl_off,
            _skew_rkl_support_tl,
            _skew_rkl_off_tl,
            param="beta",
            default=0.1,
            const=_log_inv,
        ),
        Divergence(
            "jsd",
            "generalised JSD, b KL(q || m) + (1-b) KL(p || m)",
            "b q log(q/m) + (1-b) p log(p/m), m = (1-b) p + b q",
            "b (1 - q_S) log(1/b)",
            _jsd_support,
            _jsd_off,
            _jsd_support_tl,
            _jsd_off_tl,
            param="beta",
            default=0.1,
            const=_log_inv,
        ),
        Divergence(
            "taid",
            "TAID: KL(m || q) to m = t p + (1-t) q (q held), t rising to 1 during training",
            "m log(m/q), m = t p + (1-t) q",
            "(1 - q_S) (1-t) log(1-t)",
            _taid_support,
            _taid_off,
            _taid_support_tl,
            _taid_off_tl,
            param="t",
            default=0.4,  # TAID's t_start (the paper's)
            const=_xlogx_complement,
        ),
    )
}
NAMES = tuple(DIVERGENCES)


def get(name: str) -> Divergence:
    if name not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(NAMES)}, got {name!r}")
    return DIVERGENCES[name]


def param_tensor(div: Divergence, a, device, dtype=torch.float32) -> torch.Tensor:
    """[2]: the parameter a and its constant c, on `device` (a: a float, or a 0-d tensor
    already there, as a schedule keeps it: no host synchronisation either way)."""
    a = torch.as_tensor(a, dtype=dtype, device=device).reshape(())
    return torch.stack([a, div.const(a)])


def row_terms(div: Divergence, p_CS, q_CS, mask_CS, par):
    """Per row: loss [C], g on the support [C, S] (0 on padding), g_out [C] and q_S [C].
    `par`: `param_tensor` (its dtype the computation's)."""
    a, c = par[0], par[1]
    p = torch.where(mask_CS, p_CS, 0.0)
    q = torch.where(mask_CS, q_CS, 1.0)  # a safe log argument and divisor on padding
    q_S = (q_CS * mask_CS).sum(-1)
    f, g = div.torch_support(p, q, a)
    h, g_out = div.torch_off(p.sum(-1), q_S, a, c)
    loss = torch.where(mask_CS, f, 0.0).sum(-1) + h
    return loss, torch.where(mask_CS, g, 0.0), g_out, q_S


def markdown_table() -> str:
    """The table in docs/losses.md (a test keeps the two equal)."""
    lines = ["| divergence | support term f(p, q), summed over S | off-support term h (exact) |"]
    lines.append("|---|---|---|")
    for d in DIVERGENCES.values():
        lines.append(f"| `{d.name}` | `{d.support}` | `{d.off_support}` |")
    return "\n".join(lines)
