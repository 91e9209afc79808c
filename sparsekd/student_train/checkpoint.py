"""Checkpoints and the run directory's rules for starting and resuming.

    out/train_config.json        the resolved config and identities of the run, and one
                                 entry per resume naming the safe settings it changed
    out/checkpoints/step-N/      model.pt optim.pt sched.pt (rank 0), rank-R.pt (reader
                                 position and RNG states of rank R), config.json, and DONE:
                                 written last, listing every file's size and sha256

Every file is fsynced before DONE is written, and the folder is renamed into place. On
`--resume`, the newest checkpoint whose files match its DONE is used; a damaged one is
reported and the one before it is taken. A run killed before its first checkpoint resumes
from step 0. A resume whose data or math settings differ from the run's is refused, naming
them; `RESUME_SAFE` settings may change and the change is recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from sparsekd.config import to_dict
from sparsekd.errors import RunError
from sparsekd.storage import (
    atomic_write_file,
    fsync_dir,
    json_bytes,
    read_json_file,
    sha256_file,
)
from sparsekd.student_train.config import RESUME_SAFE, TrainConfig
from sparsekd.student_train.parallel import Dist, full_state, load_full_state

RUN_CONFIG = "train_config.json"
CKPT_DIR = "checkpoints"


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


def plan_run(out: Path, cfg: TrainConfig, identities: dict) -> tuple[TrainConfig, dict, list]:
    """Decide how the run starts: (the config to use, the run record to write, changes).

    A new run fixes `optim.decay_steps` (default: steps). A resume must match the run's
    identities and every setting outside RESUME_SAFE; it keeps the run's decay_steps."""
    check_out(out)
    path = out / RUN_CONFIG
    if not path.exists():
        if out.exists() and any(out.iterdir()) and not cfg.checkpoint.resume:
            stray = sorted(p.name for p in out.iterdir())[0]
            raise RunError(f"--out {out} is not empty ({stray}) and holds no run")
        decay = cfg.optim.decay_steps or cfg.steps
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, decay_steps=decay))
        return cfg, {"config": to_dict(cfg), "identities": identities, "resumes": []}, []
    run = read_json_file(path, "run config")
    if not cfg.checkpoint.resume:
        raise RunError(f"--out {out} already holds a run; pass --resume to continue it")
    old = run["config"]
    if cfg.optim.decay_steps is None:
        decay = old["optim"]["decay_steps"]
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, decay_steps=decay))
    new_flat, old_flat = _flat(to_dict(cfg)), _flat(old)
    changed = sorted(k for k in set(new_flat) | set(old_flat) if new_flat.get(k) != old_flat.get(k))
    refused = [k for k in changed if k not in RESUME_SAFE]
    refused += [f"{k} (identity)" for k, v in identities.items() if run["identities"].get(k) != v]
    if refused:
        shown = ", ".join(refused[:6])
        raise RunError(
            f"--resume: these settings differ from the run in {out}: {shown}; only "
            "logging, evaluation, checkpointing, --steps and paths that name the same data "
            "may change"
        )
    changes = [[k, old_flat.get(k), new_flat.get(k)] for k in changed if k != "checkpoint.resume"]
    return cfg, run, changes


def write_run_record(out: Path, run: dict, start: int, changes: list) -> None:
    if changes:
        run = {**run, "resumes": [*run["resumes"], {"step": start, "changed": changes}]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_file(out / RUN_CONFIG, json_bytes(run))


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


def _save(obj, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def save(out: Path, step: int, d: Dist, model, opt, sched, reader, run: dict) -> None:
    """A checkpoint of every rank's state (a collective: call on all ranks)."""
    root = out / CKPT_DIR
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if d.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    d.barrier()
    _save({"reader": reader.state_dict(), "rng": rng_state()}, tmp / f"rank-{d.rank}.pt")
    model_sd, optim_sd = full_state(model, opt)  # collective under FSDP2
    if d.rank == 0:
        _save(model_sd, tmp / "model.pt")
        _save(optim_sd, tmp / "optim.pt")
        _save(sched.state_dict(), tmp / "sched.pt")
        atomic_write_file(tmp / "config.json", json_bytes(run))
    d.barrier()
    if d.rank == 0:
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.iterdir())
        }
        atomic_write_file(tmp / "DONE", json_bytes({"step": step, "files": files}))
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


def latest_intact(out: Path) -> Path | None:
    """The newest checkpoint whose files match its DONE; damaged ones are reported."""
    found = [p.parent for p in (out / CKPT_DIR).glob("step-*/DONE")]
    for ckpt in sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        problem = intact(ckpt)
        if problem is None:
            return ckpt
        print(
            f"sparsekd: warning: checkpoint {ckpt} is damaged ({problem}); trying an earlier one",
            file=sys.stderr,
        )
    return None


def load(ckpt: Path, d: Dist, model, opt, sched, reader) -> int:
    """Restore every piece of state; return the step to continue from."""
    model_sd = torch.load(ckpt / "model.pt", map_location="cpu")
    optim_sd = torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=False)
    load_full_state(model, opt, model_sd, optim_sd)
    sched.load_state_dict(torch.load(ckpt / "sched.pt"))
    rs = torch.load(ckpt / f"rank-{d.rank}.pt", weights_only=False)
    reader.load_state_dict(rs["reader"])
    set_rng_state(rs["rng"])
    return int(ckpt.name.split("-")[1])
