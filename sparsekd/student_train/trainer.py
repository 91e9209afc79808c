"""`train-student`: set up parallelism -> reader -> step loop -> checkpoint -> eval -> final save.

    d = parallel.init()                    parallel.py: process group, device
    data = open_data(cfg)                  the cache (or refined set + teacher cache)
    cfg, run, changes = plan_run(...)      checkpoint.py: new run or a strict resume
    trainer = Trainer(cfg, d, model, data) module, DDP/FSDP2, AdamW, schedule, reader.py
    trainer.fit(start)                     the step loop; metrics.py logs, checkpoint.py saves
    trainer.save_final(tok)                out/final: a save_pretrained folder

Loss per step: (1 - A) CE + A KD through `sparse_kl_loss` on the student's final hidden
states and LM head (`--loss ce` sets A = 0). A divergence's parameter (beta, TAID's t)
follows `loss.schedule` on the device (schedules.py), checkpointed with the rest. AdamW
(decay on matrices only), linear warm-up then cosine decay to 10 %, gradient clipping and
accumulation; bf16 autocast on GPU.

The step (`Trainer.train_step`) makes no host synchronisation: ids and labels were checked
by the reader on the CPU, the loss skips its own value checks, and the step's results stay
on the device until a logging step (`log_every`) reads them. `metrics.jsonl` records the
means since the previous record, the time the step loop waited for data, and tokens/s.

Output directory: metrics.jsonl, data/rank-R.txt, checkpoints/step-N/, final/,
train_config.json (checkpoint.py). Killed and resumed, a CPU run ends bitwise identical
to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparsekd.errors import CacheError, Preempted, RunError
from sparsekd.schemas import format as F
from sparsekd.schemas.cache import Cache, check_same_sequences, open_cache
from sparsekd.schemas.modes import get_mode
from sparsekd.student_train import checkpoint, parallel
from sparsekd.student_train.config import TrainConfig
from sparsekd.student_train.evaluate import evaluate
from sparsekd.student_train.loss import KDLoss
from sparsekd.student_train.metrics import DataLog, MetricsLog
from sparsekd.student_train.model import DistillModule, check_compatible, load_student, save_final
from sparsekd.student_train.optim import build_optimizer, build_schedule
from sparsekd.student_train.preemption import StopSignals
from sparsekd.student_train.reader import LOSS_KEYS, CacheReader


@dataclass
class TrainingData:
    cache: Cache  # where the sequences and their targets are read
    keep: np.ndarray | None  # sorted seq_ids to keep (a refined set's), None: all
    eval_cache: Cache | None
    identities: dict  # what a resume must find unchanged


def open_data(cfg: TrainConfig) -> TrainingData:
    """The cache to stream and the seq_ids to keep from it. With --teacher-cache, the
    sequences of --cache (a refined set) are read from the teacher cache, whose sparse
    targets they then carry."""
    cache, keep = open_cache(cfg.data.cache), None
    ids = {"cache": cache.fingerprint, "teacher_cache": None}
    if cfg.data.teacher_cache:
        targets = open_cache(cfg.data.teacher_cache)
        if "refined" in targets.meta:
            raise CacheError(f"--teacher-cache {targets.path} is a refined set, not a full cache")
        check_same_sequences(cache, targets, "--cache and --teacher-cache")
        keep, cache = cache.kept_seq_ids(), targets
        ids["teacher_cache"] = targets.fingerprint
    if cfg.loss.kind != "ce" and not get_mode(cache.meta["mode"]).has_support:
        raise CacheError(
            f"--loss {cfg.loss.kind} needs teacher targets, and {cache.path} stores token "
            "log-probs only (mode logprob): use --loss ce, or add --teacher-cache with a top-K "
            "or sample cache of the same corpus"
        )
    eval_cache = open_cache(cfg.eval.cache) if cfg.eval.cache else None
    return TrainingData(cache, keep, eval_cache, ids)


class Trainer:
    def __init__(self, cfg: TrainConfig, d: parallel.Dist, model, data: TrainingData):
        self.cfg, self.d, self.data = cfg, d, data
        torch.manual_seed(cfg.seed)
        model.to(d.device)
        # the reader checked ids and labels: no validation in the loss
        self.loss = KDLoss(
            cfg.loss, steps=cfg.steps, validate=False, world=d.world, device=d.device
        )
        self.param = self.loss.schedule  # the divergence's parameter over training, or None
        self.module = DistillModule(model, self.loss)
        # position ids (and the document mask they give) only for a cache whose rows hold
        # documents read apart; a row read whole is one causal sequence
        documents = F.attention_of(data.cache.meta) == "document"
        self.loss_keys = [k for k in LOSS_KEYS if documents or k != "position_ids"]
        layers = model.get_decoder().layers
        if cfg.parallel.activation_checkpointing:  # recompute each layer in the backward
            model.gradient_checkpointing_enable({"use_reentrant": False})
        if cfg.parallel.compile:  # each layer, before FSDP2 wraps it (as torchtitan does)
            for layer in layers:
                layer.compile()
        bf16 = cfg.parallel.mixed_precision == "bf16"
        cuda = d.device.type == "cuda"
        # the reader's checks can fail on one rank only (a stream with no data): their
        # verdict is shared before the first collective (wrapping the model is one)
        self.reader = parallel.agree(
            d,
            lambda: CacheReader(
                data.cache,
                batch_size=cfg.data.batch_size,
                rank=d.rank,
                world_size=d.world,
                seed=cfg.seed,
                shuffle_buffer=cfg.data.shuffle_buffer,
                keep=data.keep,
                prefetch=cfg.data.prefetch,
                pin_memory=cuda,
                read_ahead=cfg.data.read_ahead,
            ),
        )
        self.wrapped = parallel.wrap(self.module, layers, d, cfg.parallel.fsdp, bf16)
        self.opt = build_optimizer(self.module, cfg.optim)
        self.sched = build_schedule(self.opt, cfg.optim, cfg.optim.decay_steps)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        )
        self.pending = None  # a checkpoint written in the background, not yet published

    def _no_sync(self, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if last or self.d.world == 1:
            return contextlib.nullcontext()
        if hasattr(self.wrapped, "no_sync"):  # DDP
            return self.wrapped.no_sync()
        return contextlib.nullcontext()  # FSDP2 reduces every micro-batch

    def train_step(self, batches: list[dict]) -> dict:
        """One optimizer step over the micro-batches; returns device tensors, no host sync."""
        n = len(batches)
        parts = torch.zeros(3, device=self.d.device)
        used = None if self.param is None else self.param.value.clone()
        for i, b in enumerate(batches):
            x = {k: b[k].to(self.d.device, non_blocking=True) for k in self.loss_keys}
            with self._no_sync(i == n - 1), self.autocast:
                loss, kd, ce = self.wrapped(**x)
                (loss / n).backward()
            parts += torch.stack([loss.detach(), kd, ce]).float() / n
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.module.parameters(), self.cfg.optim.max_grad_norm
        )
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        out = {"loss": parts[0], "kd": parts[1], "ce": parts[2], "grad_norm": grad_norm.detach()}
        if self.param is not None:
            self.loss.step(parts[1])  # on the device: the value the next step uses
            out[self.cfg.loss.param] = used
        return out

    def evaluate(self) -> dict:
        self.module.eval()
        try:
            return evaluate(
                lambda x, pos: self.module(x, position_ids=pos, logits_only=True),
                self.data.eval_cache,
                device=self.d.device,
                max_sequences=self.cfg.eval.sequences,
                rank=self.d.rank,
                world_size=self.d.world,
            )
        finally:
            self.module.train()

    def fit(self, start: int, run: dict, log: MetricsLog, data_log: DataLog, stop) -> dict:
        """The step loop: train, log every `log_every` steps (the only host syncs),
        evaluate and checkpoint (their time is left out of the logged throughput); on a
        preemption signal (`stop`, a StopSignals open around the loop and the final save),
        checkpoint and raise Preempted (preemption.py)."""
        bar = _bar(self.cfg, start, self.d.rank)
        record = self._loop(start, run, log, data_log, bar, stop)
        self.publish_pending()
        if bar is not None:
            bar.close()
        return record

    def _loop(self, start, run, log, data_log, bar, stop) -> dict:
        cfg = self.cfg
        tokens_per_step = (
            cfg.data.batch_size
            * cfg.optim.grad_accum
            * self.data.cache.meta["seq_len"]
            * self.d.world
        )
        acc, since, t0, wait0, record = None, 0, time.perf_counter(), self.reader.wait_s, {}
        for step in range(start, cfg.steps):
            lr = self.opt.param_groups[0]["lr"]  # the rate this step uses
            batches = [next(self.reader) for _ in range(cfg.optim.grad_accum)]
            out = self.train_step(batches)
            seq_ids = np.concatenate([b["seq_id"].numpy() for b in batches])
            data_log.write(step + 1, seq_ids.tolist())
            acc = out if acc is None else {k: acc[k] + v for k, v in out.items()}
            since += 1
            logged = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
            if logged:
                dt, wait = time.perf_counter() - t0, self.reader.wait_s - wait0
                record = {"step": step + 1, **{k: float(v) / since for k, v in acc.items()}}
                if self.param is not None:  # as the logged step used it, not a mean
                    record[cfg.loss.param] = float(out[cfg.loss.param])
                _check_diverged(record, cfg)
                record.update(lr=lr, tokens_per_s=tokens_per_step * since / dt)
                record.update(data_wait_s=wait, data_wait_frac=wait / dt)
                log.write(record)
                acc, since, wait0 = None, 0, self.reader.wait_s
                t0 = time.perf_counter()
            if bar is not None:
                bar.update(1)
                if record:
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
                    )
            t0 += self._after_step(step + 1, run, log, logged)  # not training time
            if step + 1 < cfg.steps and stop.agreed(self.d, logged):
                if bar is not None:
                    bar.close()
                self._preempt(step + 1, run, stop.received)
        return record

    def _preempt(self, step: int, run: dict, received: str | None) -> None:
        """Checkpoint at `step` (unless this step's regular one was just written), then stop
        with the status the scheduler requeues on."""
        cfg, out = self.cfg, Path(self.cfg.out)
        saved = cfg.checkpoint.every and step % cfg.checkpoint.every == 0
        self.publish_pending()  # this step's own save, when it was one, or an earlier one
        if not saved:
            self.check_finite(step)
            mod = self.module.model
            checkpoint.save(out, step, self.d, mod, self.opt, self.sched, self.reader, run,
                            self.param)  # fmt: skip
        why = received or "a signal to another rank"
        raise Preempted(
            f"preempted ({why}) after step {step} of {cfg.steps}: checkpoint "
            f"{out / checkpoint.CKPT_DIR / f'step-{step}'} written; run the same command "
            "with --resume to continue exactly",
            cfg.checkpoint.preempt_exit_code,
        )

    def _after_step(self, step: int, run: dict, log: MetricsLog, logged: bool) -> float:
        """Evaluate and checkpoint when due, publish a background checkpoint whose writes
        have ended on every rank (agreed at logging steps); return the seconds it took."""
        cfg, t = self.cfg, time.perf_counter()
        if self.data.eval_cache is not None and cfg.eval.every and step % cfg.eval.every == 0:
            log.write({"step": step, "eval": self.evaluate()})
        if self.pending is not None and self._written_everywhere(logged):
            self.publish_pending()
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:  # the last step too:
            # a run resumed with more --steps goes on from its end, not from an earlier save
            self.check_finite(step)
            self.publish_pending()  # one background save at a time
            mod = self.module.model
            self.pending = checkpoint.save(
                Path(cfg.out), step, self.d, mod, self.opt, self.sched, self.reader, run,
                self.param, background=cfg.checkpoint.background,
            )  # fmt: skip
        return time.perf_counter() - t

    def _written_everywhere(self, sync_point: bool) -> bool:
        """Whether every rank's background write has ended (agreed by one all-reduce, at
        logging steps only, where the loop synchronises anyway)."""
        if not sync_point:
            return False
        if self.d.world == 1:
            return self.pending.written_here()
        flag = torch.tensor([1.0 if self.pending.written_here() else 0.0], device=self.d.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def publish_pending(self) -> None:
        """Wait for the background checkpoint's writes and publish it (a collective)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.publish()

    def check_finite(self, step: int) -> None:
        """Refuse to save non-finite weights (a host sync: only where a save happens)."""
        if not parallel.all_finite(self.module.parameters(), self.d):
            raise RunError(
                f"training diverged by step {step}: the student's weights are no longer "
                f"finite, so nothing is saved ({_likely_cause(self.cfg)})"
            )

    def save_final(self, tok) -> None:
        self.check_finite(self.cfg.steps)
        model_sd, _ = parallel.full_state(self.module.model)  # a collective under FSDP2
        if self.d.rank == 0:
            model = self.module.model
            if self.d.world > 1 and self.cfg.parallel.fsdp:  # a plain copy to save
                model, _ = load_student(self.cfg.student)
                model.load_state_dict(model_sd)
            save_final(model, tok, Path(self.cfg.out) / "final")
        self.d.barrier()


def run(cfg: TrainConfig) -> dict:
    """Train (or resume); returns the last metrics record."""
    owned = not torch.distributed.is_initialized()
    d = parallel.init()
    try:
        return _start(cfg, d)
    finally:  # on success and on an error every rank has agreed on (parallel.agree) alike:
        # gloo/NCCL's threads stop before the interpreter exits (left running, they could
        # abort the process while its peers hang up: SIGABRT instead of the exit status)
        if owned and d.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _start(cfg: TrainConfig, d) -> dict:
    out = Path(cfg.out)
    data = open_data(cfg)
    model, tok = load_student(cfg.student)
    for c in (data.cache, data.eval_cache):
        if c is not None:
            check_compatible(model, tok, c.meta, c.manifest)
    identities = {
        **data.identities,
        "student": checkpoint.student_identity(cfg.student),
        "world_size": d.world,
    }
    checkpoint.check_out(out)
    lock = checkpoint.RunLock(out) if d.rank == 0 else None  # one run per --out at a time
    try:
        return _run(cfg, d, out, data, model, tok, identities)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: TrainConfig, d, out: Path, data: TrainingData, model, tok, identities) -> dict:
    cfg, run_record, changes = checkpoint.plan_run(out, cfg, identities)
    if run_record.get("finished") == cfg.steps:  # a requeued job of a finished run
        if d.rank == 0:
            print(
                f"sparsekd: the run in {out} already finished at step {cfg.steps} "
                f"({out / 'final'}): nothing left to do",
                file=sys.stderr,
            )
        return {"step": cfg.steps, "finished_before": True}
    d.barrier()  # every rank has read --out before rank 0 writes to it
    trainer = Trainer(cfg, d, model, data)
    ckpt = checkpoint.latest_intact(out) if cfg.checkpoint.resume else None
    start = 0
    if ckpt is not None:
        checkpoint.check_belongs(ckpt, run_record)  # every rank reads it: all refuse alike
        start = checkpoint.load(
            ckpt, d, trainer.module.model, trainer.opt, trainer.sched, trainer.reader,
            trainer.param,
        )  # fmt: skip
    if d.rank == 0:
        run_record = checkpoint.write_run_record(out, run_record, start, changes)
        _say_resized(changes, start, cfg, d.world)
        for extra in (out / "data").glob("rank-*.txt"):  # ranks the resumed run lacks
            if int(extra.stem.removeprefix("rank-")) >= d.world:
                DataLog(out, int(extra.stem.removeprefix("rank-")), start).close()
    d.barrier()
    log = MetricsLog(out, d.rank, start, cfg.tensorboard)
    data_log = DataLog(out, d.rank, start)
    try:
        # one signal context from the first step to the run marked finished: a signal in
        # the final save lets it end (the run complete, marked), then stops with the
        # contract's exit status; the same command with --resume then has nothing to do
        with StopSignals(cfg.checkpoint.preempt_signals) as stop:
            record = trainer.fit(start, run_record, log, data_log, stop)
            trainer.save_final(tok)
            if d.rank == 0:
                checkpoint.mark_finished(out, run_record, cfg.steps)
            if stop.agreed(d, True):
                raise Preempted(
                    f"preempted ({stop.received or 'a signal to another rank'}) during the "
                    f"final save: the run finished at step {cfg.steps} and {out / 'final'} is "
                    "complete; the same command with --resume has nothing left to do",
                    cfg.checkpoint.preempt_exit_code,
                )
    finally:
        trainer.reader.close()
        log.close()
        data_log.close()
    return record


def _say_resized(changes: list, start: int, cfg: TrainConfig, world: int) -> None:
    """One line when a resume changed the number of ranks or the per-rank batch split, or
    replaced the gradient accumulation given to keep the global batch (never silently)."""
    keys = ("world_size", *checkpoint.PER_RANK_BATCH, checkpoint.OVERRIDDEN_ACCUM)
    got = {k: (a, b) for k, a, b in changes if k in keys}
    if got:
        shown = ", ".join(
            f"--grad-accum {a} replaced by {b}"
            if k == checkpoint.OVERRIDDEN_ACCUM
            else f"{k} {a} -> {b}"
            for k, (a, b) in got.items()
        )
        glob = cfg.data.batch_size * cfg.optim.grad_accum * world
        print(
            f"sparsekd: resumed at step {start} with {shown}; the global batch stays "
            f"{glob} sequences",
            file=sys.stderr,
        )


def _likely_cause(cfg: TrainConfig) -> str:
    return (
        f"likely a learning rate too high (--lr {cfg.optim.lr:g}) or a loss temperature too "
        f"small ({cfg.loss.temperature:g}); the last checkpoint is intact"
    )


def _check_diverged(record: dict, cfg: TrainConfig) -> None:
    """Stop a run whose logged loss or gradient norm is not finite (read at the logging
    step's synchronisation: a step itself stays free of host syncs)."""
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(record[k])]
    if bad:
        shown = ", ".join(f"{k} {record[k]}" for k in bad)
        raise RunError(
            f"training diverged at step {record['step']}: {shown} ({_likely_cause(cfg)})"
        )


def _bar(cfg: TrainConfig, start: int, rank: int):
    if not cfg.progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(
        total=cfg.steps,
        initial=start,
        desc="train-student",
        unit="step",
        file=sys.stderr,
        mininterval=1.0,
        dynamic_ncols=True,
    )
