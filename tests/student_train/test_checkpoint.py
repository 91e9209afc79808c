"""The run directory's rules: a resume must match the run's data and math (and names what
differs), safe settings may change and are recorded, a damaged newest checkpoint falls
back to the one before, a run killed before its first checkpoint resumes from step 0, and
--out is never a file or inside a cache."""

import json
import shutil

import pytest
import torch

from sparsekd.config import build
from sparsekd.errors import ConfigError, RunError
from sparsekd.storage import sha256_file
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
    tmp_path, finished, hf_topk_cache, topk12_cache, tiny_student, smollm2_dir
):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    with pytest.raises(RunError, match=r"cache \(identity\)"):
        T.run(_cfg(topk12_cache, tiny_student, out, **{"checkpoint.resume": True}))
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
    assert run["resumes"][0]["step"] == 4 and {"steps", "log_every", "student"} <= changed
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 6]  # resumed at 4 (the run's last step), then logged every 2


def test_the_per_rank_batch_may_change_the_global_batch_may_not(
    tmp_path, finished, hf_topk_cache, tiny_student
):
    """The global batch (batch x accumulation x ranks) is part of the run: another per-rank
    batch is taken with the accumulation that keeps it, one that cannot is refused."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    record = (out / "train_config.json").read_text()

    def resume(batch):
        over = {"checkpoint.resume": True, "data.batch_size": batch}
        return T.run(_cfg(hf_topk_cache, tiny_student, out, steps=6, **over))

    with pytest.raises(RunError, match="global batch is 2 sequences .*--batch-size 3 cannot"):
        resume(3)
    assert (out / "train_config.json").read_text() == record
    resume(1)
    run = json.loads((out / "train_config.json").read_text())
    changed = {k: (a, b) for k, a, b in run["resumes"][0]["changed"]}
    assert changed["data.batch_size"] == (2, 1) and changed["optim.grad_accum"] == (1, 2)
    lines = (out / "data" / "rank-0.txt").read_text().splitlines()
    assert [len(ln.split()) - 1 for ln in lines] == [2] * 6  # 2 sequences a step throughout


def test_a_grad_accum_given_on_resume_is_never_dropped_silently(
    tmp_path, finished, hf_topk_cache, tiny_student, capsys
):
    """--resume --grad-accum 2 on a run of global batch 2 (2 x 1): the run's global batch
    wins, and the replacement is said in one line and recorded with the resume."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    capsys.readouterr()
    over = {"checkpoint.resume": True, "optim.grad_accum": 2}
    T.run(_cfg(hf_topk_cache, tiny_student, out, steps=6, **over))
    said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sparsekd: resumed")]
    assert len(said) == 1 and "--grad-accum 2 replaced by 1" in said[0], said
    assert "the global batch stays 2 sequences" in said[0]
    run = json.loads((out / "train_config.json").read_text())
    assert ["optim.grad_accum (given, replaced)", 2, 1] in run["resumes"][0]["changed"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(
    tmp_path, hf_topk_cache, tiny_student, capsys
):
    out = tmp_path / "run"
    T.run(_cfg(hf_topk_cache, tiny_student, out, steps=6))
    model = out / "checkpoints" / "step-6" / "state" / "__0_0.distcp"
    model.write_bytes(model.read_bytes()[:100])  # truncated, DONE still there
    assert "does not match its checksum" in intact(out / "checkpoints" / "step-6")
    assert latest_intact(out).name == "step-4"
    assert "checkpoint" in capsys.readouterr().err
    T.run(_cfg(hf_topk_cache, tiny_student, out, steps=8, **{"checkpoint.resume": True}))
    resumed = json.loads((out / "train_config.json").read_text())["resumes"]
    assert resumed[0]["step"] == 4 and resumed[0]["changed"] == [["steps", 6, 8]]


def _checkpoint_state(ckpt, tmp_file):
    """A checkpoint's model and optimizer state as one dict, read by DCP's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt / "state", tmp_file)
    return torch.load(tmp_file, weights_only=False)


def test_sharded_checkpoints_and_the_earlier_full_ones_resume_alike(
    tmp_path, hf_topk_cache, tiny_student
):
    """A checkpoint holds the model and optimizer in torch.distributed.checkpoint's format;
    one of the earlier format (model.pt and optim.pt, full state dicts) still resumes, to
    the same weights."""
    full = tmp_path / "full"
    T.run(_cfg(hf_topk_cache, tiny_student, full, steps=6))
    out = tmp_path / "legacy"
    T.run(_cfg(hf_topk_cache, tiny_student, out, steps=6))
    ckpt = out / "checkpoints" / "step-4"
    state = _checkpoint_state(ckpt, tmp_path / "state.pt")
    assert set(state) == {"model", "optim"} and state["optim"]["state"]
    torch.save(state["model"], ckpt / "model.pt")
    torch.save(state["optim"], ckpt / "optim.pt")
    shutil.rmtree(ckpt / "state")
    shutil.rmtree(out / "checkpoints" / "step-6", ignore_errors=True)
    done = json.loads((ckpt / "DONE").read_text())
    files = {k: v for k, v in done["files"].items() if not k.startswith("state/")}
    for name in ("model.pt", "optim.pt"):
        files[name] = {"bytes": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)}
    (ckpt / "DONE").write_text(json.dumps({**done, "files": files}))
    shutil.rmtree(out / "final")
    run = json.loads((out / "train_config.json").read_text())
    run.pop("finished")
    (out / "train_config.json").write_text(json.dumps(run))
    T.run(_cfg(hf_topk_cache, tiny_student, out, steps=6, **{"checkpoint.resume": True}))
    a = (full / "final" / "model.safetensors").read_bytes()
    assert (out / "final" / "model.safetensors").read_bytes() == a


def test_a_run_killed_before_its_first_checkpoint_resumes_from_zero(
    tmp_path, hf_topk_cache, tiny_student
):
    out = tmp_path / "run"
    cfg = _cfg(hf_topk_cache, tiny_student, out, **{"checkpoint.every": 0})
    T.run(cfg)
    reference = (out / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(out / "final")  # as if killed at the end: metrics and config, no checkpoint
    record = json.loads((out / "train_config.json").read_text())
    del record["finished"]  # (a killed run never marked itself finished)
    (out / "train_config.json").write_text(json.dumps(record))
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
        ("--lr", "inf", "optim.lr must be a finite number, got inf"),
        ("--set", "loss.temperature=1e999", "loss.temperature must be a finite number"),
        ("--seed", "-1", "seed must be in 0..2^63-1, got -1"),
        ("--kd-weight", "0.5", "--loss ce has none"),  # with --loss ce, below
        ("--set", "loss.beta=0.3", "loss.beta applies to --loss skew_fkl, skew_rkl, jsd only"),
        ("--batch-size", "11", "--batch-size 11 is more than the 10 sequences rank 0 of 1"),
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
    extra = ["--loss", "ce"] if "has none" in match else []
    proc = run_cli(*args, flag, value, *extra)
    assert proc.returncode == 2 and match in error_line(proc), proc.stderr[-500:]
    left = [p.name for p in (tmp_path / "o").iterdir()] if (tmp_path / "o").exists() else []
    assert left in ([], [".lock"])  # nothing of a run was written


def test_config_errors_are_config_errors():
    with pytest.raises(ConfigError, match="missing required setting data.cache"):
        build(TrainConfig, {"student": "s", "out": "o", "steps": 1, "data": {}})


def test_a_finished_run_is_never_rewritten_by_a_shorter_resume(tmp_path, finished, hf_topk_cache,
                                                               tiny_student):  # fmt: skip
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(RunError, match="finished at step 4; --resume with --steps 2"):
        T.run(_cfg(hf_topk_cache, tiny_student, out, steps=2, **{"checkpoint.resume": True}))
    # the same --steps (a requeued job of a finished run): nothing left to do, nothing written
    record = T.run(_cfg(hf_topk_cache, tiny_student, out, steps=4, **{"checkpoint.resume": True}))
    assert record == {"step": 4, "finished_before": True}
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == before
    assert (out / "metrics.jsonl").read_text() == metrics


def test_a_resume_without_its_record_is_checked_against_the_checkpoints_copy(
    tmp_path, hf_topk_cache, tiny_student
):
    out = tmp_path / "run"
    T.run(_cfg(hf_topk_cache, tiny_student, out, steps=6))
    (out / "train_config.json").unlink()
    with pytest.raises(RunError, match="settings differ from the run .*loss.kind.*optim.lr"):
        T.run(_cfg(hf_topk_cache, tiny_student, out, steps=8, **{
            "checkpoint.resume": True, "loss.kind": "jsd", "optim.lr": 0.01}))  # fmt: skip
    T.run(_cfg(hf_topk_cache, tiny_student, out, steps=8, **{"checkpoint.resume": True}))


@pytest.mark.parametrize(
    "other, named",
    [({"optim.lr": 1e-3}, "optim.lr"), ({"loss.kind": "jsd"}, "loss.kind")],
)
def test_a_checkpoint_of_another_run_is_refused_by_name(
    tmp_path, hf_topk_cache, tiny_student, other, named
):
    """checkpoints/step-2 of an interrupted run replaced by step-2 of a run trained with
    other settings (its own config.json and DONE consistent): --resume refuses it, and the
    run's own checkpoint resumes as before."""
    out, alien = tmp_path / "run", tmp_path / "alien"
    T.run(_cfg(hf_topk_cache, tiny_student, out))
    T.run(_cfg(hf_topk_cache, tiny_student, alien, **other))
    own = tmp_path / "own-step-4"
    shutil.move(out / "checkpoints" / "step-4", own)  # the newest left: step-2
    shutil.move(out / "checkpoints" / "step-2", tmp_path / "own-step-2")
    shutil.copytree(alien / "checkpoints" / "step-2", out / "checkpoints" / "step-2")
    assert intact(out / "checkpoints" / "step-2") is None  # whole, by every file check
    with pytest.raises(RunError, match=f"checkpoint .*step-2 belongs to another run \\({named}"):
        T.run(_cfg(hf_topk_cache, tiny_student, out, steps=6, **{"checkpoint.resume": True}))
    shutil.rmtree(out / "checkpoints" / "step-2")
    shutil.move(own, out / "checkpoints" / "step-4")
    T.run(_cfg(hf_topk_cache, tiny_student, out, steps=6, **{"checkpoint.resume": True}))
    assert json.loads((out / "train_config.json").read_text())["finished"] == 6


def test_a_damaged_run_directory_is_named_or_its_torn_line_dropped(
    tmp_path, finished, hf_topk_cache, tiny_student, capsys
):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    resume = {"checkpoint.resume": True}
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')  # the torn line of a kill
    with open(out / "data" / "rank-0.txt", "a") as fh:
        fh.write("5 1 2")
    T.run(_cfg(hf_topk_cache, tiny_student, out, steps=6, **resume))
    err = capsys.readouterr().err
    assert "dropped the torn last line of" in err and "metrics.jsonl" in err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(RunError, match=r"metrics.jsonl line 2 is damaged"):
        T.run(_cfg(hf_topk_cache, tiny_student, out, steps=8, **resume))
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (out / "checkpoints" / "step-abc").mkdir()
    with pytest.raises(RunError, match=r"step-abc is not a checkpoint of this run"):
        T.run(_cfg(hf_topk_cache, tiny_student, out, steps=8, **resume))
    (out / "checkpoints" / "step-abc").rmdir()
    record = json.loads((out / "train_config.json").read_text())
    del record["identities"]
    (out / "train_config.json").write_text(json.dumps(record))
    with pytest.raises(RunError, match=r"train_config.json is damaged \(no 'identities'\)"):
        T.run(_cfg(hf_topk_cache, tiny_student, out, steps=8, **resume))


def test_a_diverging_run_stops_in_one_line_and_saves_nothing(tmp_path, hf_topk_cache,
                                                             tiny_student):  # fmt: skip
    for flag, value in (("--lr", "1e6"), ("--set", "loss.temperature=1e-30")):
        out = tmp_path / value
        proc = run_cli(
            "train-student", "--cache", hf_topk_cache, "--student", tiny_student, "--out", out,
            "--steps", 6, "--batch-size", 2, "--save-every", 1, "--quiet", flag, value,
        )  # fmt: skip
        line = error_line(proc)
        assert proc.returncode == 2 and line.startswith("sparsekd: error: training diverged"), line
        assert "likely a learning rate too high" in line
        assert not (out / "final").exists()
        for ckpt in (out / "checkpoints").glob("step-*"):  # what was saved is finite
            state = _checkpoint_state(ckpt, tmp_path / "state.pt")["model"]
            assert state and all(torch.isfinite(v).all() for v in state.values())


def test_one_run_at_a_time_per_out_and_a_killed_one_leaves_no_lock(
    tmp_path, hf_topk_cache, tiny_student
):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = ["train-student", "--cache", hf_topk_cache, "--student", tiny_student, "--out", out,
            "--steps", 100000, "--batch-size", 2, "--quiet"]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "sparsekd", *map(str, args)],
                             stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    assert (out / "metrics.jsonl").exists()
    proc = run_cli(*args[:-1], "--resume", "--quiet")
    assert proc.returncode == 2 and "is in use by another train-student run (pid" in error_line(
        proc
    )
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    proc = run_cli(*[a if a != 100000 else 2 for a in args], "--resume")
    assert "is in use" not in proc.stderr  # the lock died with its process


def test_a_half_set_distributed_environment_is_one_line(tmp_path, hf_topk_cache, tiny_student):
    args = ["train-student", "--cache", hf_topk_cache, "--student", tiny_student,
            "--out", tmp_path / "o", "--steps", 1, "--quiet"]  # fmt: skip
    proc = run_cli(*args, env={"WORLD_SIZE": "2", "RANK": "0"})
    assert proc.returncode == 2 and "WORLD_SIZE=2 is set but MASTER_ADDR" in error_line(proc)
    proc = run_cli(*args, env={"WORLD_SIZE": "two"})
    assert proc.returncode == 2 and "WORLD_SIZE='two' is not an integer" in error_line(proc)
