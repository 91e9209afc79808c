"""The loss mask downstream: train-student's loss counts only learnt positions (against a
loss computed by hand on one batch), a plain DataLoader and SparseKDTrainer see -100 outside
them, evaluate and refine measure over them, a student with another chat template is
refused, and a cache of schema version 2 (built before the mask) still trains and
evaluates as "every position learnt"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsekd import open_cache
from sparsekd.student_train.config import LossConfig
from sparsekd.student_train.loss import KDLoss
from sparsekd.student_train.model import DistillModule, check_compatible, load_student
from sparsekd.student_train.reader import IGNORE, CacheReader
from tests.helpers import error_line, run_cli

V2_CACHE = Path(__file__).resolve().parents[1] / "data" / "v2-topk-cache"


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory, smollm2_dir):
    """The SmolLM2 teacher's top-8 view of 8 rows of the built-in chat corpus (hf engine)."""
    out = tmp_path_factory.mktemp("masked") / "chat"
    run_cli(
        "build-cache", "--teacher", smollm2_dir, "--engine", "hf", "--corpus",
        "builtin:stdlib-chat", "--seq-len", 128, "--max-sequences", 8, "--k", 8,
        "--out", out, "--quiet", check=True,
    )  # fmt: skip
    return out


def test_the_loss_counts_only_learnt_positions(chat_cache, tiny_student):
    cache = open_cache(chat_cache)
    reader = CacheReader(cache, batch_size=4, prefetch=0)
    batch = next(reader)
    reader.close()
    mask = batch["labels"].flatten() != IGNORE  # the loss's rows: B * L
    assert 0 < int(mask.sum()) < mask.numel()  # a chat cache: some positions learnt
    model, _ = load_student(tiny_student)
    cfg = LossConfig(kind="fkl", kd_weight=0.9, backend="torch")
    loss, kd, ce = DistillModule(model, KDLoss(cfg, steps=1))(
        batch["input_ids"], batch["labels"], batch["teacher_ids"], batch["teacher_probs"]
    )
    # by hand, in float64: CE and forward KL on the stored support, each a mean over the
    # learnt positions only
    with torch.no_grad():
        logq = torch.log_softmax(model(input_ids=batch["input_ids"]).logits.double(), -1)
        logq = logq.reshape(-1, logq.shape[-1])[mask]
        ce_ref = -logq.gather(1, batch["labels"].flatten()[mask][:, None]).mean()
        ids = batch["teacher_ids"].flatten(0, 1)[mask]
        p = batch["teacher_probs"].flatten(0, 1)[mask].double()
        kl = torch.where(
            ids >= 0, p * (torch.log(p.clamp_min(1e-30)) - logq.gather(1, ids.clamp_min(0))), 0.0
        )
        kd_ref = kl.sum(1).mean()
    assert torch.allclose(ce.double(), 0.1 * ce_ref, rtol=1e-5)
    assert torch.allclose(kd.double(), 0.9 * kd_ref, rtol=1e-5)
    assert torch.allclose(loss.double(), 0.9 * kd_ref + 0.1 * ce_ref, rtol=1e-5)


def test_dataloader_and_trainer_see_minus_100_outside_learnt_positions(
    chat_cache, tiny_student, tmp_path
):
    import transformers

    from sparsekd.integrations.torch import CacheDataset, collate
    from sparsekd.integrations.transformers import SparseKDTrainer

    ds = CacheDataset(str(chat_cache), shuffle=False)
    masks = {s.seq_id: s for s in open_cache(chat_cache)}
    for b in torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate):
        for row, sid in zip(b["labels"], b["seq_id"].tolist()):
            seq = masks[sid]
            want = np.where(seq.loss_mask, seq.labels, -100)
            assert row.tolist() == want.tolist()
    seen = []

    class Recording(SparseKDTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            seen.append(inputs["labels"].clone())
            return super().compute_loss(model, inputs, *a, **kw)

    model, _ = load_student(tiny_student)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Recording(model=model, args=args, train_dataset=ds, data_collator=collate)
    trainer.train()  # no processing_class: the tokenizer in the model's folder was checked
    assert len(seen) == 2 and all(((lab == -100) | (lab >= 0)).all() for lab in seen)
    assert all(0 < int((lab == -100).sum()) < lab.numel() for lab in seen)


def test_evaluate_and_refine_measure_the_learnt_positions(chat_cache, tiny_student, tmp_path):
    cache = open_cache(chat_cache)
    learnt = sum(int(s.loss_mask.sum()) for s in cache)
    res = json.loads(
        run_cli(
            "evaluate", "--model", tiny_student, "--cache", chat_cache, "--json", check=True
        ).stdout
    )
    assert res["tokens"] == learnt == cache.manifest["num_learnt"]
    from sparsekd.cache_builder.refine import _mean_learnt

    seq = next(iter(cache))
    assert _mean_learnt(seq) == pytest.approx(float(np.mean(seq.token_logprobs[seq.loss_mask])))
    assert np.isnan(seq.token_logprobs[~seq.loss_mask]).all()


def test_a_student_with_another_chat_template_is_refused(chat_cache, tiny_student, tmp_path):
    import shutil

    other = tmp_path / "student"
    shutil.copytree(tiny_student, other)
    (other / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    proc = run_cli("evaluate", "--model", other, "--cache", chat_cache)
    assert proc.returncode == 2 and "chat template mismatch" in error_line(proc)
    cache = open_cache(chat_cache)
    model, tok = load_student(tiny_student)
    check_compatible(model, tok, cache.meta, cache.manifest)  # its own template: fine


def _trains(cache, student, out, steps: int):
    """train-student on `cache` for `steps` steps: every step's loss finite, KD term > 0."""
    run_cli(
        "train-student", "--cache", cache, "--student", student, "--out", out,
        "--steps", steps, "--batch-size", 2, "--quiet", check=True,
    )  # fmt: skip
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == steps
    assert all(np.isfinite(m["loss"]) and m["kd"] > 0 for m in metrics)
    return out


def test_a_version_2_cache_still_trains_and_evaluates(tiny_student, tmp_path):
    cache = open_cache(V2_CACHE)
    assert cache.version == 2
    seqs = list(cache)
    assert all(s.loss_mask.all() and np.isfinite(s.token_logprobs).all() for s in seqs)
    out = _trains(V2_CACHE, tiny_student, tmp_path / "run", steps=3)
    res = json.loads(
        run_cli(
            "evaluate", "--model", out / "final", "--cache", V2_CACHE, "--json", check=True
        ).stdout
    )
    assert res["tokens"] == len(seqs) * cache.meta["seq_len"] and res["kl"] > 0
    assert run_cli("inspect", V2_CACHE, "--verify", check=True).returncode == 0


def test_a_version_3_cache_trains_as_it_was_built(tiny_student, tmp_path):
    """Several conversations per row, read whole by its teacher (before documents were
    kept apart): the student reads its rows whole too, with no position ids."""
    from sparsekd.schemas import format as F
    from sparsekd.student_train.reader import CacheReader

    v3 = V2_CACHE.parent / "v3-chat-cache"
    cache = open_cache(v3)
    assert cache.version == 3 and F.attention_of(cache.meta) == "row"
    reader = CacheReader(cache, batch_size=2, prefetch=0)
    b = next(reader)
    reader.close()
    assert torch.equal(b["position_ids"], torch.arange(cache.meta["seq_len"]).expand(2, -1))
    _trains(v3, tiny_student, tmp_path / "run", steps=2)
