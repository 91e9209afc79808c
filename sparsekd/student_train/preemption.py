"""Stopping cleanly when a scheduler says so (SLURM's `--signal`, Kubernetes' SIGTERM).

A caught signal only sets a flag; the step loop reads it after a step. With one process the
flag is read after every step. With several, every rank must stop at the same step (the
checkpoint is a collective), so the ranks agree by one all-reduce of the flag, at the
logging steps only: the loop synchronises with the host there anyway, and a step stays
free of host synchronisations. A signal is therefore acted on within `log_every` steps.
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class StopSignals:
    """Catch `names` while the context is open (the previous handlers are put back)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # else Python refuses
            for name in self.names:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def agreed(self, d, sync_point: bool) -> bool:
        """Whether the run stops after this step: on every rank alike."""
        if d.world == 1:
            return self.received is not None
        if not sync_point:
            return False
        flag = torch.tensor([1.0 if self.received else 0.0], device=d.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
