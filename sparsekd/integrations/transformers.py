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
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from sparsekd.errors import StudentError
from sparsekd.integrations.torch import CacheDataset
from sparsekd.kernels import SparseKLConfig, sparse_kl_loss
from sparsekd.student_train.model import check_compatible, check_head

DATA_STATE = "sparsekd_data_state-rank-{rank}.json"


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
        (ckpt / DATA_STATE.format(rank=rank)).write_text(json.dumps(ds.state_dict()))


class SparseKDMixin:
    """The sparse-KD loss, checks, data loading and resume for a Trainer subclass."""

    def __init__(
        self,
        *args,
        kd_weight: float = 0.9,
        divergence: str = "fkl",
        backend: str = "auto",
        temperature: float = 1.0,
        beta: float = 0.1,
        **kwargs,
    ):
        cache_ds = kwargs.get("train_dataset")
        if isinstance(cache_ds, CacheDataset) and _validates_hf_datasets(type(self)):
            # TRL's trainers accept only `datasets` objects: a one-row stand-in passes their
            # checks, and the cache dataset takes its place once they are done
            kwargs["train_dataset"] = _stand_in()
        super().__init__(*args, **kwargs)
        if isinstance(cache_ds, CacheDataset):
            self.train_dataset = cache_ds
        self.sparse_kl = SparseKLConfig(
            divergence=divergence,
            kd_weight=kd_weight,
            ce_weight=1.0 - kd_weight,
            temperature=temperature,
            beta=beta,
            backend=backend,
            validate=not isinstance(self.train_dataset, CacheDataset),  # the reader checked
        )
        # the loss is a micro-batch mean: the Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        check_head(self.model)
        if isinstance(self.train_dataset, CacheDataset):
            tok = self.processing_class or _model_tokenizer(self.model)
            ds = self.train_dataset
            check_compatible(self.model, tok, ds.meta, ds.manifest)
            self.add_callback(_SaveDataState(self))

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
        if resume_from_checkpoint and isinstance(self.train_dataset, CacheDataset):
            ckpt = resume_from_checkpoint
            if ckpt is True:
                ckpt = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
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
        out = model(input_ids=inputs["input_ids"], output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        N = hidden.shape[0] * hidden.shape[1]
        ids = inputs["teacher_ids"].reshape(N, -1)
        loss = sparse_kl_loss(
            hidden.reshape(N, -1),
            head.weight,
            ids,
            inputs["teacher_probs"].reshape(N, -1).to(torch.float32),
            inputs["labels"].reshape(N),
            bias=head.bias,
            config=self.sparse_kl,
        )
        return (loss, out) if return_outputs else loss


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
