"""How a divergence's parameter (`beta` of skew_fkl, skew_rkl and jsd; TAID's `t`) moves
during training. The value lives on the device as a 0-d float32 tensor that the loss reads
(`sparse_kl_loss(..., param=)`): updating it is a few tensor operations, never a host
synchronisation and never a recompilation.

    constant   start throughout
    linear     start -> end over `steps` steps, end after
    cosine     start -> end along half a cosine over `steps` steps, end after
    taid       TAID's adaptive pace (Shing et al., ICLR 2025, Algorithm 1): after step n
               with KD loss J_n,
                   delta_n = (J_{n-1} - J_n) / (|J_{n-1}| + 1e-15)    (from the 2nd step)
                   m_n     = momentum m_{n-1} + (1 - momentum) delta_n
                   t_{n+1} = min(end, max(t_lin(n+1), t_n + alpha sigmoid(m_n) (1 - t_n)))
               t_lin the linear ramp start -> end over `steps`: t rises at least as fast
               as it, faster while the loss falls fast. Paper defaults: start 0.4, end 1,
               alpha 5e-4, momentum 0.99. The paper divides by J_{n-1}, a KL >= 0; on a
               top-K target TAID's KD term is the divergence of a measure of mass
               1 - t (1 - P) < 1 and can be negative, where J_{n-1} would flip the sign of
               the change: |J_{n-1}| keeps "the loss fell" positive (the same for J >= 0).

Under data parallelism J_n is the mean over ranks (one all-reduce of a scalar), so every
rank holds the same t. `state_dict()` goes into the checkpoint: a resumed run continues the
schedule bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

SCHEDULES = ("constant", "linear", "cosine", "taid")


class ParamSchedule:
    """One divergence parameter over `steps` optimizer steps; `value` is what the next step
    uses (a device tensor, updated in place)."""

    def __init__(
        self,
        kind: str,
        start: float,
        end: float,
        steps: int,
        device,
        *,
        alpha: float = 5e-4,
        momentum: float = 0.99,
        world: int = 1,
    ):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r} (one of {', '.join(SCHEDULES)})")
        self.kind, self.start, self.end, self.steps = kind, start, end, max(steps, 1)
        self.alpha, self.momentum, self.world = alpha, momentum, world
        f32 = dict(dtype=torch.float32, device=device)
        self.value = torch.tensor(start, **f32)
        # TAID's state: the previous loss, its momentum, and whether a previous loss exists
        self.prev = torch.zeros((), **f32)
        self.m = torch.zeros((), **f32)
        self.seen = torch.zeros((), dtype=torch.bool, device=device)
        self.done = 0  # steps taken (host-side: it is the step counter, not a device value)

    def planned(self, n: int) -> float:
        """The non-adaptive value at step n (0-based): linear, cosine, or constant."""
        x = min(n / self.steps, 1.0)
        if self.kind == "constant":
            return self.start
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * x))
        return self.start + (self.end - self.start) * x  # linear, and TAID's floor

    @torch.no_grad()
    def step(self, kd_loss: torch.Tensor) -> None:
        """After an optimizer step whose (weighted) KD loss was `kd_loss` (0-d, on the
        device): move `value` to what the next step uses."""
        self.done += 1
        if self.kind != "taid":
            self.value.fill_(self.planned(self.done))
            return
        loss = kd_loss.detach().to(torch.float32).reshape(())
        if self.world > 1:  # the same t on every rank: the mean loss over ranks
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= self.world
        rel = (self.prev - loss) / (self.prev.abs() + 1e-15)  # a fall is > 0 at any sign
        m = self.momentum * self.m + (1.0 - self.momentum) * rel
        self.m.copy_(torch.where(self.seen, m, self.m))
        t = self.value
        moved = t + self.alpha * torch.sigmoid(self.m) * (1.0 - t)
        # python bounds travel as kernel arguments: no copy to the device, no wait
        self.value.copy_(torch.clamp(moved, min=self.planned(self.done), max=self.end))
        self.prev.copy_(loss)
        self.seen.fill_(True)

    def state_dict(self) -> dict:
        keep = ("kind", "start", "end", "steps", "alpha", "momentum", "done")
        return {
            **{k: getattr(self, k) for k in keep},
            **{k: getattr(self, k).detach().cpu().clone() for k in ("value", "prev", "m", "seen")},
        }

    def load_state_dict(self, sd: dict) -> None:
        for k in ("kind", "start", "end", "steps", "alpha", "momentum"):
            if sd[k] != getattr(self, k):
                raise ValueError(
                    f"schedule {k} {sd[k]!r} in the checkpoint, {getattr(self, k)!r} now"
                )
        self.done = int(sd["done"])
        for k in ("value", "prev", "m", "seen"):
            getattr(self, k).copy_(sd[k])
