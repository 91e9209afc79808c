"""`sparsekd evaluate`: how a student does on a cache's sequences.

Metrics over every position (token) of the evaluated sequences:
- `lm_loss`: mean -log q(actual next token);
- `kl`: mean over positions with a stored support of sum_S p log(p / q), the KL from the
  teacher to the student estimated on the stored support (top-K: the head of the teacher);
- `ece`: expected calibration error of the student's top-1 prediction against the actual
  next token, 15 equal-width confidence bins: sum_b |B_b| / n * |accuracy_b - confidence_b|;
- `top1_agreement`: student argmax == teacher's most likely stored id, over positions with
  a support;
- `tokens`: positions evaluated.
"""

from __future__ import annotations

import numpy as np
import torch

ECE_BINS = 15
KEYS = ("lm_loss", "kl", "ece", "top1_agreement", "tokens")


class MetricSums:
    """Accumulates the sums behind the metrics across batches."""

    def __init__(self):
        self.n = 0
        self.nll = 0.0
        self.kl = 0.0
        self.n_support = 0
        self.agree = 0
        self.bin_count = np.zeros(ECE_BINS)
        self.bin_conf = np.zeros(ECE_BINS)
        self.bin_acc = np.zeros(ECE_BINS)

    def add(
        self,
        logq_NV: torch.Tensor,
        labels_N: torch.Tensor,
        ids_NS: torch.Tensor,
        probs_NS: torch.Tensor,
    ) -> None:
        logq = logq_NV.double()
        self.n += logq.shape[0]
        self.nll -= logq.gather(1, labels_N[:, None])[:, 0].sum().item()
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

    def result(self) -> dict:
        n = max(self.n, 1)
        occupied = self.bin_count > 0
        ece = float(np.sum(np.abs(self.bin_acc[occupied] - self.bin_conf[occupied])) / n)
        return {
            "lm_loss": self.nll / n,
            "kl": self.kl / max(self.n_support, 1),
            "ece": ece,
            "top1_agreement": self.agree / max(self.n_support, 1),
            "tokens": self.n,
        }

    def reliability(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per bin: mean confidence, accuracy, count (for reliability diagrams)."""
        c = np.maximum(self.bin_count, 1)
        return self.bin_conf / c, self.bin_acc / c, self.bin_count


@torch.no_grad()
def evaluate(
    model,
    cache,
    *,
    max_sequences: int | None = None,
    batch_size: int = 4,
    sums: MetricSums | None = None,
) -> dict:
    """Metrics of `model` over the cache's sequences in manifest order."""
    from sparsekd.student_train.reader import collate

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = sums or MetricSums()
    buf, seen = [], 0

    def flush():
        b = collate(buf)
        x = torch.from_numpy(b.input_ids).to(device)
        logits_BLV = model(input_ids=x).logits.float()
        logq = torch.log_softmax(logits_BLV, -1).reshape(-1, logits_BLV.shape[-1])
        sums.add(
            logq,
            torch.from_numpy(b.labels).to(device),
            torch.from_numpy(b.ids).to(device),
            torch.from_numpy(b.probs).to(device),
        )

    for seq in cache:
        buf.append(seq)
        seen += 1
        if len(buf) == batch_size:
            flush()
            buf = []
        if max_sequences is not None and seen >= max_sequences:
            break
    if buf:
        flush()
    model.train(was_training)
    return sums.result()
