"""The student loss, held whole in one module: `KDLoss` owns the loss settings (`LossConfig`,
declared once in config.py: `train-student`'s `loss` section), the kernel configuration
they give (`LossConfig.kernel_config`: the one place `ce = 1 - kd` is written), and the
divergence parameter's schedule with its state (schedules.py). `train-student`'s
`DistillModule` and the transformers/TRL mixin each hold one; neither declares a setting
or a default of its own.

    loss = KDLoss(cfg.loss, steps=cfg.steps)          # the schedule made on first use
    total, kd, ce = loss(hidden_ND, head, labels_N, ids_NS, probs_NS)
    ...optimizer step...
    loss.step(kd)                                     # the parameter moves on the device

Shapes: N rows (positions), D hidden, S support (the widest in the batch).
"""

from __future__ import annotations

import torch

from sparsekd.kernels import sparse_kl_loss
from sparsekd.student_train.config import LossConfig
from sparsekd.student_train.schedules import ParamSchedule


class KDLoss(torch.nn.Module):
    """(1 - A) CE + A divergence against a sparse target, through the fused kernel."""

    def __init__(
        self,
        cfg: LossConfig,
        *,
        steps: int,
        validate: bool = True,
        world: int = 1,
        device=None,
    ):
        """`steps`: the run's length (a schedule's, unless `loss.schedule_steps` sets it);
        `validate`: check ids and labels on every call (a CacheDataset's reader already
        did); `world`: data-parallel ranks (TAID's pace uses the mean loss over them);
        `device`: where the schedule's value lives (default: the first call's)."""
        super().__init__()
        self.cfg = cfg
        self.kernel = cfg.kernel_config(validate=validate)
        self.steps, self.world = steps, world
        self.schedule: ParamSchedule | None = None
        if device is not None:
            self.schedule_on(device)

    def schedule_on(self, device) -> ParamSchedule | None:
        """The divergence parameter's schedule (None when it has no parameter), made on
        `device` the first time."""
        c = self.cfg
        if self.schedule is None and c.param is not None:
            self.schedule = ParamSchedule(
                c.schedule_kind,
                c.start,
                c.end,
                c.schedule_steps or max(self.steps, 1),
                device,
                alpha=c.taid_alpha,
                momentum=c.taid_momentum,
                world=self.world,
            )
        return self.schedule

    def forward(self, hidden_ND, head, labels_N, ids_NS, probs_NS):
        """-> (loss, weighted KD part, weighted CE part), each 0-d."""
        if self.kernel.kd_weight == 0.0:  # plain CE: no support to visit
            ids_NS = torch.full((hidden_ND.shape[0], 1), -1, dtype=torch.long, device=ids_NS.device)
            probs_NS = torch.zeros(ids_NS.shape, dtype=torch.float32, device=ids_NS.device)
        schedule = self.schedule_on(hidden_ND.device)
        return sparse_kl_loss(
            hidden_ND,
            head.weight,
            ids_NS,
            probs_NS,
            labels_N,
            bias=head.bias,
            config=self.kernel,
            return_parts=True,
            param=None if schedule is None else schedule.value,
        )

    @torch.no_grad()
    def step(self, kd_loss) -> None:
        """After an optimizer step whose weighted KD loss was `kd_loss`: the parameter
        moves (on the device; nothing when it has no schedule)."""
        if self.schedule is not None:
            self.schedule.step(kd_loss)
