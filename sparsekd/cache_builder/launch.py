"""Which worker of how many this build-cache process is, from its flags or its launcher.

`--num-workers/--worker-index` win. Without them the launcher's environment is read, in
this order:
- SLURM job array: SLURM_ARRAY_TASK_ID (minus SLURM_ARRAY_TASK_MIN) of
  SLURM_ARRAY_TASK_COUNT tasks (an array with a step other than 1 needs the flags);
- Kubernetes indexed Job: JOB_COMPLETION_INDEX, with the count from --num-workers (the
  Job's `completions`; Kubernetes does not export it);
- torchrun-style: RANK of WORLD_SIZE;
- otherwise worker 0 of 1.
No scheduler of our own: any launcher that can start W copies with an index works (the
README's Ray recipe maps tasks to indices the same way).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sparsekd.errors import ConfigError


@dataclass(frozen=True)
class Worker:
    index: int
    count: int
    source: str  # where index and count came from

    def owns(self, domain: int) -> bool:
        return domain % self.count == self.index


def _int(env, key: str) -> int:
    try:
        return int(env[key])
    except ValueError as e:
        raise ConfigError(f"environment variable {key}={env[key]!r} is not an integer") from e


def resolve_worker(num_workers: int | None, worker_index: int | None, env=None) -> Worker:
    env = os.environ if env is None else env
    if num_workers is not None and worker_index is not None:
        worker = Worker(worker_index, num_workers, "flags")
    elif "SLURM_ARRAY_TASK_ID" in env and worker_index is None:
        if env.get("SLURM_ARRAY_TASK_STEP", "1") != "1":
            raise ConfigError(
                "a SLURM array with a step other than 1: pass --num-workers and --worker-index"
            )
        index = _int(env, "SLURM_ARRAY_TASK_ID") - _int(
            {"m": env.get("SLURM_ARRAY_TASK_MIN", "0")}, "m"
        )
        if num_workers is None and "SLURM_ARRAY_TASK_COUNT" not in env:
            raise ConfigError(
                "SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT: pass --num-workers"
            )
        count = num_workers or _int(env, "SLURM_ARRAY_TASK_COUNT")
        worker = Worker(index, count, "SLURM_ARRAY_TASK_ID")
    elif "JOB_COMPLETION_INDEX" in env and worker_index is None:
        if num_workers is None:
            raise ConfigError(
                "JOB_COMPLETION_INDEX is set (a Kubernetes indexed Job): pass --num-workers "
                "with the Job's completions"
            )
        worker = Worker(_int(env, "JOB_COMPLETION_INDEX"), num_workers, "JOB_COMPLETION_INDEX")
    elif "RANK" in env and "WORLD_SIZE" in env and worker_index is None:
        worker = Worker(_int(env, "RANK"), num_workers or _int(env, "WORLD_SIZE"), "RANK")
    elif num_workers is not None or worker_index is not None:
        if num_workers is None or worker_index is None:
            raise ConfigError("pass both --num-workers and --worker-index, or neither")
        worker = Worker(worker_index, num_workers, "flags")
    else:
        worker = Worker(0, 1, "default")
    if worker.count < 1 or not 0 <= worker.index < worker.count:
        raise ConfigError(
            f"worker index {worker.index} is outside 0..{worker.count - 1} (from {worker.source})"
        )
    return worker
