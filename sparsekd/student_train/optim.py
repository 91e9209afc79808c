"""AdamW (fused) with decay on matrices only (not norms, biases or other 1-D parameters, as
nanoGPT does), and linear warm-up then cosine decay to 10 % of the peak."""

from __future__ import annotations

import math

import torch

from sparsekd.student_train.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel per step, and its step counters stay on the parameters' device (the
    # default implementation reads them on the host each step)
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=True)


def lr_lambda(cfg: OptimConfig, decay_steps: int):
    """Multiplier of the peak rate at a step: (step + 1) / warmup during warm-up, then a
    cosine from 1 to 0.1 over the following `decay_steps - warmup` steps, 0.1 after."""

    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / max(cfg.warmup, 1)
        progress = (step - cfg.warmup) / max(decay_steps - cfg.warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def build_schedule(opt, cfg: OptimConfig, decay_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, decay_steps))
