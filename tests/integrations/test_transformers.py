"""SparseKDTrainer: a real transformers.Trainer distilling from a cache built by the real
vLLM engine. Its loss falls; its first-step loss equals train-student's for the same
initialisation and batch; gradient accumulation and resume work; a mismatched student is
refused; under torchrun (DDP, gloo) each rank trains on its own data. TRL's SFTTrainer
takes the same mixin."""

import json
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sparsekd.errors import StudentError
from sparsekd.integrations.torch import CacheDataset, collate
from sparsekd.integrations.transformers import SparseKDTrainer
from tests.helpers import run_cli, run_torchrun

pytestmark = pytest.mark.slow


class Recording(SparseKDTrainer):
    """The trainer as users get it, keeping each micro-batch's loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses = getattr(self, "losses", []) + [float(loss.detach())]
        return loss


def _args(out, **kw):
    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **kw})


def _trainer(student, cache, out, cls=Recording, ds_kw=None, loss_kw=None, **kw):
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(student)
    return cls(
        model=model,
        args=_args(out, **kw),
        train_dataset=CacheDataset(cache, seed=0, **(ds_kw or {})),
        data_collator=collate,
        processing_class=tok,
        **{"kd_weight": 0.9, "divergence": "fkl", **(loss_kw or {})},
    )


def test_first_step_loss_equals_train_student_and_the_loss_falls(
    tmp_path, topk12_cache, tiny_student
):
    t = _trainer(tiny_student, topk12_cache, tmp_path / "hf", max_steps=20)
    t.train()
    assert len(t.losses) == 20 and t.losses[-1] < t.losses[0] - 1.0
    run_cli(
        "train-student",
        "--cache",
        topk12_cache,
        "--student",
        tiny_student,
        "--out",
        tmp_path / "sk",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--kd-weight",
        "0.9",
        "--quiet",
        check=True,
    )
    first = json.loads((tmp_path / "sk" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    # same initialisation, same batch, same float32 kernels; the two paths differ only in
    # how the decoder is called (the model's own forward vs its decoder), so they agree to
    # float32 rounding of the sums
    assert t.losses[0] == pytest.approx(first, rel=1e-5)


def test_gradient_accumulation_averages_micro_batches(tmp_path, topk12_cache, tiny_student):
    a = _trainer(
        tiny_student, topk12_cache, tmp_path / "ga", max_steps=2, gradient_accumulation_steps=2
    )
    a.train()
    logged = [h["loss"] for h in a.state.log_history if "loss" in h]
    assert len(a.losses) == 4 and len(logged) == 2
    assert logged[0] == pytest.approx((a.losses[0] + a.losses[1]) / 2, rel=1e-3)


# TAID with a large step size: its adaptive state (momentum, previous loss), not only its
# linear floor, decides t, so a resume that lost it would show
@pytest.mark.parametrize(
    "loss_kw",
    [{}, {"divergence": "taid", "taid_alpha": 1.0, "taid_momentum": 0.5}],
    ids=["fkl", "taid"],
)
def test_resume_from_a_checkpoint_continues_the_data_exactly(
    tmp_path, topk12_cache, tiny_student, loss_kw
):
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3, loss_kw=loss_kw)
    full = _trainer(tiny_student, topk12_cache, tmp_path / "full", **kw)
    full.train()
    part = _trainer(tiny_student, topk12_cache, tmp_path / "part", **kw)
    part.train()
    ckpt = tmp_path / "part" / "checkpoint-3"
    assert (ckpt / "sparsekd_data_state-rank-0.json").exists()
    resumed = _trainer(tiny_student, topk12_cache, tmp_path / "part", **kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.losses == pytest.approx(full.losses[3:], rel=1e-6)
    if loss_kw:
        t_full = full.param_schedule.value.item()
        floor = 0.4 + 0.6 * 6 / 6  # the linear floor reaches the end at the last step...
        assert resumed.param_schedule.state_dict()["done"] == 6
        assert resumed.param_schedule.value.item() == t_full == pytest.approx(floor)
        assert (ckpt / "sparsekd_loss_schedule.pt").exists()
        mid = torch.load(ckpt / "sparsekd_loss_schedule.pt", weights_only=False)
        # ...but at step 3 the adaptive pace is ahead of its 0.7: the state matters
        assert mid["value"].item() > 0.4 + 0.6 * 3 / 6 + 0.01


def test_a_student_of_another_tokenizer_is_refused_and_its_own_folder_checked(
    tmp_path, topk12_cache, tiny_student
):
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    tok.add_tokens(["<another>"])
    with pytest.raises(StudentError, match="tokenizer mismatch"):
        SparseKDTrainer(
            model=model,
            args=_args(tmp_path),
            train_dataset=CacheDataset(topk12_cache),
            data_collator=collate,
            processing_class=tok,
        )
    # without processing_class, the tokenizer saved with the model is the one checked
    SparseKDTrainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=CacheDataset(topk12_cache),
        data_collator=collate,
    )
    bare = tmp_path / "weights-only"
    model.save_pretrained(bare)  # a folder with no tokenizer
    model = AutoModelForCausalLM.from_pretrained(bare, dtype=torch.float32)
    with pytest.raises(StudentError, match="no tokenizer in the model's folder.*pass processing"):
        SparseKDTrainer(
            model=model,
            args=_args(tmp_path),
            train_dataset=CacheDataset(topk12_cache),
            data_collator=collate,
        )


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments
    from sparsekd.integrations.torch import CacheDataset, collate
    from sparsekd.integrations.transformers import SparseKDTrainer

    class Seen(SparseKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.seen = getattr(self, "seen", []) + inputs["seq_id"].tolist()
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    cache, student, out = sys.argv[1:4]
    args = TrainingArguments(output_dir=out, max_steps=3, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", ddp_backend="gloo")
    t = Seen(model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32), args=args,
             train_dataset=CacheDataset(cache), data_collator=collate,
             processing_class=AutoTokenizer.from_pretrained(student))
    t.train()
    json.dump(t.seen, open(f"{out}/seen-{t.args.process_index}.json", "w"))
    # gloo's threads stopped before the interpreter exits (else, rarely, a C++ abort at exit)
    torch.distributed.destroy_process_group()
    """
)


def test_under_torchrun_each_rank_trains_on_its_own_data(tmp_path, topk12_cache, tiny_student):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    proc = run_torchrun(script, topk12_cache, tiny_student, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [set(json.loads((tmp_path / f"seen-{r}.json").read_text())) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]


def test_trl_sft_trainer_takes_the_mixin(tmp_path, topk12_cache, tiny_student):
    trl = pytest.importorskip("trl")
    from sparsekd.integrations.transformers import SparseKDMixin

    class KDSFTTrainer(SparseKDMixin, trl.SFTTrainer):
        pass

    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        dataset_kwargs={"skip_prepare_dataset": True},
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    t = KDSFTTrainer(
        model=model,
        args=args,
        train_dataset=CacheDataset(topk12_cache),
        data_collator=collate,
        processing_class=AutoTokenizer.from_pretrained(tiny_student),
    )
    out = t.train()
    assert out.global_step == 3 and out.training_loss > 0
    assert isinstance(t.train_dataset, CacheDataset)
