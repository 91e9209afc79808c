"""`sparsekd evaluate`: how a student does on a cache's sequences.

Metrics over the learnt positions (tokens) of the evaluated sequences: every position of a
text cache; the assistant's tokens of a chat cache (its loss mask, docs/chat.md):
- `lm_loss`: mean -log q(actual next token);
- `kl`: mean over positions with a stored support of sum_S p log(p / q), the KL from the
  teacher to the student estimated on the stored support (top-K: the head of the teacher);
- `ece`: expected calibration error of the student's top-1 prediction against the actual
  next token, 15 equal-width confidence bins: sum_b |B_b| / n * |accuracy_b - confidence_b|;
- `top1_agreement`: student argmax == teacher's most likely stored id, over positions with
  a support;
- `logprob_gap`: mean |log q(actual next token) - the teacher's stored log p of it|, over
  the learnt positions of any mode: how far the student's per-token likelihoods are from
  the teacher's. A model evaluated on a cache of its own outputs gives the quantisation
  floor (< 4.9e-4 per position) only if it saw every position in the teacher's context:
  the check, for every kind of cache, that documents are kept apart as they were built;
- `tokens`: positions evaluated (learnt positions).
`kl` and `top1_agreement` are null for a cache without teacher targets (mode logprob).

Distributed (inside train-student): every rank evaluates its share of each batch and the
sums are all-reduced; ranks run the same number of forwards (a rank without sequences in
the last batch runs one it discards), since an FSDP2 forward is a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparsekd.config import check, check_local, setting

ECE_BINS = 15


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    model: str = setting(doc="Student model folder.", flag=True)
    cache: str = setting(doc="Cache to evaluate on.", flag=True)
    max_sequences: int | None = setting(None, "Evaluate the first M sequences.", flag=True)
    batch_size: int = setting(4, "Sequences per forward.")

    def __post_init__(self):
        check_local(self.model, "--model")
        check(
            self.max_sequences is None or self.max_sequences >= 1,
            f"--max-sequences must be >= 1, got {self.max_sequences}",
        )
        check(self.batch_size >= 1, "batch_size must be >= 1")


class MetricSums:
    """Accumulates the sums behind the metrics across batches (and ranks)."""

    FIELDS = ("n", "nll", "kl", "n_support", "agree", "gap")

    def __init__(self):
        self.n = self.nll = self.kl = self.n_support = self.agree = self.gap = 0.0
        self.bin_count = np.zeros(ECE_BINS)
        self.bin_conf = np.zeros(ECE_BINS)
        self.bin_acc = np.zeros(ECE_BINS)

    def add(self, logq_NV, labels_N, ids_NS, probs_NS, teacher_lp_N) -> None:
        logq = logq_NV.double()
        self.n += logq.shape[0]
        label_lq = logq.gather(1, labels_N[:, None])[:, 0]
        self.nll -= label_lq.sum().item()
        self.gap += (label_lq - teacher_lp_N.double()).abs().sum().item()
        conf, pred = logq.max(-1)
        conf = conf.exp()
        correct = (pred == labels_N).double()
        b = torch.clamp((conf * ECE_BINS).long(), max=ECE_BINS - 1).cpu().numpy()
        np.add.at(self.bin_count, b, 1)
        np.add.at(self.bin_conf, b, conf.cpu().numpy())
        np.add.at(self.bin_acc, b, correct.cpu().numpy())
        mask = ids_NS >= 0
        has = mask.any(-1)
        p = torch.where(mask, probs_NS.double(), 0.0)
        lq = logq.gather(1, ids_NS.clamp_min(0))
        terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - lq), 0.0)
        self.kl += terms.sum().item()
        self.n_support += int(has.sum())
        teacher_top = ids_NS.gather(1, torch.where(mask, p, -1.0).argmax(-1, keepdim=True))[:, 0]
        self.agree += int(((pred == teacher_top) & has).sum())

    def all_reduce(self) -> None:
        import torch.distributed as dist

        t = torch.tensor(
            [getattr(self, f) for f in self.FIELDS]
            + [*self.bin_count, *self.bin_conf, *self.bin_acc],
            dtype=torch.float64,
        )
        dist.all_reduce(t)
        v = t.tolist()
        for i, f in enumerate(self.FIELDS):
            setattr(self, f, v[i])
        k = len(self.FIELDS)
        self.bin_count, self.bin_conf, self.bin_acc = (
            np.array(v[k + i * ECE_BINS : k + (i + 1) * ECE_BINS]) for i in range(3)
        )

    def result(self) -> dict:
        n = max(self.n, 1)
        occupied = self.bin_count > 0
        ece = float(np.sum(np.abs(self.bin_acc[occupied] - self.bin_conf[occupied])) / n)
        has_support = self.n_support > 0
        return {
            "lm_loss": self.nll / n,
            "kl": self.kl / self.n_support if has_support else None,
            "ece": ece,
            "top1_agreement": self.agree / self.n_support if has_support else None,
            "logprob_gap": self.gap / n,
            "tokens": int(self.n),
        }

    def reliability(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per bin: mean confidence, accuracy, count (for reliability diagrams)."""
        c = np.maximum(self.bin_count, 1)
        return self.bin_conf / c, self.bin_acc / c, self.bin_count


@torch.no_grad()
def evaluate(
    logits_fn,
    cache,
    *,
    device="cpu",
    max_sequences: int | None = None,
    batch_size: int = 4,
    rank: int = 0,
    world_size: int = 1,
    sums: MetricSums | None = None,
) -> dict:
    """Metrics over the first `max_sequences` sequences of `cache` (all by default).

    `logits_fn(input_ids [B, L], position_ids [B, L]) -> logits [B, L, V]`, the position
    ids restarting at each document of a row (reader.Batch); under DDP/FSDP2 every rank
    calls this with the same arguments except its rank.
    """
    from sparsekd.schemas import format as F
    from sparsekd.student_train.reader import collate

    sums = sums or MetricSums()
    documents = F.attention_of(cache.meta) == "document"  # else each row is one sequence
    seqs, step = [], batch_size * world_size
    for seq in cache:
        if max_sequences is not None and len(seqs) >= max_sequences:
            break
        seqs.append(seq)
    for g0 in range(0, len(seqs), step):
        group = seqs[g0 : g0 + step]
        mine = group[rank * batch_size : (rank + 1) * batch_size]
        b = collate(mine or group[:1])  # an empty share still joins the collective forward
        x = torch.from_numpy(b.input_ids).to(device)
        pos = torch.from_numpy(b.position_ids).to(device) if documents else None
        logits_BLV = logits_fn(x, pos).float()
        if not mine:
            continue
        labels = b.labels.reshape(-1)
        learnt = torch.from_numpy(labels >= 0).to(device)  # the positions the student learns
        rows = len(labels)
        sums.add(
            torch.log_softmax(logits_BLV, -1).reshape(rows, -1)[learnt],
            torch.from_numpy(labels).to(device)[learnt],
            torch.from_numpy(b.teacher_ids.reshape(rows, -1)).to(device)[learnt],
            torch.from_numpy(b.teacher_probs.reshape(rows, -1)).to(device)[learnt],
            torch.from_numpy(b.teacher_label_logprob.reshape(rows)).to(device)[learnt],
        )
    if world_size > 1:
        sums.all_reduce()
    return sums.result()


def evaluate_model(model, cache, **kwargs) -> dict:
    """`evaluate` with a plain causal LM (eval mode during the call)."""
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        from sparsekd.student_train.model import attention_kwargs

        return evaluate(
            lambda x, pos: (
                model(input_ids=x, use_cache=False, **attention_kwargs(model, pos)).logits
            ),
            cache,
            device=device,
            **kwargs,
        )
    finally:
        model.train(was)


def run(cfg: EvaluateConfig) -> dict:
    """The `sparsekd evaluate` command: load, check, evaluate."""
    from sparsekd.schemas.cache import open_cache
    from sparsekd.student_train.model import check_compatible, load_student

    model, tok = load_student(cfg.model)
    cache = open_cache(cfg.cache)
    check_compatible(model, tok, cache.meta, cache.manifest)
    return evaluate_model(model, cache, max_sequences=cfg.max_sequences, batch_size=cfg.batch_size)
