"""Which worker a build-cache process is: flags first, then SLURM arrays, Kubernetes
indexed Jobs and torchrun-style ranks, with one-line errors for what cannot be served."""

import pytest

from sparsekd.cache_builder.launch import resolve_worker
from sparsekd.errors import ConfigError


@pytest.mark.parametrize(
    "flags, env, want",
    [
        ((None, None), {}, (0, 1, "default")),
        ((4, 2), {"SLURM_ARRAY_TASK_ID": "9"}, (2, 4, "flags")),
        (
            (None, None),
            {
                "SLURM_ARRAY_TASK_ID": "13",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_COUNT": "8",
            },
            (3, 8, "SLURM_ARRAY_TASK_ID"),
        ),
        (
            (None, None),
            {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"},
            (3, 8, "SLURM_ARRAY_TASK_ID"),
        ),
        ((16, None), {"JOB_COMPLETION_INDEX": "5"}, (5, 16, "JOB_COMPLETION_INDEX")),
        ((None, None), {"RANK": "1", "WORLD_SIZE": "4"}, (1, 4, "RANK")),
    ],
)
def test_worker_from_flags_or_launcher(flags, env, want):
    w = resolve_worker(*flags, env=env)
    assert (w.index, w.count, w.source) == want
    assert w.owns(w.index) and not w.owns(w.index + 1) or w.count == 1


@pytest.mark.parametrize(
    "flags, env, match",
    [
        (
            (None, None),
            {"JOB_COMPLETION_INDEX": "5"},
            "pass --num-workers with the Job's completions",
        ),
        (
            (None, None),
            {
                "SLURM_ARRAY_TASK_ID": "2",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            "step other than 1",
        ),
        (
            (None, None),
            {"RANK": "4", "WORLD_SIZE": "4"},
            r"worker index 4 is outside 0..3 \(from RANK\)",
        ),
        ((4, None), {}, "pass both --num-workers and --worker-index"),
        (
            (None, None),
            {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"},
            "SLURM_ARRAY_TASK_ID='x' is not an integer",
        ),
        (
            (None, None),
            {"SLURM_ARRAY_TASK_ID": "3"},
            "SLURM_ARRAY_TASK_ID is set without SLURM_ARRAY_TASK_COUNT: pass --num-workers",
        ),
    ],
)
def test_launcher_settings_that_cannot_be_served(flags, env, match):
    with pytest.raises(ConfigError, match=match):
        resolve_worker(*flags, env=env)
