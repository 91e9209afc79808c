"""Divergence parameter schedules: each kind's values against its formula, TAID's adaptive
pace against a float64 transcription of the paper's Algorithm 1, and a state restored
mid-schedule continuing bit for bit."""

import math

import pytest
import torch

from sparsekd.student_train.schedules import ParamSchedule


def _taid_by_hand(losses, start, end, steps, alpha, momentum):
    """Algorithm 1 of the TAID paper, in plain Python floats: t used at each step."""
    t, m, prev, used = start, 0.0, None, []
    for n, J in enumerate(losses, start=1):
        used.append(t)
        if prev is not None:
            m = momentum * m + (1 - momentum) * (prev - J) / (abs(prev) + 1e-15)
        floor = start + (end - start) * min(n / steps, 1.0)
        t = min(end, max(floor, t + alpha * (1 / (1 + math.exp(-m))) * (1 - t)))
        prev = J
    return used


def _run(s: ParamSchedule, losses):
    used = []
    for J in losses:
        used.append(float(s.value))
        s.step(torch.tensor(J))
    return used


@pytest.mark.parametrize("alpha, momentum", [(5e-4, 0.99), (0.05, 0.9), (0.3, 0.5)])
def test_taid_follows_the_papers_update(alpha, momentum):
    g = torch.Generator().manual_seed(0)
    # a falling loss with noise, a plateau, then a rise: every branch of the update
    losses = [3.0 * 0.97**n + 0.05 * float(torch.rand((), generator=g)) for n in range(40)]
    losses += [losses[-1]] * 10 + [losses[-1] * (1 + 0.02 * n) for n in range(10)]
    steps = 50
    s = ParamSchedule("taid", 0.4, 1.0, steps, "cpu", alpha=alpha, momentum=momentum)
    got = _run(s, losses)
    want = _taid_by_hand(losses, 0.4, 1.0, steps, alpha, momentum)
    assert got == pytest.approx(want, abs=2e-6)  # float32 on the device
    assert got == sorted(got) and got[0] == pytest.approx(0.4) and got[-1] == 1.0
    if alpha >= 0.05:  # a fast pace runs ahead of the linear floor
        assert got[10] > 0.4 + 0.6 * 10 / steps + 0.01


def _target(mode: str, p_V: torch.Tensor, g: torch.Generator):
    """One position's sparse target as `mode` stores it: top-K (the K largest teacher
    probabilities, mass P < 1), sampled (N = 50 draws: counts / N, mass 1), or none
    (logprob caches carry no support)."""
    if mode == "topk":
        probs, ids = p_V.topk(4)
        return ids[None], probs[None]
    if mode == "sample":
        ids, counts = torch.multinomial(p_V, 50, replacement=True, generator=g).unique(
            return_counts=True
        )
        return ids[None], (counts / 50.0)[None]
    return torch.full((1, 1), -1), torch.zeros(1, 1)


@pytest.mark.parametrize("mode", ["topk", "sample", "logprob"])
def test_taids_pace_runs_ahead_while_the_loss_falls_and_behind_while_it_rises(mode):
    """The KD term TAID's pace reads is the real one of each mode's target: a student
    moving towards the teacher (falling), then away (rising). A top-K target's term is
    negative here (its mass is below 1): the case where dividing by J_{n-1} flips the sign.
    """
    from sparsekd.kernels import sparse_kl_loss

    g = torch.Generator().manual_seed(0)
    V, D = 64, 16
    w = torch.randn(V, D, generator=g)
    h_teacher, h_far = torch.randn(1, D, generator=g), torch.randn(1, D, generator=g)
    p_V = torch.softmax(h_teacher @ w.T, -1)[0]
    ids, probs = _target(mode, p_V, g)

    def kd(a: float) -> float:  # the student a of the way from h_far to the teacher
        h = (1 - a) * h_far + a * h_teacher
        return float(sparse_kl_loss(h, w, ids, probs, divergence="taid", t=0.4, kd_weight=1.0,
                                    ce_weight=0.0, backend="torch"))  # fmt: skip

    falling = [kd(a) for a in torch.linspace(0.0, 1.0, 12).tolist()]
    rising = falling[::-1]
    if mode == "topk":
        assert min(falling) < 0 < falling[0], falling
    if mode != "logprob":
        assert falling == sorted(falling, reverse=True) and falling[0] > falling[-1]
    for name, losses in (("falling", falling), ("rising", rising)):
        s = ParamSchedule("taid", 0.4, 1.0, 10**6, "cpu", alpha=0.1, momentum=0.0)
        t = _run(s, losses) + [float(s.value)]  # t used at each step, and after the last
        # with momentum 0, step n's move is alpha sigmoid(delta_n) (1 - t_n): against the
        # neutral alpha / 2 (1 - t_n) of a flat loss, every step from the second
        ahead = [(t[n + 1] - t[n]) / (0.1 * (1 - t[n])) - 0.5 for n in range(1, len(losses))]
        if mode == "logprob":  # no support, no KD term: the pace stays neutral
            assert all(abs(x) < 1e-6 for x in ahead), ahead
        elif name == "falling":
            assert all(x > 0 for x in ahead), (name, ahead, losses)
        else:
            assert all(x < 0 for x in ahead), (name, ahead, losses)


def test_planned_schedules():
    lin = ParamSchedule("linear", 0.1, 0.5, 4, "cpu")
    assert _run(lin, [1.0] * 6) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5])
    cos = ParamSchedule("cosine", 0.5, 0.1, 2, "cpu")
    assert _run(cos, [1.0] * 4) == pytest.approx([0.5, 0.3, 0.1, 0.1])
    const = ParamSchedule("constant", 0.2, 0.2, 3, "cpu")
    assert _run(const, [5.0, 1.0, 9.0]) == pytest.approx([0.2] * 3)


def test_a_restored_state_continues_bit_for_bit():
    losses = [2.0 / (1 + n) + 0.01 * (n % 3) for n in range(30)]
    whole = ParamSchedule("taid", 0.4, 1.0, 30, "cpu", alpha=0.2, momentum=0.9)
    want = _run(whole, losses)
    first = ParamSchedule("taid", 0.4, 1.0, 30, "cpu", alpha=0.2, momentum=0.9)
    _run(first, losses[:11])
    sd = first.state_dict()
    second = ParamSchedule("taid", 0.4, 1.0, 30, "cpu", alpha=0.2, momentum=0.9)
    second.load_state_dict(sd)
    assert _run(second, losses[11:]) == want[11:]  # exactly
    # a fresh schedule (the state lost) would not: the test can fail
    fresh = ParamSchedule("taid", 0.4, 1.0, 30, "cpu", alpha=0.2, momentum=0.9)
    assert _run(fresh, losses[11:]) != want[11:]
    with pytest.raises(ValueError, match="alpha"):
        ParamSchedule("taid", 0.4, 1.0, 30, "cpu", alpha=0.1, momentum=0.9).load_state_dict(sd)


@pytest.mark.parametrize(
    "loss, match",
    [
        ({"kind": "fkl", "t": 0.5}, "loss.t is TAID's: not for --loss fkl"),
        ({"kind": "taid", "beta": 0.5}, "loss.beta applies to --loss skew_fkl, skew_rkl, jsd"),
        ({"kind": "fkl", "schedule": "linear"}, "moves a divergence's parameter, and --loss fkl"),
        ({"kind": "jsd", "schedule": "taid"}, "TAID's own pace: for --loss taid, not --loss jsd"),
        ({"kind": "jsd", "schedule": "linear"}, "loss.schedule linear needs loss.schedule_end"),
        ({"kind": "jsd", "schedule_end": 0.5}, "loss.schedule_end needs a moving loss.schedule"),
        ({"kind": "taid", "schedule": "constant", "schedule_steps": 9}, "needs a moving"),
        (
            {"kind": "jsd", "schedule": "cosine", "schedule_end": 1.0},
            "schedule_end must be in (0, 1)",
        ),
        ({"kind": "taid", "t": 1.5}, "loss.t must be in [0, 1], got 1.5"),
        ({"kind": "taid", "t": 0.8, "schedule_end": 0.5}, "TAID's t rises"),
        ({"kind": "taid", "taid_alpha": 2.0}, "loss.taid_alpha must be in [0, 1]"),
        ({"kind": "taid", "taid_momentum": 1.0}, "loss.taid_momentum must be in [0, 1)"),
        # a setting with no effect under the chosen loss or schedule is refused, never ignored
        (
            {"kind": "fkl", "taid_alpha": 0.01},
            "adaptive pace (loss.schedule taid), which --loss fkl does not have",
        ),
        (
            {"kind": "jsd", "taid_momentum": 0.5},
            "loss.taid_momentum sets TAID's adaptive pace (loss.schedule taid), which --loss jsd",
        ),
        (
            {"kind": "taid", "schedule": "linear", "schedule_end": 1.0, "taid_alpha": 0.1},
            "loss.taid_alpha sets TAID's adaptive pace (loss.schedule taid), which loss.schedule",
        ),
        (
            {"kind": "taid", "schedule": "sometimes"},
            "must be one of constant, linear, cosine, taid",
        ),
    ],
)
def test_schedule_settings_that_make_no_sense_are_refused(loss, match):
    from sparsekd.config import build
    from sparsekd.errors import ConfigError
    from sparsekd.student_train.config import TrainConfig

    base = {"student": "s", "out": "o", "steps": 5, "data": {"cache": "c"}}
    with pytest.raises(ConfigError) as e:
        build(TrainConfig, {**base, "loss": loss})
    assert match in str(e.value)


def test_schedule_defaults():
    from sparsekd.config import build
    from sparsekd.student_train.config import TrainConfig

    base = {"student": "s", "out": "o", "steps": 5, "data": {"cache": "c"}}
    taid = build(TrainConfig, {**base, "loss": {"kind": "taid"}}).loss
    assert (taid.schedule_kind, taid.start, taid.end) == ("taid", 0.4, 1.0)
    jsd = build(TrainConfig, {**base, "loss": {"kind": "jsd", "beta": 0.3}}).loss
    assert (jsd.schedule_kind, jsd.start, jsd.end) == ("constant", 0.3, 0.3)
    assert jsd.kernel_config(validate=True).param_value == 0.3
    skew = build(TrainConfig, {**base, "loss": {"kind": "skew_fkl"}}).loss
    assert skew.start == skew.kernel_config(validate=True).param_value == 0.1  # its default
    ramp = {"kind": "skew_fkl", "schedule": "linear", "schedule_end": 0.5}
    assert build(TrainConfig, {**base, "loss": ramp}).loss.end == 0.5


def test_a_schedules_length_is_fixed_by_the_run_and_kept_on_resume(tmp_path):
    from sparsekd.config import build
    from sparsekd.student_train import checkpoint
    from sparsekd.student_train.config import TrainConfig

    def cfg(steps, **kw):
        return build(
            TrainConfig,
            {
                "student": "s", "out": str(tmp_path), "steps": steps, "data": {"cache": "c"},
                "loss": {"kind": "taid"}, **kw,
            },
        )  # fmt: skip

    new, run, _ = checkpoint.plan_run(tmp_path / "o", cfg(10), {})
    assert new.loss.schedule_steps == 10 and new.optim.decay_steps == 10
    checkpoint.write_run_record(tmp_path / "o", run, 0, [])
    longer, _, changes = checkpoint.plan_run(
        tmp_path / "o", cfg(30, checkpoint={"resume": True}), {}
    )
    assert longer.loss.schedule_steps == 10 and longer.optim.decay_steps == 10
    assert changes == [["steps", 10, 30]]
