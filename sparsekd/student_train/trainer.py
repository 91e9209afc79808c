"""`train-student`: stream a cache, distil into a student, evaluate, checkpoint, resume.

Loss per step: (1 - A) CE + A KD through `sparse_kl_loss` on the student's final hidden
states and LM head (`--loss ce` sets A = 0). AdamW, linear warm-up then cosine decay to 10 %,
gradient clipping, gradient accumulation; bf16 autocast on GPU, float32 on CPU.

Distributed: under `torchrun` (WORLD_SIZE set) the process group is NCCL on GPU and gloo on
CPU; the model is wrapped in DDP, or sharded with FSDP2 (`fully_shard`) with `--fsdp`;
each rank reads its own row groups of the cache.

Output directory:
    metrics.jsonl                  one JSON object per step (and per evaluation)
    data/rank-R.txt                per step, the seq_ids rank R trained on
    checkpoints/step-N/            model.pt, optim.pt, sched.pt, rank-R.pt (reader + RNG),
                                   DONE (written last: a checkpoint without it is ignored)
    final/                         save_pretrained folder + tokenizer
    train_config.json              the resolved configuration
`--resume` continues from the newest complete checkpoint; on CPU the result is bitwise the
same as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from sparsekd.kernels.reference import DIVERGENCES
from sparsekd.schemas import format as F

LOSSES = ("ce", *DIVERGENCES)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    cache: str
    teacher_cache: str | None = None  # KD targets for --cache's sequences (a refined set)
    student: str
    out: str
    steps: int
    loss: str = "fkl"
    kd_weight: float = 0.9
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    shuffle_buffer: int = 256
    eval_cache: str | None = None
    eval_every: int = 0
    eval_sequences: int = 64
    save_every: int = 0
    log_every: int = 1
    resume: bool = False
    fsdp: bool = False
    backend: str = "auto"
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.eval_every and not self.eval_cache:
            raise ValueError("--eval-every needs --eval-cache")


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / max(cfg.warmup, 1)
        progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def _dist_init():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return rank, world


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None:
        torch.cuda.set_rng_state_all(s["cuda"])


def latest_checkpoint(out: Path) -> Path | None:
    done = [p.parent for p in (out / "checkpoints").glob("step-*/DONE")]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def run(cfg: TrainConfig) -> dict:
    """Train; returns the final metrics record."""
    from sparsekd.schemas.cache import open_cache
    from sparsekd.student_train.evaluate import evaluate
    from sparsekd.student_train.model import (
        DistillModule,
        check_compatible,
        load_student,
        save_final,
    )
    from sparsekd.student_train.reader import CacheReader

    rank, world = _dist_init()
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    )
    out = Path(cfg.out)
    cache, keep = _training_data(cfg)
    eval_cache = open_cache(cfg.eval_cache) if cfg.eval_cache else None
    model, tok = load_student(cfg.student)
    check_compatible(model, tok, cache.meta)
    if eval_cache is not None:
        check_compatible(model, tok, eval_cache.meta)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if not cfg.resume and (out / "metrics.jsonl").exists():
        raise ValueError(f"--out {out} already holds a run; pass --resume to continue it")
    if cfg.resume and ckpt is None and (out / "metrics.jsonl").exists():
        raise ValueError(f"--resume: {out} has no complete checkpoint to resume from")
    if world > 1:
        # every rank has read --out before rank 0 writes to it; otherwise a slower rank sees
        # rank 0's fresh metrics.jsonl and refuses the run as an existing one
        dist.barrier()

    torch.manual_seed(cfg.seed)
    model.to(device)
    kd_weight = 0.0 if cfg.loss == "ce" else cfg.kd_weight
    module = DistillModule(
        model,
        divergence="fkl" if cfg.loss == "ce" else cfg.loss,
        kd_weight=kd_weight,
        backend=cfg.backend,
    )
    if world > 1:
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.get_decoder().layers:
                fully_shard(layer)
            fully_shard(module)
            wrapped = module
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        wrapped = module
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    reader = CacheReader(
        cache,
        batch_size=cfg.batch_size,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        shuffle_buffer=cfg.shuffle_buffer,
        keep=keep,
    )
    start = 0
    if ckpt is not None:
        _load_full_state(module.model, opt, ckpt, device)
        sched.load_state_dict(torch.load(ckpt / "sched.pt"))
        rs = torch.load(ckpt / f"rank-{rank}.pt", weights_only=False)
        reader.load_state_dict(rs["reader"])
        _set_rng_state(rs["rng"])
        start = int(ckpt.name.split("-")[1])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(
            json.dumps({k: v for k, v in cfg.__dict__.items()}, indent=1, default=str) + "\n"
        )
        _truncate_metrics(out / "metrics.jsonl", start)
    log = _Logger(out, rank, cfg)
    # which sequences each rank trained on, per step: an audit trail of the data order
    (out / "data").mkdir(parents=True, exist_ok=True)
    _truncate_lines(out / "data" / f"rank-{rank}.txt", start)
    data_log = open(out / "data" / f"rank-{rank}.txt", "a")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cache.meta["seq_len"] * world
    bar = _bar(cfg, start, rank)
    record = {}
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        loss_sum = kd_sum = ce_sum = 0.0
        seen = []
        for micro in range(cfg.grad_accum):
            b = next(reader)
            seen.extend(b.seq_ids.tolist())
            tensors = [
                torch.from_numpy(a).to(device, non_blocking=True)
                for a in (b.input_ids, b.labels, b.ids, b.probs)
            ]
            sync = micro == cfg.grad_accum - 1 or not hasattr(wrapped, "no_sync")
            ctx = _null() if sync else wrapped.no_sync()
            with ctx, autocast:
                loss, kd, ce = wrapped(*tensors)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            kd_sum += kd.item() / cfg.grad_accum
            ce_sum += ce.item() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
        lr = opt.param_groups[0]["lr"]  # the rate this step used
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        record = {
            "step": step + 1,
            "loss": loss_sum,
            "ce": ce_sum,
            "kd": kd_sum,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_step / dt,
        }
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.write(record)
        data_log.write(f"{step + 1} {' '.join(map(str, seen))}\n")
        data_log.flush()  # a killed run must leave complete lines up to its checkpoint
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if eval_cache is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
            if rank == 0:
                ev = evaluate(module.model, eval_cache, max_sequences=cfg.eval_sequences)
                log.write({"step": step + 1, "eval": ev})
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            _save_checkpoint(out, step + 1, module, opt, sched, reader, rank, world)
    if bar is not None:
        bar.close()
    data_log.close()
    model_sd, _ = _full_state(module.model, None)  # a collective under FSDP: every rank
    if rank == 0:
        sharded = world > 1 and cfg.fsdp
        save_final(_unsharded(cfg, model_sd) if sharded else module.model, tok, out / "final")
    log.close()
    if world > 1:
        dist.barrier()
    return record


def _training_data(cfg: TrainConfig):
    """The cache to stream and the seq_ids to keep from it (None: all).

    With --teacher-cache, the sequences of --cache (typically a refined set) are read from
    the teacher cache, whose sparse targets they then carry.
    """
    from sparsekd.schemas.cache import check_same_sequences, open_cache

    cache = open_cache(cfg.cache)
    keep = None
    if cfg.teacher_cache:
        targets = open_cache(cfg.teacher_cache)
        if "refined" in targets.meta:
            raise ValueError(f"--teacher-cache {targets.path} is a refined set, not a full cache")
        check_same_sequences(cache, targets, "--cache and --teacher-cache")
        keep = frozenset(
            int(i)
            for entry in cache.shards
            for i in pq.read_table(cache.shard_path(entry), columns=[F.COL_SEQ_ID])
            .column(0)
            .to_pylist()
        )
        cache = targets
    if cfg.loss != "ce" and cache.meta["mode"] == "logprob":
        raise ValueError(
            f"--loss {cfg.loss} needs teacher targets, and {cache.path} stores token log-probs "
            "only (mode logprob): use --loss ce, or add --teacher-cache with a top-K or sample "
            "cache of the same corpus"
        )
    return cache, keep


def _save_checkpoint(out, step, module, opt, sched, reader, rank, world):
    final = out / "checkpoints" / f"step-{step}"
    tmp = out / "checkpoints" / f".step-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    torch.save({"reader": reader.state_dict(), "rng": _rng_state()}, tmp / f"rank-{rank}.pt")
    model_sd, optim_sd = _full_state(module.model, opt)  # collective under FSDP
    if rank == 0:
        torch.save(model_sd, tmp / "model.pt")
        torch.save(optim_sd, tmp / "optim.pt")
        torch.save(sched.state_dict(), tmp / "sched.pt")
    if world > 1:
        dist.barrier()
    if rank == 0:
        (tmp / "DONE").write_text(f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)


def _full_state(model, opt):
    """Full (unsharded) model and optimizer state dicts; plain state dicts without FSDP."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=o)
    osd = get_optimizer_state_dict(model, opt, options=o) if opt is not None else None
    return msd, osd


def _load_full_state(model, opt, ckpt: Path, device) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, torch.load(ckpt / "model.pt", map_location="cpu"), options=o)
    set_optimizer_state_dict(
        model, opt, torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=False), options=o
    )


def _unsharded(cfg: TrainConfig, state_dict):
    """A plain copy of the student holding `state_dict` (for saving after FSDP)."""
    from sparsekd.student_train.model import load_student

    model, _ = load_student(cfg.student)
    model.load_state_dict(state_dict)
    return model


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume from step N, drop records logged after N by the run that was killed."""
    if path.exists():
        keep = [
            ln
            for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln)["step"] <= step
        ]
        path.write_text("".join(ln + "\n" for ln in keep))


def _truncate_lines(path: Path, step: int) -> None:
    """The same for the per-rank data log ("STEP id id ..." lines)."""
    if path.exists():
        keep = [
            ln for ln in path.read_text().splitlines() if ln.strip() and int(ln.split()[0]) <= step
        ]
        path.write_text("".join(ln + "\n" for ln in keep))


class _Logger:
    def __init__(self, out: Path, rank: int, cfg: TrainConfig):
        self.rank = rank
        self.fh = open(out / "metrics.jsonl", "a") if rank == 0 else None
        self.tb = None
        if rank == 0 and cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard not installed: metrics.jsonl only
                self.tb = None

    def write(self, rec: dict) -> None:
        if self.fh is None:
            return
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in (rec.get("eval") or rec).items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(("eval/" if "eval" in rec else "train/") + k, v, rec["step"])

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


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
