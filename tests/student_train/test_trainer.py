"""train-student on a real cache built by the real vLLM engine (SmolLM2 teacher): learning,
backend agreement, kill-and-resume equality, DDP and FSDP2 with evaluation on gloo, and a
training step that never synchronises with the host."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sparsekd import open_cache
from sparsekd.config import build
from sparsekd.errors import ConfigError, RunError
from sparsekd.student_train import trainer as T
from sparsekd.student_train.checkpoint import intact, latest_intact
from sparsekd.student_train.config import TrainConfig
from sparsekd.student_train.evaluate import evaluate_model
from sparsekd.student_train.model import load_student
from tests.conftest import shared
from tests.helpers import run_cli, run_torchrun

pytestmark = pytest.mark.slow


def _cfg(cache, student, out, data=None, loss=None, optim=None, **kw):
    return build(
        TrainConfig,
        {
            "student": str(student),
            "out": str(out),
            "steps": 6,
            "data": {"cache": str(cache), "batch_size": 2, **(data or {})},
            "loss": loss or {},
            "optim": {"lr": 3e-3, "warmup": 2, **(optim or {})},
            "progress": False,
            "tensorboard": False,
            **kw,
        },
    )


def _records(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_lm_loss_falls_clearly(tmp_path, topk12_cache, tiny_student):
    cache = open_cache(topk12_cache)
    before = evaluate_model(load_student(tiny_student)[0], cache)
    T.run(
        _cfg(
            topk12_cache,
            tiny_student,
            tmp_path / "run",
            steps=40,
            data={"batch_size": 4},
            loss={"kd_weight": 0.5},
        )
    )
    after = evaluate_model(load_student(tmp_path / "run" / "final")[0], cache)
    assert after["lm_loss"] < before["lm_loss"] - 3.0, (before, after)
    assert after["kl"] < before["kl"] and after["tokens"] == before["tokens"] == 48 * 64
    recs = [r for r in _records(tmp_path / "run") if "loss" in r]
    assert len(recs) == 40
    assert {"step", "loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s", "data_wait_s"} <= set(
        recs[0]
    )
    assert recs[-1]["loss"] == pytest.approx(recs[-1]["ce"] + recs[-1]["kd"], rel=1e-5)
    assert all(0 <= r["data_wait_frac"] < 1 for r in recs)


def test_same_loss_curve_with_triton_and_torch(tmp_path, topk12_cache, tiny_student):
    curves = {}
    for backend in ("torch", "triton"):
        cfg = _cfg(
            topk12_cache,
            tiny_student,
            tmp_path / backend,
            steps=4,
            data={"batch_size": 1},
            loss={"kind": "ghost", "backend": backend},
        )
        T.run(cfg)
        curves[backend] = [r["loss"] for r in _records(tmp_path / backend)]
    assert len(curves["torch"]) == 4
    torch.testing.assert_close(
        torch.tensor(curves["triton"]), torch.tensor(curves["torch"]), rtol=1e-4, atol=1e-5
    )


def test_activation_checkpointing_and_compile_keep_the_run(tmp_path, topk12_cache, tiny_student):
    """Recomputing each layer in the backward gives the same weights bit for bit; compiled
    layers give the same loss curve to float tolerance."""
    runs = {
        "plain": {},
        "recompute": {"activation_checkpointing": True},
        "compiled": {"compile": True},
    }
    curves, weights = {}, {}
    for name, par in runs.items():
        T.run(_cfg(topk12_cache, tiny_student, tmp_path / name, steps=3, parallel=par))
        curves[name] = torch.tensor([r["loss"] for r in _records(tmp_path / name)])
        weights[name] = (tmp_path / name / "final" / "model.safetensors").read_bytes()
    assert len(curves["plain"]) == 3 and curves["plain"][-1] < curves["plain"][0]
    assert torch.equal(curves["recompute"], curves["plain"])
    assert weights["recompute"] == weights["plain"]
    torch.testing.assert_close(curves["compiled"], curves["plain"], rtol=1e-4, atol=1e-5)
    cfg = json.loads((tmp_path / "compiled" / "train_config.json").read_text())
    assert cfg["config"]["parallel"]["compile"] is True


def test_bf16_mixed_precision_is_refused_where_it_cannot_apply(
    tmp_path, topk12_cache, tiny_student
):
    with pytest.raises(ConfigError, match="needs --fsdp"):
        _cfg(topk12_cache, tiny_student, tmp_path / "x", parallel={"mixed_precision": "bf16"})
    with pytest.raises(ConfigError, match="bf16 or unset"):
        _cfg(topk12_cache, tiny_student, tmp_path / "x", parallel={"mixed_precision": "fp8"})
    cfg = _cfg(
        topk12_cache,
        tiny_student,
        tmp_path / "x",
        parallel={"mixed_precision": "bf16", "fsdp": True},
    )
    with pytest.raises(RunError, match="needs FSDP2 on CUDA under torchrun"):
        T.run(cfg)
    assert not (tmp_path / "x" / "final").exists()


class NoHostSync(TorchFunctionMode):
    """Fails on any call that makes the host wait for a device value."""

    SYNCS = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.Tensor.masked_select,
        torch.masked_select,
        torch.unique,
        torch.Tensor.unique,
        torch.Tensor.numpy,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            raise AssertionError(f"host synchronisation in a training step: {func.__name__}")
        if func is torch.Tensor.__getitem__ and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:]
        ):
            raise AssertionError("data-dependent shape in a training step: boolean indexing")
        return func(*args, **(kwargs or {}))


def test_a_training_step_makes_no_host_synchronisation(
    tmp_path, topk12_cache, tiny_student, monkeypatch
):
    # the mode itself catches what it must
    with pytest.raises(AssertionError, match="item"), NoHostSync():
        torch.ones(2).sum().item()
    steps = []
    original = T.Trainer.train_step

    def guarded(self, batches):
        with NoHostSync():
            out = original(self, batches)
        steps.append(out)
        return out

    monkeypatch.setattr(T.Trainer, "train_step", guarded)
    for kind in ("fkl", "ce", "taid"):
        cfg = _cfg(
            topk12_cache,
            tiny_student,
            tmp_path / kind,
            steps=4,
            loss={"kind": kind},
            optim={"grad_accum": 2},
            log_every=4,
        )
        T.run(cfg)
    assert len(steps) == 12 and all(isinstance(v, torch.Tensor) for v in steps[0].values())
    # TAID's t moved on the device inside the guarded steps, and is logged per record
    assert [float(s["t"]) for s in steps[8:]] == sorted(float(s["t"]) for s in steps[8:])
    assert float(steps[8]["t"]) == pytest.approx(0.4)
    assert float(steps[11]["t"]) > 0.4
    assert _records(tmp_path / "taid")[-1]["t"] == float(steps[11]["t"])


def _kill_args(cache, student, *loss):
    return ["train-student", "--cache", cache, "--student", student, "--steps", "16",
            "--batch-size", "2", "--save-every", "4", "--lr", "3e-3", "--warmup", "2",
            "--quiet", *loss]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, topk12_cache, tiny_student):
    """The uninterrupted run of `_kill_args` (forward KL), once per test run: the reference
    of the kill -9 and the SIGTERM tests (checkpoints never change the weights)."""

    def make(d):
        run_cli(*_kill_args(topk12_cache, tiny_student), "--out", d / "full", check=True)

    return shared(tmp_path_factory, "uninterrupted-fkl-16", make) / "full"


# TAID with a large step size and short momentum: t is decided by its adaptive state
# (momentum, previous loss), which the kill lands in the middle of
@pytest.mark.parametrize(
    "loss",
    [[], ["--loss", "taid", "--set", "loss.taid_alpha=1.0", "--set", "loss.taid_momentum=0.5"]],
    ids=["fkl", "taid"],
)
def test_killed_and_resumed_run_is_bitwise_identical(
    tmp_path, topk12_cache, tiny_student, loss, request
):
    args = _kill_args(topk12_cache, tiny_student, *loss)
    full = tmp_path / "full"
    if loss:
        run_cli(*args, "--out", full, check=True)
    else:
        full = request.getfixturevalue("uninterrupted")

    out = tmp_path / "resumed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsekd", *map(str, args), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "step-8" / "DONE").exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the kill must land before the run ends"
    run_cli(*args, "--out", out, "--resume", check=True)

    a = (full / "final" / "model.safetensors").read_bytes()
    b = (out / "final" / "model.safetensors").read_bytes()
    assert a == b, "final weights differ"
    strip = lambda rs: [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "data_wait_s", "data_wait_frac")}
        for r in rs
    ]  # noqa
    assert strip(_records(out)) == strip(_records(full))
    if loss:  # t after the kill (step 9) is TAID's adaptive value, above its linear floor
        t9 = _records(out)[8]["t"]
        assert (
            t9 > 0.4 + 0.6 * 8 / 16 + 0.01
            and (out / "checkpoints" / "step-8" / "loss_schedule.pt").exists()
        )
    assert (out / "data" / "rank-0.txt").read_text() == (full / "data" / "rank-0.txt").read_text()


def test_a_kill_during_a_background_save_falls_back_to_the_one_before(
    tmp_path, topk12_cache, tiny_student
):
    """checkpoint.background: the state is written while training goes on and published
    at the next logging step (here every 6) or save; a kill -9 while step 6's is still
    being written leaves it unpublished, and the resume takes step 3's, ending bitwise as
    an uninterrupted run."""
    args = _train_args(topk12_cache, tiny_student, 16, "--save-every", "3",
                       "--set", "log_every=6", "--set", "checkpoint.background=true")  # fmt: skip
    run_cli(*args[2:], "--out", tmp_path / "full", check=True)
    ckpts = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{n}" for n in (12, 15, 3, 6, 9)]
    assert all(intact(p) is None for p in ckpts.iterdir())
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, *args, "--out", str(out)], start_new_session=True)
    log, pending = out / "data" / "rank-0.txt", out / "checkpoints" / ".step-6.tmp"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if pending.exists() and log.exists() and len(log.read_text().splitlines()) >= 7:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert pending.exists() and not (out / "checkpoints" / "step-6").exists()
    assert latest_intact(out).name == "step-3"
    run_cli(*args[2:], "--out", out, "--resume", check=True)
    a = (tmp_path / "full" / "final" / "model.safetensors").read_bytes()
    assert (out / "final" / "model.safetensors").read_bytes() == a, "final weights differ"


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_process_gloo_ranks_see_disjoint_data_and_evaluate(
    tmp_path, topk12_cache, tiny_student, fsdp
):
    out = tmp_path / "ddp"
    args = [
        "-m",
        "sparsekd",
        "train-student",
        "--cache",
        str(topk12_cache),
        "--student",
        str(tiny_student),
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--eval-cache",
        str(topk12_cache),
        "--eval-every",
        "2",
        "--set",
        "eval.sequences=6",
        "--quiet",
    ] + (["--fsdp"] if fsdp else ["--loss", "taid"])  # TAID: t from the loss of both ranks
    proc = run_torchrun(*args)
    # a failing rank's one-line error first: the tail is the launcher's traceback
    errors = [ln for ln in proc.stderr.splitlines() if "sparsekd: " in ln]
    assert proc.returncode == 0, "\n".join(errors) + "\n" + proc.stderr[-2000:]
    ids = []
    for rank in (0, 1):
        lines = (out / "data" / f"rank-{rank}.txt").read_text().splitlines()
        assert len(lines) == 4
        ids.append({int(x) for ln in lines for x in ln.split()[1:]})
    assert ids[0] and ids[1] and not (ids[0] & ids[1])
    if not fsdp:  # t moved by the mean KD loss over ranks (an all-reduce in the step)
        ts = [r["t"] for r in _records(out) if "t" in r]
        assert len(ts) == 4 and ts[0] == pytest.approx(0.4) and ts == sorted(ts) and ts[3] > 0.4
    evals = [r["eval"] for r in _records(out) if "eval" in r]
    assert len(evals) == 2 and all(e["tokens"] == 6 * 64 for e in evals)
    model, _ = load_student(out / "final")
    single = evaluate_model(model, open_cache(topk12_cache), max_sequences=6)
    # the last evaluation ran at step 4 on the final weights, split over two ranks
    assert evals[-1]["lm_loss"] == pytest.approx(single["lm_loss"], rel=1e-4)


def _train_args(cache, student, steps, *extra):
    return [
        "-m", "sparsekd", "train-student", "--cache", str(cache), "--student", str(student),
        "--steps", str(steps), "--batch-size", "2", "--lr", "3e-3", "--warmup", "2",
        "--quiet", *extra,
    ]  # fmt: skip


def _wait_for_steps(out, n, proc, deadline_s=300):
    log = out / "data" / "rank-0.txt"
    deadline = time.time() + deadline_s
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {n} (exit {proc.poll()})")


def _sigterm_after(args, out, n: int):
    """`args` run in its own process until step n is logged, then SIGTERM: (proc, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsekd", *map(str, args), "--out", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_steps(out, n, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    return proc, err


def test_a_preempted_run_checkpoints_exits_75_and_resumes_bitwise(
    tmp_path, topk12_cache, tiny_student, uninterrupted
):
    args = _kill_args(topk12_cache, tiny_student)
    out = tmp_path / "preempted"
    proc, err = _sigterm_after(args, out, 3)
    assert proc.returncode == 75, err[-2000:]
    line = err.strip().splitlines()[-1]
    step = int(line.split("after step ")[1].split()[0])
    assert 3 <= step < 16 and line.startswith("sparsekd: preempted (SIGTERM) after step")
    assert not (out / "final").exists()
    assert (out / "checkpoints" / f"step-{step}" / "DONE").exists()
    run_cli(*args, "--out", out, "--resume", check=True)
    a = (uninterrupted / "final" / "model.safetensors").read_bytes()
    assert (out / "final" / "model.safetensors").read_bytes() == a, "final weights differ"


def test_a_signal_during_the_final_save_ends_complete_with_the_contracts_status(
    tmp_path, topk12_cache, tiny_student, uninterrupted
):
    """SIGTERM once the last step is logged (its checkpoint and the final save still to
    come): the run ends complete and marked finished, with exit 75 and its one line; the
    requeued command (--resume) finds nothing left to do and exits 0."""
    args = _kill_args(topk12_cache, tiny_student)
    out = tmp_path / "late"
    proc, err = _sigterm_after(args, out, 16)
    assert proc.returncode == 75, err[-2000:]
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(
            "sparsekd: preempted (SIGTERM) during the final save: the run finished at step 16"
        )
    )
    a = (uninterrupted / "final" / "model.safetensors").read_bytes()
    assert (out / "final" / "model.safetensors").read_bytes() == a
    assert json.loads((out / "train_config.json").read_text())["finished"] == 16
    again = run_cli(*args, "--out", out, "--resume")
    assert again.returncode == 0 and "nothing left to do" in again.stderr, again.stderr[-1000:]


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The worker of `rank` among torchrun's children (read from /proc)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        kids = []
        for task in os.listdir(f"/proc/{launcher.pid}/task"):
            with open(f"/proc/{launcher.pid}/task/{task}/children") as fh:
                kids += [int(x) for x in fh.read().split()]
        for pid in kids:
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} under torchrun")


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_a_signal_to_one_rank_stops_both_at_the_same_step(
    tmp_path, topk12_cache, tiny_student, fsdp
):
    """SIGTERM reaches rank 1 only: the ranks agree (an all-reduce at a logging step), both
    checkpoint the same step (each rank its own shard of the state) and exit 75; resumed,
    the run ends as an uninterrupted one."""
    args = _train_args(topk12_cache, tiny_student, 12, *(["--fsdp"] if fsdp else []))
    proc = run_torchrun(*args, "--out", tmp_path / "full")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "preempted"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    cmd += ["2", *args, "--out", str(out)]
    launcher = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    _wait_for_steps(out, 3, launcher)
    os.kill(_rank_pid(launcher, 1), signal.SIGTERM)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("sparsekd: preempted")]
    assert len(lines) == 2, err[-3000:]
    assert {ln.split("after step ")[1].split()[0] for ln in lines} == {
        d.name.removeprefix("step-") for d in (out / "checkpoints").iterdir()
    }
    assert any("(SIGTERM)" in ln for ln in lines) and any("another rank" in ln for ln in lines)
    (step,) = (out / "checkpoints").iterdir()
    shards = {p.name.split("_")[2] for p in (step / "state").glob("__*_*.distcp")}
    assert shards == {"0", "1"}, sorted(shards)  # __<rank>_<n>.distcp: both ranks wrote
    proc = run_torchrun(*args, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = (tmp_path / "full" / "final" / "model.safetensors").read_bytes()
    assert (out / "final" / "model.safetensors").read_bytes() == a, "final weights differ"


def test_a_refusal_on_one_rank_is_one_line_on_every_rank(tmp_path, hf_topk_cache, tiny_student):
    """4 ranks on a cache of 3 row groups: one rank's stream gets no data. Every rank ends
    with one line and status 2 before any collective (no rank left inside one to crash
    with a traceback)."""
    args = _train_args(hf_topk_cache, tiny_student, 2, "--out", tmp_path / "run")
    proc = run_torchrun(*args, nproc=4, timeout=300)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("sparsekd: error:")]
    assert len(errors) == 4, proc.stderr[-3000:]
    (empty,) = [ln for ln in errors if "gets no data" in ln]  # one rank's own check
    r = empty.split("stream ")[1].split()[0]  # rank r reads stream r
    assert sum(f"rank {r} refused the run" in ln for ln in errors) == 3, errors
    assert "internal error" not in proc.stderr and "Connection closed" not in proc.stderr
    assert "exitcode  : 2" in proc.stderr  # torchrun's summary: each rank's own status


def _reads(out) -> list[int]:
    """Every seq_id the run's ranks trained on, from data/rank-R.txt."""
    return [int(x) for p in sorted((out / "data").glob("rank-*.txt"))
            for ln in p.read_text().splitlines() for x in ln.split()[1:]]  # fmt: skip


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_resumed_on_another_number_of_ranks_every_sequence_is_read_once(
    tmp_path, topk12_cache, tiny_student, fsdp
):
    """Saved on 2 ranks, resumed on 3, then on 1 (FSDP2: 2 -> 1 -> 3): the state reshards,
    the global batch of 6 stays (3 x 2, then 2 x 3, then 3 x 1 x 2 accumulated), and over
    the 8 steps of the 48-sequence epoch every sequence is trained on exactly once."""
    out = tmp_path / "run"
    args = _train_args(topk12_cache, tiny_student, 2, "--out", out, "--save-every", "2")
    args[args.index("--batch-size") + 1] = "3"
    args += ["--set", "log_every=1", *(["--fsdp"] if fsdp else [])]
    worlds = [(3, ["--batch-size", "2"]), (1, [])]
    worlds = worlds[::-1] if fsdp else worlds
    proc = run_torchrun(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = [r["loss"] for r in _records(out) if "loss" in r]
    for (world, extra), steps in zip(worlds, (4, 8)):
        args[args.index("--steps") + 1] = str(steps)
        proc = run_torchrun(*args, *extra, "--resume", nproc=world)
        assert proc.returncode == 0, proc.stderr[-2000:]
        note = [ln for ln in proc.stderr.splitlines() if ln.startswith("sparsekd: resumed")]
        assert len(note) == 1 and "the global batch stays 6 sequences" in note[0], note
    reads = _reads(out)
    everything = {s.seq_id for s in open_cache(topk12_cache)}
    assert len(reads) == 48 and set(reads) == everything and len(everything) == 48
    run = json.loads((out / "train_config.json").read_text())
    sizes = [[c for c in r["changed"] if c[0] == "world_size"][0][1:] for r in run["resumes"]]
    assert sizes == [[2, worlds[0][0]], [2, worlds[1][0]]]  # each against the run's first
    losses = [r["loss"] for r in _records(out) if "loss" in r]
    assert losses[:2] == first and len(losses) == 8
    # the model went on from its checkpoints: later steps lower than the first, none back
    assert max(losses[2:]) < first[0] and losses[-1] < losses[0] - 0.3, losses
