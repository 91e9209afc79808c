"""`sparsekd fidelity`: how much of the teacher a cache carries, for the loss that will use it.

The teacher is run in full (transformers, float32) over rows drawn from the cache, and at
every learnt position with a stored support the cache's target (what the loss is given:
reader.Batch `teacher_ids`/`teacher_probs`) is compared with the teacher's whole
next-token distribution p:

- `grad_cosine`, `grad_angle_deg`: the cosine (and angle) between two gradients of the
  student's parameters over the same positions: the loss's KD term against the cache's
  target, and the same divergence against p over the whole vocabulary (full KD). The CE
  term is the same in both and left out. The measure of the Sparse Logit Sampling paper
  (Top-12 KD 58 degrees from full KD, RS-KD 4). `grad_norm_ratio`: |cache| / |full|.
  `grad_cosine_ci95`: the half-width of a 95 % interval (Student t) of the mean of the
  per-group cosines (positions split into `groups` groups of whole rows): how much the
  figure would move on other positions.
- `mass_covered`: the teacher mass on the stored support, sum_S p.
- `kl`: KL(p || target) with the vocabulary seen as the target sees it (its ids, and one
  bucket for the rest): sum_S p log(p / r) + p_t log(p_t / r_t), r the target, p_t and r_t
  the mass off the support (each counted as none below TAIL_FLOOR, 1e-3: the resolution
  of a sum of quantised probabilities). Finite only where the target leaves mass for the
  rest (a top-K target, sum_S r < 1); a sample target puts all its mass on its draws, so
  its `kl` is null and `kl_finite_fraction` 0. `kl_reverse`: KL(target || p) on the same
  buckets, finite for every target.
- `logprob_mean_error` / `logprob_max_error`: |stored log p(actual next token) - the
  recomputed one| over every learnt position (every mode stores it); `support_logprob_*`:
  the same over the stored support of a mode that stores the teacher's log-probs (top-K).
  Quantisation alone gives at most 4.9e-4; a teacher run in bfloat16 by the engine, more.
Each per-position figure also has its standard deviation across positions (`*_std`): with
it a user sizes N (sample caches) or K from a shard before training.

Rows are drawn deterministically (`seed`): row groups in a seeded order across every shard,
every row of a drawn group, until `positions` learnt positions (the last row cut).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from sparsekd.config import check, check_local, default_of, section, setting
from sparsekd.errors import CacheError, TeacherError
from sparsekd.student_train.config import LossConfig

# Student t quantiles, 97.5 %, by degrees of freedom (the interval over `groups` means)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (the nearest smaller
    tabulated one, which is wider; 1.96 beyond 30)."""
    if df > 30:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]


TAIL_FLOOR = 1e-3  # mass off the support below it is quantisation (4.9e-4 of each stored
# probability) and rounding, not a tail: counted as none, on both sides
FULL_ROWS = 256  # rows of the full-vocabulary loss per call: ids and p are [rows, V]


@dataclass(frozen=True, kw_only=True)
class FidelityConfig:
    cache: str = setting(doc="Cache to measure.", flag=True)
    teacher: str = setting(doc="The teacher folder the cache was built from.", flag=True)
    student: str | None = setting(
        None,
        "Student whose gradients are compared (default: the teacher's weights perturbed "
        "by student_noise at --seed).",
        flag=True,
    )
    student_noise: float = setting(
        0.05,
        "Without --student: each weight matrix of the teacher plus Gaussian noise of this "
        "fraction of its standard deviation, a student near the teacher.",
    )
    positions: int = setting(2048, "Learnt positions to measure.", flag=True)
    groups: int = setting(8, "Groups of rows the intervals are computed over.")
    seed: int = setting(0, "Which rows are drawn, and the default student's noise.", flag=True)
    batch_size: int = setting(4, "Rows per forward.")
    loss: LossConfig = section(LossConfig, "The loss whose KD term is compared with full KD.")

    def __post_init__(self):
        check_local(self.teacher, "--teacher")
        check_local(self.student, "--student")
        check(self.positions >= 1, f"--positions must be >= 1, got {self.positions}")
        check(
            self.student_noise > 0,
            "student_noise must be > 0 (the teacher itself has no gradient to compare)",
        )
        check(
            self.student is None
            or self.student_noise == default_of(FidelityConfig, "student_noise"),
            "student_noise makes the default student; with --student it has no effect",
        )
        check(self.groups >= 2, f"groups must be >= 2 (an interval needs two), got {self.groups}")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(
            self.loss.kind != "ce",
            "--loss ce has no KD term to compare: name the divergence the cache will train",
        )
        for key, why in (("kd_weight", "the KD term is compared alone"),
                         ("backend", "the loss runs in torch here")):  # fmt: skip
            check(
                getattr(self.loss, key) == default_of(LossConfig, key),
                f"loss.{key} has no effect in fidelity ({why})",
            )


def draw_rows(cache, positions: int, seed: int) -> list:
    """Rows of `cache` in a seeded order of its row groups (across every shard), until they
    hold `positions` learnt positions; the last row's later positions are unlearnt."""
    shard, group, _ = cache.row_groups()
    order = np.random.default_rng(seed).permutation(len(shard))
    rows, have = [], 0
    for k in order:
        for seq in cache.read_group(int(shard[k]), int(group[k])):
            learnt = np.flatnonzero(seq.loss_mask)
            if have + len(learnt) > positions:
                seq = _cut(seq, learnt[positions - have])
                learnt = learnt[: positions - have]
            rows.append(seq)
            have += len(learnt)
            if have >= positions:
                return rows
    return rows


def _cut(seq, at: int):
    """`seq` with no learnt position from `at` on."""
    mask = seq.loss_mask.copy()
    mask[at:] = False
    offsets = np.concatenate([[0], np.cumsum(seq.support_size)])
    end = int(offsets[at])
    size = seq.support_size.copy()
    size[at:] = 0
    logprobs = seq.token_logprobs.copy()
    logprobs[at:] = np.nan
    return dataclasses.replace(
        seq,
        loss_mask=mask,
        support_size=size,
        ids=seq.ids[:end],
        values={k: v[:end] for k, v in seq.values.items()},
        token_logprobs=logprobs,
    )


def load_models(cfg: FidelityConfig, cache):
    """The teacher, and the student (given, or fresh like the teacher), float32, checked
    against the cache."""
    from sparsekd.schemas.identity import teacher_files
    from sparsekd.student_train.model import check_compatible, load_student

    try:
        files = teacher_files(cfg.teacher)
    except (OSError, ValueError) as e:
        raise TeacherError(f"--teacher {cfg.teacher}: not a model folder ({e})") from e
    if files != cache.meta.get("teacher_files"):
        raise TeacherError(
            f"--teacher {cfg.teacher} is not the teacher {cache.path} was built from (its "
            "config.json or weight files differ from the cache's teacher_files)"
        )
    teacher, tok = load_student(cfg.teacher)
    check_compatible(teacher, tok, cache.meta, cache.manifest)
    if cfg.student is not None:
        student, stok = load_student(cfg.student)
        check_compatible(student, stok, cache.meta, cache.manifest)
    else:
        student = near(copy.deepcopy(teacher), cfg.student_noise, cfg.seed)  # not loaded twice
    return teacher.eval(), student.eval()


@torch.no_grad()
def near(model, noise: float, seed: int):
    """`model` with each weight matrix plus Gaussian noise of `noise` times its standard
    deviation (seeded): a student near the teacher, the regime where a target's bias
    decides the gradient's direction (a student far from it, at random initialisation,
    gets nearly the same direction from any target)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2:
            p.add_(torch.randn(p.shape, generator=g) * p.std() * noise)
    return model


class _Stats:
    """Per-position values of one figure: mean and std over the finite ones, max, and the
    fraction that is finite."""

    def __init__(self):
        self.values: list[np.ndarray] = []

    def add(self, v) -> None:
        self.values.append(np.asarray(v, dtype=np.float64).reshape(-1))

    def _all(self) -> np.ndarray:
        return np.concatenate(self.values) if self.values else np.zeros(0)

    def result(self, name: str) -> dict:
        v = self._all()
        v = v[np.isfinite(v)]
        if not len(v):
            return {name: None, f"{name}_std": None}
        return {name: float(v.mean()), f"{name}_std": float(v.std())}

    def max(self) -> float | None:
        v = self._all()
        return float(v.max()) if len(v) else None

    def finite_fraction(self) -> float | None:
        v = self._all()
        return float(np.isfinite(v).mean()) if len(v) else None


def target_figures(logp_NV, ids_NS, probs_NS) -> dict:
    """Per position (float64): mass_covered, kl (inf where the target leaves no mass off
    its support and the teacher does), kl_reverse; over the positions given."""
    mask = ids_NS >= 0
    logp_S = logp_NV.gather(1, ids_NS.clamp_min(0))
    p_S = torch.where(mask, logp_S.exp(), 0.0)
    r_S = torch.where(mask, probs_NS.double(), 0.0)
    P, R = p_S.sum(-1), r_S.sum(-1)
    p_t, r_t = (1.0 - P).clamp_min(0.0), (1.0 - R).clamp_min(0.0)
    tiny = TAIL_FLOOR
    log_r = torch.log(r_S.clamp_min(1e-300))
    on = torch.where(r_S > 0, p_S * (logp_S - log_r), torch.where(p_S > 0, math.inf, 0.0))
    on = torch.where(mask, on, 0.0).sum(-1)
    tail = torch.where(
        p_t <= tiny,
        0.0,
        torch.where(
            r_t <= tiny, math.inf, p_t * (torch.log(p_t) - torch.log(r_t.clamp_min(1e-300)))
        ),
    )
    rev_on = torch.where(mask & (r_S > 0), r_S * (log_r - logp_S), 0.0).sum(-1)
    rev_tail = torch.where(
        r_t <= tiny, 0.0, r_t * (torch.log(r_t) - torch.log(p_t.clamp_min(1e-300)))
    )
    return {"mass_covered": P, "kl": on + tail, "kl_reverse": rev_on + rev_tail}


def _flat_grad(loss, params) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    ).double()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    den = (a.norm() * b.norm()).item()
    return float((a @ b).item() / den) if den > 0 else float("nan")


def measure(cache, teacher, student, cfg: FidelityConfig) -> dict:
    """The figures of the module docstring for `cache`, `teacher` and `student` (models in
    float32 on the CPU or one device)."""
    from sparsekd.kernels.sparse_kl import sparse_kl_loss
    from sparsekd.schemas import format as F
    from sparsekd.schemas.modes import get_mode
    from sparsekd.student_train.model import attention_kwargs
    from sparsekd.student_train.reader import collate

    started = time.perf_counter()
    mode = get_mode(cache.meta["mode"])
    rows = draw_rows(cache, cfg.positions, cfg.seed)
    if not rows:
        raise CacheError(f"{cache.path}: no learnt position to measure")
    documents = F.attention_of(cache.meta) == "document"
    kd = dataclasses.replace(
        cfg.loss.kernel_config(validate=True), kd_weight=1.0, ce_weight=0.0, backend="torch"
    )
    # over the whole vocabulary the tail bucket is empty: ghost is forward KL there (its
    # tail term, a ratio of two float rounding errors, would only add noise)
    full = dataclasses.replace(kd, divergence="fkl") if kd.divergence == "ghost" else kd
    device = next(student.parameters()).device
    params = [p for p in student.parameters() if p.requires_grad]
    head = student.get_output_embeddings()
    V = head.weight.shape[0]
    figures = {k: _Stats() for k in ("mass_covered", "kl", "kl_reverse")}
    token_err, support_err = _Stats(), _Stats()
    total_cache = total_full = None
    cosines, n_support = [], 0
    groups = [rows[g :: cfg.groups] for g in range(cfg.groups)]
    for group in groups:
        if not group:
            continue
        g_cache = g_full = None
        for b0 in range(0, len(group), cfg.batch_size):
            b = collate(group[b0 : b0 + cfg.batch_size])
            x = torch.from_numpy(b.input_ids).to(device)
            pos = torch.from_numpy(b.position_ids).to(device) if documents else None
            labels = torch.from_numpy(b.labels.reshape(-1)).to(device)
            learnt = labels >= 0
            with torch.no_grad():
                kw = attention_kwargs(teacher, pos)
                logits = teacher(input_ids=x, use_cache=False, **kw).logits
                logp = torch.log_softmax(logits.reshape(len(labels), -1)[learnt].double(), -1)
                del logits
            stored = torch.from_numpy(b.teacher_label_logprob.reshape(-1)).to(device)[learnt]
            token_err.add((logp.gather(1, labels[learnt][:, None])[:, 0] - stored).abs().cpu())
            ids = torch.from_numpy(b.teacher_ids.reshape(len(labels), -1)).to(device)[learnt]
            probs = torch.from_numpy(b.teacher_probs.reshape(len(labels), -1)).to(device)[learnt]
            has = (ids >= 0).any(-1)
            if not mode.has_support or not bool(has.any()):
                continue
            ids, probs, logp = ids[has], probs[has], logp[has]
            for k, v in target_figures(logp, ids, probs).items():
                figures[k].add(v.cpu())
            if mode.truncated:
                on = ids >= 0
                err = (
                    torch.log(probs.double().clamp_min(1e-300)) - logp.gather(1, ids.clamp_min(0))
                ).abs()
                support_err.add(err[on].cpu())
            kw = attention_kwargs(student, pos)
            hidden = student.get_decoder()(input_ids=x, use_cache=False, **kw).last_hidden_state
            h = hidden.reshape(len(labels), -1)[learnt][has]
            n = h.shape[0]
            n_support += n
            loss_cache = sparse_kl_loss(h, head.weight, ids, probs, config=kd) * n
            loss_full = 0.0
            for r0 in range(0, n, FULL_ROWS):
                rr = slice(r0, min(n, r0 + FULL_ROWS))
                m = rr.stop - rr.start
                all_ids = torch.arange(V, device=device).expand(m, V).contiguous()
                p_full = logp[rr, :V].exp().float()
                loss_full = (
                    loss_full + sparse_kl_loss(h[rr], head.weight, all_ids, p_full, config=full) * m
                )
            gc, gf = _flat_grad(loss_cache, params), _flat_grad(loss_full, params)
            g_cache = gc if g_cache is None else g_cache + gc
            g_full = gf if g_full is None else g_full + gf
        if g_cache is None:
            continue
        cosines.append(_cosine(g_cache, g_full))
        total_cache = g_cache if total_cache is None else total_cache + g_cache
        total_full = g_full if total_full is None else total_full + g_full
    out = {
        "cache": str(cache.path),
        "mode": mode.name,
        "loss": cfg.loss.divergence,
        "positions": int(sum(int(s.loss_mask.sum()) for s in rows)),
        "positions_with_support": n_support,
        "rows": len(rows),
        "groups": len(cosines),
    }
    if total_cache is not None:
        cos = _cosine(total_cache, total_full)
        c = np.array(cosines)
        half = float(t975(len(c) - 1) * c.std(ddof=1) / math.sqrt(len(c))) if len(c) > 1 else None
        out.update(
            grad_cosine=cos,
            grad_angle_deg=math.degrees(math.acos(max(-1.0, min(1.0, cos)))),
            grad_cosine_ci95=half,
            grad_norm_ratio=float(total_cache.norm() / total_full.norm()),
        )
    else:
        out.update(
            grad_cosine=None, grad_angle_deg=None, grad_cosine_ci95=None, grad_norm_ratio=None
        )
    for k, s in figures.items():
        out.update(s.result(k))
    out["kl_finite_fraction"] = figures["kl"].finite_fraction()
    out.update(
        logprob_mean_error=token_err.result("e")["e"],
        logprob_max_error=token_err.max(),
        support_logprob_mean_error=support_err.result("e")["e"],
        support_logprob_max_error=support_err.max(),
        seconds=round(time.perf_counter() - started, 2),
    )
    return out


def run(cfg: FidelityConfig) -> dict:
    """The `sparsekd fidelity` command: open, load, check, measure."""
    from sparsekd.schemas.cache import open_cache

    cache = open_cache(cfg.cache)
    teacher, student = load_models(cfg, cache)
    return measure(cache, teacher, student, cfg)


def format_result(r: dict) -> str:
    def f(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    lines = [
        f"fidelity of {r['cache']} ({r['mode']}, loss {r['loss']}): {r['positions']} positions "
        f"in {r['rows']} rows, {r['seconds']} s",
        f"  gradient vs full KD: cosine {f(r['grad_cosine'])} "
        f"(+/- {f(r['grad_cosine_ci95'])}), angle {f(r['grad_angle_deg'], '.1f')} deg, "
        f"norm ratio {f(r['grad_norm_ratio'], '.3f')}",
        f"  teacher mass on the support {f(r['mass_covered'])}; "
        f"kl(teacher||target) {f(r['kl'])} (finite at {f(r['kl_finite_fraction'], '.2f')}); "
        f"kl(target||teacher) {f(r['kl_reverse'])}",
        f"  token log-prob error mean {f(r['logprob_mean_error'], '.2e')} "
        f"max {f(r['logprob_max_error'], '.2e')}",
    ]
    if r["support_logprob_max_error"] is not None:
        lines.append(
            f"  support log-prob error mean {f(r['support_logprob_mean_error'], '.2e')} "
            f"max {f(r['support_logprob_max_error'], '.2e')}"
        )
    return "\n".join(lines)
