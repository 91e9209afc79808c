"""Checkpoints and the run directory's rules for starting and resuming.

    out/train_config.json        the resolved config and identities of the run, and one
                                 entry per resume naming the safe settings it changed
    out/checkpoints/step-N/      state/ (model and optimizer, torch.distributed.checkpoint:
                                 each rank writes its own part, nothing is gathered),
                                 sched.pt [loss_schedule.pt] config.json (rank 0), rank-R.pt
                                 (reader position and RNG states of rank R), and DONE:
                                 written last, listing every file's size and sha256 (each
                                 rank hashes the files it wrote)

Every file is fsynced before DONE is written, and the folder is renamed into place.
Checkpoints of earlier versions (model.pt and optim.pt, gathered on rank 0) still load. On
`--resume`, the newest checkpoint whose files match its DONE is used; a damaged one is
reported and the one before it is taken. A run killed before its first checkpoint resumes
from step 0. A resume whose data or math settings differ from the run's is refused, naming
them; `RESUME_SAFE` settings may change and the change is recorded.

A run may resume on another number of ranks: the model and optimizer state reshard on load
(torch.distributed.checkpoint), the data position is every saved rank's together (a carry
pass reads what they had left of their epochs, `reader.CacheReader.load_state_dicts`), and
the global batch is kept, by gradient accumulation when needed (`_keep_global_batch`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from sparsekd.config import to_dict
from sparsekd.errors import RunError, StorageError
from sparsekd.storage import (
    atomic_write_file,
    fsync_dir,
    json_bytes,
    read_json_file,
    sha256_file,
    write_error,
)
from sparsekd.student_train.config import RESUME_SAFE, TrainConfig
from sparsekd.student_train.parallel import (
    Dist,
    load_full_state,
    load_sharded,
    save_sharded,
    wait_sharded,
)

RUN_CONFIG = "train_config.json"
CKPT_DIR = "checkpoints"
LOCK = ".lock"
PARAM_FILE = "loss_schedule.pt"  # the divergence parameter's schedule state (schedules.py)


class RunLock:
    """One train-student run at a time per --out: an exclusive lock on `out/.lock`, held for
    the run's life and released by the OS when the process ends, killed or not (so a killed
    run never leaves it stuck). Local file systems only: on NFS, locks may not be shared."""

    def __init__(self, out: Path):
        import fcntl
        import socket

        out.mkdir(parents=True, exist_ok=True)
        self.fh = open(out / LOCK, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise RunError(
                f"--out {out} is in use by another train-student run ({holder}); wait for it, "
                "or use another --out"
            ) from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.fh.flush()

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()  # closing drops the lock
            self.fh = None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def student_identity(path: str) -> str:
    """sha256 of the student's config.json: its architecture (weights come from the run)."""
    return hashlib.sha256((Path(path) / "config.json").read_bytes()).hexdigest()


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a directory")
    for parent in [out.resolve(), *out.resolve().parents]:
        if (parent / "manifest.json").is_file() or (parent / "records").is_dir():
            raise RunError(f"--out {out} is inside the cache folder {parent}; choose another")


RUN_KEYS = ("config", "identities", "resumes")


def _run_record(path: Path) -> dict:
    """A run record read back (train_config.json, or a checkpoint's config.json), checked."""
    run = read_json_file(path, "run config", RunError)
    missing = [k for k in RUN_KEYS if not isinstance(run.get(k), dict | list)]
    if missing or not isinstance(run["config"].get("optim"), dict):
        raise RunError(f"run record {path} is damaged (no {(missing or ['config.optim'])[0]!r})")
    return run


def plan_run(out: Path, cfg: TrainConfig, identities: dict) -> tuple[TrainConfig, dict, list]:
    """Decide how the run starts: (the config to use, the run record to write, changes).

    A new run fixes `optim.decay_steps` (default: steps). A resume must match the run's
    identities and every setting outside RESUME_SAFE (against train_config.json, or, when
    that is gone, the newest checkpoint's copy of it); it keeps the run's decay_steps. A
    finished run is not rewritten by a resume that would end before its last step."""
    check_out(out)
    path = out / RUN_CONFIG
    if not path.exists():
        ckpt = latest_intact(out) if cfg.checkpoint.resume and out.is_dir() else None
        if ckpt is not None:  # the record is gone: each checkpoint carries a copy
            path = ckpt / "config.json"
    if not path.exists():
        entries = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.exists() else []
        if entries and not cfg.checkpoint.resume:
            raise RunError(f"--out {out} is not empty ({entries[0]}) and holds no run")
        cfg = _fix_horizons(cfg, {"optim": {"decay_steps": cfg.steps}, "loss": {}})
        return cfg, {"config": to_dict(cfg), "identities": identities, "resumes": []}, []
    run = _run_record(path)
    if not cfg.checkpoint.resume:
        raise RunError(f"--out {out} already holds a run; pass --resume to continue it")
    old = run["config"]
    cfg = _fix_horizons(cfg, old)
    world = identities.get("world_size", 1)
    old_world = run["identities"].get("world_size", world)
    given_accum = cfg.optim.grad_accum
    cfg = _keep_global_batch(cfg, old, old_world, world)
    new_flat, old_flat = _flat(to_dict(cfg)), _flat(old)
    changed = sorted(k for k in set(new_flat) | set(old_flat) if new_flat.get(k) != old_flat.get(k))
    refused = _differences({"config": to_dict(cfg), "identities": identities}, run)
    if refused:
        shown = ", ".join(refused[:6])
        raise RunError(
            f"--resume: these settings differ from the run in {out}: {shown}; only "
            "logging, evaluation, checkpointing, --steps and paths that name the same data "
            "may change"
        )
    finished = run.get("finished")
    if finished is not None and cfg.steps < finished:  # == finished: nothing left to do
        raise RunError(
            f"the run in {out} finished at step {finished}; --resume with --steps {cfg.steps} "
            f"would not continue it (and would rewrite what it wrote): pass --steps above "
            f"{finished} to train further"
        )
    changes = [[k, old_flat.get(k), new_flat.get(k)] for k in changed if k != "checkpoint.resume"]
    if old_world != world:  # against the run's first, as every change
        changes.append(["world_size", old_world, world])
    if cfg.optim.grad_accum != given_accum:  # the value given (or its default) overridden
        changes.append([OVERRIDDEN_ACCUM, given_accum, cfg.optim.grad_accum])
    return cfg, run, changes


PER_RANK_BATCH = ("data.batch_size", "optim.grad_accum")  # free when the global batch stays
# a resume's record of --grad-accum replaced to keep the global batch: [key, given, used]
OVERRIDDEN_ACCUM = "optim.grad_accum (given, replaced)"


def _differences(run: dict, other: dict) -> list[str]:
    """What makes two run records two runs: a setting outside RESUME_SAFE and the per-rank
    batch split, or an identity (the cache's fingerprint, the student's, ...)."""
    a, b = _flat(run["config"]), _flat(other["config"])
    free = RESUME_SAFE + PER_RANK_BATCH
    keys = sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))
    ids, theirs = run["identities"], other["identities"]
    keys += [f"{k} (identity)" for k in sorted(set(ids) | set(theirs))
             if k != "world_size" and ids.get(k) != theirs.get(k)]  # fmt: skip
    return keys


def check_belongs(ckpt: Path, run: dict) -> None:
    """The checkpoint a resume loads is one of this run's: its copy of the run record (every
    checkpoint carries one) has the run's identities and the settings that shape the
    weights. A checkpoint copied in from another run is refused, naming what differs."""
    differ = _differences(run, _run_record(ckpt / "config.json"))
    if differ:
        raise RunError(
            f"--resume: checkpoint {ckpt} belongs to another run ({', '.join(differ[:6])} "
            f"differ from the run's record, {RUN_CONFIG}); remove it, or resume that run in "
            "its own --out"
        )


def _keep_global_batch(cfg: TrainConfig, old: dict, old_world: int, world: int) -> TrainConfig:
    """A resumed run keeps its global batch (sequences per optimizer step) on any number
    of ranks: the per-rank split (`PER_RANK_BATCH`) is free, and when the one given does
    not keep it, the gradient accumulation is set to (the resume prints so). A global batch
    no accumulation can keep is refused: it would change the optimisation under way."""
    per = old["data"]["batch_size"] * old["optim"]["grad_accum"]
    glob = per * old_world
    if cfg.data.batch_size * cfg.optim.grad_accum * world == glob:
        return cfg
    accum, left = divmod(glob, cfg.data.batch_size * world)
    if left or not accum:
        raise RunError(
            f"--resume on {world} ranks: the run's global batch is {glob} sequences "
            f"({old_world} ranks x {per}), which --batch-size {cfg.data.batch_size} cannot "
            f"keep on {world} ranks; pass a --batch-size that divides {glob // world}"
            if glob % world == 0
            else f"--resume on {world} ranks: the run's global batch of {glob} sequences "
            f"({old_world} ranks x {per}) does not divide over {world} ranks"
        )
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum=accum))


def _fix_horizons(cfg: TrainConfig, given: dict) -> TrainConfig:
    """Fill the schedules' lengths left unset (optim.decay_steps, and loss.schedule_steps of
    a moving parameter schedule) from `given`: --steps for a new run, the run's own on a
    resume (a longer --steps does not stretch a schedule already under way)."""
    optim, loss = cfg.optim, cfg.loss
    if optim.decay_steps is None:
        optim = dataclasses.replace(optim, decay_steps=given["optim"].get("decay_steps"))
    moving = loss.param is not None and loss.schedule_kind != "constant"
    if moving and loss.schedule_steps is None:
        steps = given["loss"].get("schedule_steps", cfg.steps)
        loss = dataclasses.replace(loss, schedule_steps=steps)
    return dataclasses.replace(cfg, optim=optim, loss=loss)


def write_run_record(out: Path, run: dict, start: int, changes: list) -> dict:
    run = {k: v for k, v in run.items() if k != "finished"}  # it continues
    if changes:
        run = {**run, "resumes": [*run["resumes"], {"step": start, "changed": changes}]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_file(out / RUN_CONFIG, json_bytes(run))
    return run


def mark_finished(out: Path, run: dict, step: int) -> None:
    """The run ended at `step` with its final model written: a later --resume must go on
    from there, never rewrite it with less."""
    atomic_write_file(out / RUN_CONFIG, json_bytes({**run, "finished": step}))


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None:
        torch.cuda.set_rng_state_all(s["cuda"])


STATE_DIR = "state"  # torch.distributed.checkpoint's folder inside a checkpoint


def _hashes(root: Path, paths: list[Path]) -> dict:
    return {
        str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in paths
    }


def _save(obj, path: Path) -> None:
    """Serialised in memory, then written by Python, so that a disk that refuses the write
    (full, a size limit) is named by its errno, not in torch's words."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        with open(path, "wb") as fh:
            fh.write(buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        why = write_error(e) or e.strerror
        raise StorageError(f"cannot write the checkpoint file {path}: {why}") from e


def save(
    out: Path, step: int, d: Dist, model, opt, sched, reader, run: dict, param=None,
    background: bool = False,
) -> PendingSave | None:  # fmt: skip
    """A checkpoint of every rank's state (a collective: call on all ranks).

    `background`: model and optimizer state are copied to host memory and written by a
    thread while training goes on; the returned `PendingSave` is published (DONE) later,
    by `publish()` on every rank. Until then the checkpoint does not exist for a resume."""
    root = out / CKPT_DIR
    tmp = root / f".step-{step}.tmp"
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    _save({"reader": reader.state_dict(), "rng": rng_state()}, tmp / f"rank-{d.rank}.pt")
    with _named(tmp / STATE_DIR):  # collective: each rank writes its part
        future = save_sharded(tmp / STATE_DIR, model, opt, background=background)
    if d.rank == 0:
        _save(sched.state_dict(), tmp / "sched.pt")
        if param is not None:  # the divergence parameter's schedule (the same on every rank)
            _save(param.state_dict(), tmp / PARAM_FILE)
        atomic_write_file(tmp / "config.json", json_bytes(run))
    pending = PendingSave(step, root, tmp, d, param is not None, future)
    if future is None:
        pending.publish()
        return None
    return pending


@contextlib.contextmanager
def _named(path: Path):
    try:
        yield
    except OSError as e:
        why = write_error(e) or e.strerror
        raise StorageError(f"cannot write the checkpoint {path}: {why}") from e


@dataclasses.dataclass
class PendingSave:
    """A checkpoint folder being written (`.step-N.tmp`); `publish` makes it `step-N`."""

    step: int
    root: Path
    tmp: Path
    d: Dist
    has_param: bool
    future: object | None  # the background write of state/, None once it has ended

    def written_here(self) -> bool:
        return self.future is None or self.future.done()

    def publish(self) -> None:
        """Wait for this rank's write, hash what it wrote, and (rank 0, once every rank
        has) write DONE and rename the folder into place. A collective."""
        d, tmp, root = self.d, self.tmp, self.root
        if self.future is not None:
            with _named(tmp / STATE_DIR):
                wait_sharded(self.future)
            self.future = None
        # each rank hashes what it wrote (its state files and its own rank file): the cost
        # of the checksums is each rank's share too
        mine = [tmp / f"rank-{d.rank}.pt", *sorted((tmp / STATE_DIR).glob(f"__{d.rank}_*"))]
        if d.rank == 0:
            mine += [tmp / "config.json", tmp / "sched.pt"]
            mine += [tmp / PARAM_FILE] if self.has_param else []
            mine += [p for p in sorted((tmp / STATE_DIR).iterdir()) if not p.name.startswith("__")]
        atomic_write_file(tmp / f"hashes-{d.rank}.json", json_bytes(_hashes(tmp, mine)))
        d.barrier()
        if d.rank == 0:
            files = {}
            for r in range(d.world):
                files.update(read_json_file(tmp / f"hashes-{r}.json", "checkpoint hashes"))
                (tmp / f"hashes-{r}.json").unlink()  # merged into DONE
            fsync_dir(tmp / STATE_DIR)
            done = {"step": self.step, "files": dict(sorted(files.items()))}
            atomic_write_file(tmp / "DONE", json_bytes(done))
            final = root / f"step-{self.step}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_dir(root)
        d.barrier()


def intact(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint folder (None when its files match DONE)."""
    try:
        done = read_json_file(ckpt / "DONE", "checkpoint DONE")
    except Exception as e:
        return str(e)
    for name, want in done.get("files", {}).items():
        p = ckpt / name
        if not p.exists():
            return f"{name} is missing"
        if p.stat().st_size != want["bytes"] or sha256_file(p) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None if done.get("files") else "DONE lists no files"


def _steps(out: Path) -> list[tuple[int, Path]]:
    """The checkpoint folders (`step-N`), newest first; anything else there is named."""
    root = out / CKPT_DIR
    found = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.name.startswith("."):  # a save in progress, or a killed one (`.step-N.tmp`)
            continue
        step = p.name.removeprefix("step-")
        if not (p.is_dir() and p.name.startswith("step-") and step.isdigit()):
            raise RunError(f"{p} is not a checkpoint of this run (step-<number>): move it away")
        found.append((int(step), p))
    return sorted(found, reverse=True)


def latest_intact(out: Path) -> Path | None:
    """The newest checkpoint whose files match its DONE; damaged ones are reported."""
    for _, ckpt in _steps(out):
        problem = intact(ckpt)
        if problem is None:
            return ckpt
        print(
            f"sparsekd: warning: checkpoint {ckpt} is damaged ({problem}); trying an earlier one",
            file=sys.stderr,
        )
    return None


def load(ckpt: Path, d: Dist, model, opt, sched, reader, param=None) -> int:
    """Restore every piece of state; return the step to continue from."""
    if (ckpt / STATE_DIR).is_dir():
        load_sharded(ckpt / STATE_DIR, model, opt)  # collective
    else:  # a checkpoint of an earlier version: full state dicts written by rank 0
        model_sd = torch.load(ckpt / "model.pt", map_location="cpu")
        optim_sd = torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=False)
        load_full_state(model, opt, model_sd, optim_sd)
    sched.load_state_dict(torch.load(ckpt / "sched.pt"))
    if param is not None and (ckpt / PARAM_FILE).exists():
        param.load_state_dict(torch.load(ckpt / PARAM_FILE, weights_only=False))
    elif param is not None and param.kind != "constant":  # saved before schedules existed
        raise RunError(f"checkpoint {ckpt} holds no state of loss.schedule {param.kind}")
    saved = len(list(ckpt.glob("rank-*.pt")))  # the number of ranks that wrote it
    ranks = range(saved) if saved != d.world else [d.rank]
    states = {r: torch.load(ckpt / f"rank-{r}.pt", weights_only=False) for r in ranks}
    if saved == d.world:
        reader.load_state_dict(states[d.rank]["reader"])
    else:  # resharded: the data position is the saved ranks' together (reader.py)
        reader.load_state_dicts([states[r]["reader"] for r in ranks])
    if d.rank in states:  # a rank the saved run did not have keeps its seeded state
        set_rng_state(states[d.rank]["rng"])
    return int(ckpt.name.removeprefix("step-"))
