"""Preemption settings and the signal catcher (the end-to-end runs, one process and two
gloo ranks, are in test_trainer.py)."""

import os
import signal

import pytest

from sparsekd.config import build
from sparsekd.errors import ConfigError
from sparsekd.student_train.config import TrainConfig
from sparsekd.student_train.parallel import Dist
from sparsekd.student_train.preemption import StopSignals

BASE = {"student": "s", "out": "o", "steps": 5, "data": {"cache": "c"}}


@pytest.mark.parametrize(
    "ckpt, match",
    [
        ({"preempt_signals": ["SIGKILL"]}, "'SIGKILL' is not a signal a process can catch"),
        ({"preempt_signals": ["TERM"]}, "'TERM' is not a signal"),
        ({"preempt_signals": ["SIGNOPE"]}, "'SIGNOPE' is not a signal"),
        ({"preempt_exit_code": 2}, "not 2 (sparsekd's error status)"),
        ({"preempt_exit_code": 300}, "must be in 1..255"),
    ],
)
def test_preemption_settings_that_make_no_sense_are_refused(ckpt, match):
    with pytest.raises(ConfigError) as e:
        build(TrainConfig, {**BASE, "checkpoint": ckpt})
    assert match in str(e.value)


def test_a_caught_signal_sets_the_flag_and_the_old_handler_comes_back():
    cfg = build(TrainConfig, BASE).checkpoint
    assert cfg.preempt_signals == ("SIGTERM", "SIGUSR1") and cfg.preempt_exit_code == 75
    one = Dist(0, 1, "cpu")
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals(cfg.preempt_signals) as stop:
        assert not stop.agreed(one, True)
        os.kill(os.getpid(), signal.SIGUSR1)  # would end this process without the catcher
        assert stop.received == "SIGUSR1" and stop.agreed(one, False)
    assert signal.getsignal(signal.SIGUSR1) is before
    with StopSignals(()) as none:  # turned off: nothing caught
        assert signal.getsignal(signal.SIGUSR1) is before and not none.agreed(one, True)
