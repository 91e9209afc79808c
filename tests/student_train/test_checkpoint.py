"""The run directory's rules: a resume must match the run's data and math (and names what
differs), safe settings may change and are recorded, a damaged newest checkpoint falls
back to the one before, a run killed before its first checkpoint resumes from step 0, and
--out is never a file or inside a cache."""

import json
import shutil

import pytest

from sparsekd.config import build
from sparsekd.errors import ConfigError, RunError
from sparsekd.student_train import trainer as T
from sparsekd.student_train.checkpoint import intact, latest_intact
from sparsekd.student_train.config import TrainConfig
from tests.helpers import error_line, run_cli


def _cfg(cache, student, out, **over):
    base = {
        "student": str(student),
        "out": str(out),
        "steps": 4,
        "data": {"cache": str(cache), "batch_size": 2},
        "optim": {"lr": 3e-3, "warmup": 1},
        "checkpoint": {"every": 2},
        "progress": False,
        "tensorboard": False,
    }
    for key, value in over.items():
        node = base
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return build(TrainConfig, base)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, hf_topk_cache, tiny_student):
    out = tmp_path_factory.mktemp("runs") / "run"
    T.run(_cfg(hf_topk_cache, tiny_student, out))
    return out


@pytest.mark.parametrize(
    "change, named",
    [
        ({"loss.kind": "ce"}, "loss.kind"),
        ({"loss.kd_weight": 0.5}, "loss.kd_weight"),
        ({"data.batch_size": 3}, "data.batch_size"),
        ({"optim.lr": 1e-2}, "optim.lr"),
        ({"seed": 1}, "seed"),
    ],
)
def test_resume_with_changed_data_or_math_is_refused_by_name(
    tmp_path, finished, hf_topk_cache, tiny_student, change, named
):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    record = (out / "train_config.json").read_text()
    with pytest.raises(RunError, match=f"settings differ from the run .*{named}"):
        T.run(_cfg(hf_topk_cache, tiny_student, out, **{"checkpoint.resume": True, **change}))
    assert (out / "train_config.json").read_text() == record  # the run's record is untouched


def test_resume_on_another_cache_or_student_is_refused(
    tmp_path, finished, hf_topk_cache, vllm_topk_cache, tiny_student, smollm2_dir
):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    with pytest.raises(RunError, match=r"cache \(identity\)"):
        T.run(_cfg(vllm_topk_cache, tiny_student, out, **{"checkpoint.resume": True}))
    other = tmp_path / "wider"
    run_cli(
        "init-student",
        "--like",
        smollm2_dir,
        "--layers",
        "2",
        "--hidden",
        "96",
        "--heads",
        "3",
        "--out",
        other,
        check=True,
    )
    with pytest.raises(RunError, match=r"student \(identity\)"):
        T.run(_cfg(hf_topk_cache, other, out, **{"checkpoint.resume": True}))


def test_safe_changes_are_allowed_and_recorded(tmp_path, finished, hf_topk_cache, tiny_student):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    moved = tmp_path / "moved-student"
    shutil.copytree(tiny_student, moved)  # the same student under another path
    T.run(_cfg(hf_topk_cache, moved, out, steps=6, **{"checkpoint.resume": True, "log_every": 2}))
    run = json.loads((out / "train_config.json").read_text())
    assert run["config"]["steps"] == 4 and run["config"]["optim"]["decay_steps"] == 4
    changed = {k for k, _, _ in run["resumes"][0]["changed"]}
    assert run["resumes"][0]["step"] == 2 and {"steps", "log_every", "student"} <= changed
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 4, 6]  # resumed at 2 (the last checkpoint before 4), logged every 2


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(
    tmp_path, hf_topk_cache, tiny_student, capsys
):
    out = tmp_path / "run"
    T.run(_cfg(hf_topk_cache, tiny_student, out, steps=6))
    model = out / "checkpoints" / "step-4" / "model.pt"
    model.write_bytes(model.read_bytes()[:100])  # truncated, DONE still there
    assert "does not match its checksum" in intact(out / "checkpoints" / "step-4")
    assert latest_intact(out).name == "step-2"
    assert "checkpoint" in capsys.readouterr().err
    shutil.rmtree(out / "final")
    T.run(_cfg(hf_topk_cache, tiny_student, out, steps=6, **{"checkpoint.resume": True}))
    assert json.loads((out / "train_config.json").read_text())["resumes"] == []


def test_a_run_killed_before_its_first_checkpoint_resumes_from_zero(
    tmp_path, hf_topk_cache, tiny_student
):
    out = tmp_path / "run"
    cfg = _cfg(hf_topk_cache, tiny_student, out, **{"checkpoint.every": 0})
    T.run(cfg)
    reference = (out / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(out / "final")  # as if killed at the end: metrics and config, no checkpoint
    proc = run_cli(
        "train-student",
        "--cache",
        hf_topk_cache,
        "--student",
        tiny_student,
        "--out",
        out,
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--lr",
        "3e-3",
        "--warmup",
        "1",
        "--quiet",
    )
    assert proc.returncode == 2 and "already holds a run; pass --resume" in error_line(proc)
    T.run(
        _cfg(hf_topk_cache, tiny_student, out, **{"checkpoint.every": 0, "checkpoint.resume": True})
    )
    assert (out / "final" / "model.safetensors").read_bytes() == reference


def test_out_that_is_a_file_or_inside_a_cache_is_refused(tmp_path, hf_topk_cache, tiny_student):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="is a file"):
        T.run(_cfg(hf_topk_cache, tiny_student, tmp_path / "file"))
    with pytest.raises(RunError, match="inside the cache folder"):
        T.run(_cfg(hf_topk_cache, tiny_student, hf_topk_cache / "runs" / "a"))
    assert not (hf_topk_cache / "runs").exists()


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--set", "log_every=0", "log_every must be >= 1"),
        ("--save-every", "-1", "checkpoint.every must be >= 0"),
        ("--steps", "0", "steps must be >= 1"),
        ("--set", "steps=abc", "steps must be an integer, got 'abc'"),
        ("--kd-weight", "1.5", "loss.kd_weight must be in"),
    ],
)
def test_nonsense_settings_are_refused_in_one_line(
    tmp_path, hf_topk_cache, tiny_student, flag, value, match
):
    args = [
        "train-student",
        "--cache",
        hf_topk_cache,
        "--student",
        tiny_student,
        "--out",
        tmp_path / "o",
        "--steps",
        "2",
    ]
    proc = run_cli(*args, flag, value)
    assert proc.returncode == 2 and match in error_line(proc), proc.stderr[-500:]
    assert not (tmp_path / "o").exists()


def test_config_errors_are_config_errors():
    with pytest.raises(ConfigError, match="missing required setting data.cache"):
        build(TrainConfig, {"student": "s", "out": "o", "steps": 1, "data": {}})
