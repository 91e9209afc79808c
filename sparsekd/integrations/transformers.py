"""`SparseKDTrainer`: a `transformers.Trainer` whose loss is (1 - A) CE + A KD against a
sparsekd cache, through the fused `sparse_kl_loss` (no [tokens, V] logits formed).

    from sparsekd.integrations.torch import CacheDataset, collate
    from sparsekd.integrations.transformers import SparseKDTrainer

    trainer = SparseKDTrainer(model=model, args=TrainingArguments(..., max_steps=1000),
                              train_dataset=CacheDataset("cache/"), data_collator=collate,
                              processing_class=tokenizer, kd_weight=0.9, divergence="fkl")
    trainer.train()

`SparseKDMixin` carries all of it, so that TRL's trainers (which derive from Trainer) get
it the same way: `class KDSFTTrainer(SparseKDMixin, SFTTrainer): pass`.

- The loss: the model runs through its own (DDP-wrapped) forward with
  `output_hidden_states=True, logits_to_keep=1`, and the final hidden states and the output
  embedding go to `sparse_kl_loss`. Micro-batch means, divided by the accumulation steps
  by the Trainer, as `sparsekd train-student` does.
- Refusals: a model whose vocabulary or tokenizer (`processing_class`, or when it is not
  given the tokenizer in the model's folder) differs from the cache's, or whose chat
  template differs from a chat cache's, and a head that is not `hidden @ W.T + b`
  (`student_train.model.check_head`).
- Labels are -100 where the cache's loss mask says the student learns nothing (a chat
  cache's prompts and template markup): both the CE and the KD means run over learnt
  positions only.
- Data: a `CacheDataset` gets a DataLoader of its own (each rank reads its own streams;
  Accelerate's dispatching of iterable datasets would send rank 0's data everywhere).
- Resume: every checkpoint holds each rank's dataset state
  (`sparsekd_data_state-rank-R.json`); `train(resume_from_checkpoint=...)` restores it and
  skips no batches (`ignore_data_skip`), so the data continues exactly with no replay.
- A divergence parameter that moves (`schedule=`, TAID's `t`; the settings and rules of
  `train-student`'s `loss.*`, docs/losses.md) steps after each optimizer step on the
  step's KD loss, on the device, and is saved in `sparsekd_loss_schedule.pt`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import transformers

from sparsekd.config import build
from sparsekd.errors import ConfigError, StudentError
from sparsekd.integrations.torch import CacheDataset
from sparsekd.student_train.config import LossConfig
from sparsekd.student_train.loss import KDLoss
from sparsekd.student_train.model import attention_kwargs, check_compatible, check_head

DATA_STATE = "sparsekd_data_state-rank-{rank}.json"
PARAM_STATE = "sparsekd_loss_schedule.pt"


class _EpochLoader(torch.utils.data.DataLoader):
    """A DataLoader the Trainer can tell which epoch it is (the dataset's order)."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class _SaveDataState(transformers.TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        ds = self.trainer.train_dataset
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        rank = args.process_index
        if isinstance(ds, CacheDataset):
            (ckpt / DATA_STATE.format(rank=rank)).write_text(json.dumps(ds.state_dict()))
        if self.trainer.param_schedule is not None and args.process_index == 0:
            torch.save(self.trainer.param_schedule.state_dict(), ckpt / PARAM_STATE)


class _StepParamSchedule(transformers.TrainerCallback):
    """After each optimizer step, the divergence parameter moves (on the device) by the
    step's mean KD loss."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        tr = self.trainer
        if tr.param_schedule is not None and tr._kd_n:
            tr.param_schedule.step(tr._kd_sum / tr._kd_n)
        tr._kd_sum, tr._kd_n = None, 0


class SparseKDMixin:
    """The sparse-KD loss, checks, data loading and resume for a Trainer subclass.

    The loss is `train-student`'s (student_train/loss.py `KDLoss`): pass `loss=LossConfig(...)`
    or any of its fields as keywords (`kind`, or `divergence` as its other name,
    `kd_weight`, `temperature`, `beta`, `t`, `schedule`, `schedule_end`, `schedule_steps`,
    `taid_alpha`, `taid_momentum`, `backend`, `chunk_rows`), checked by the same rules and
    with the same defaults."""

    def __init__(self, *args, loss: LossConfig | None = None, **kwargs):
        names = {f.name for f in dataclasses.fields(LossConfig)}
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in names or k == "divergence"}
        if "divergence" in given:
            if "kind" in given:
                raise ConfigError("SparseKDTrainer: give divergence= or kind=, not both")
            given["kind"] = given.pop("divergence")
        if loss is not None and given:
            raise ConfigError(f"SparseKDTrainer: give loss= or {sorted(given)}, not both")
        cache_ds = kwargs.get("train_dataset")
        if isinstance(cache_ds, CacheDataset) and _validates_hf_datasets(type(self)):
            # TRL's trainers accept only `datasets` objects: a one-row stand-in passes their
            # checks, and the cache dataset takes its place once they are done
            kwargs["train_dataset"] = _stand_in()
        super().__init__(*args, **kwargs)
        if isinstance(cache_ds, CacheDataset):
            self.train_dataset = cache_ds
        # the settings of `train-student --loss`, checked by the same rules
        self.loss_settings = loss or build(LossConfig, given, "SparseKDTrainer ")
        # a CacheDataset's reader checked ids and labels; other data is checked per call
        self.kd_loss = KDLoss(
            self.loss_settings,
            steps=max(self.args.max_steps, 1),
            validate=not isinstance(self.train_dataset, CacheDataset),
            world=self.args.world_size,
        )
        self._kd_sum, self._kd_n = None, 0
        self.add_callback(_StepParamSchedule(self))
        # the loss is a micro-batch mean: the Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        check_head(self.model)
        if isinstance(self.train_dataset, CacheDataset):
            tok = self.processing_class or _model_tokenizer(self.model)
            ds = self.train_dataset
            check_compatible(self.model, tok, ds.meta, ds.manifest)
        self.add_callback(_SaveDataState(self))

    @property
    def param_schedule(self):
        """The divergence parameter's schedule (loss.KDLoss), or None."""
        return self.kd_loss.schedule

    def get_train_dataloader(self):
        ds = self.train_dataset
        if not isinstance(ds, CacheDataset):
            return super().get_train_dataloader()
        workers = self.args.dataloader_num_workers
        return _EpochLoader(
            ds,
            batch_size=self._train_batch_size,
            collate_fn=self.data_collator,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
            prefetch_factor=self.args.dataloader_prefetch_factor if workers else None,
        )

    def train(self, resume_from_checkpoint=None, **kwargs):
        ckpt = resume_from_checkpoint
        if ckpt is True:
            ckpt = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
        self._resume_schedule_from = Path(ckpt) if ckpt else None
        if ckpt and isinstance(self.train_dataset, CacheDataset):
            path = Path(ckpt) / DATA_STATE.format(rank=self.args.process_index)
            if not path.exists():
                raise StudentError(f"{ckpt} holds no sparsekd data state ({path.name})")
            self.train_dataset.load_state_dict(json.loads(path.read_text()))
            self.args.ignore_data_skip = True  # the dataset seeks; nothing to skip or replay
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (
            model.training
            and isinstance(self.train_dataset, CacheDataset)
            and "positions" in inputs
        ):
            self.train_dataset.observe(inputs)
        out = student_forward(model, inputs)
        hidden = out.hidden_states[-1]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        N = hidden.shape[0] * hidden.shape[1]
        self._restore_schedule(hidden.device)
        loss, kd, _ = self.kd_loss(
            hidden.reshape(N, -1),
            head,
            inputs["labels"].reshape(N),
            inputs["teacher_ids"].reshape(N, -1),
            inputs["teacher_probs"].reshape(N, -1).to(torch.float32),
        )
        if self.param_schedule is not None and model.training:  # the step's KD loss
            self._kd_sum = kd if self._kd_sum is None else self._kd_sum + kd
            self._kd_n += 1
        return (loss, out) if return_outputs else loss

    def _restore_schedule(self, device) -> None:
        """Make the loss's schedule on the model's device; when `train` resumes from a
        checkpoint, restore its state from there (once)."""
        ckpt = getattr(self, "_resume_schedule_from", None)
        schedule = self.kd_loss.schedule_on(device)
        if ckpt is None or schedule is None:
            return
        self._resume_schedule_from = None
        if (ckpt / PARAM_STATE).exists():
            schedule.load_state_dict(torch.load(ckpt / PARAM_STATE, weights_only=False))
        elif self.loss_settings.schedule_kind != "constant":
            raise StudentError(f"{ckpt} holds no state of the loss schedule ({PARAM_STATE})")


def student_forward(model, inputs: dict):
    """The student's forward on a collated batch, final hidden states kept (the loss applies
    the head itself). Position ids restart at each document of a row, and attention stays
    inside each (`attention_kwargs`): the model reads the row's documents apart, as the
    teacher did."""
    inner = model.module if hasattr(model, "module") else model  # under DDP
    return model(
        input_ids=inputs["input_ids"],
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
        **attention_kwargs(inner, inputs.get("position_ids")),
    )


def _model_tokenizer(model):
    """The tokenizer saved in the model's folder (transformers makes processing_class
    optional; the cache check still needs the student's tokenizer)."""
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise StudentError(
            f"no processing_class given and no tokenizer in the model's folder {path!r}: pass "
            "processing_class=<the student's tokenizer> (it is checked against the cache's)"
        ) from e


def _validates_hf_datasets(cls) -> bool:
    return any(c.__module__.split(".")[0] == "trl" for c in cls.__mro__)


def _stand_in():
    import datasets

    return datasets.IterableDataset.from_generator(_one_row)


def _one_row():  # TRL looks at the first example of the dataset it is given
    yield {"input_ids": [0], "labels": [0]}


class SparseKDTrainer(SparseKDMixin, transformers.Trainer):
    """A transformers.Trainer distilling from a sparsekd cache (see the module docstring)."""


__all__ = ["SparseKDMixin", "SparseKDTrainer"]
