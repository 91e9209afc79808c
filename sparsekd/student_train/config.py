"""`TrainConfig`: the settings of `sparsekd train-student`, one section per concern.

    data        which cache, batch size, shuffle buffer, prefetch
    loss        ce or a divergence, KD weight, temperature, beta, backend
    optim       AdamW, warm-up and cosine schedule, clipping, accumulation
    checkpoint  how often, whether to resume
    eval        held-out cache, how often, how much
    parallel    FSDP2 or DDP under torchrun
plus the run itself: student, out, steps, seed, logging. Flags, `--config FILE.yaml`
(sections as nested mappings) and `--set optim.lr=3e-4` all come from these declarations.

On `--resume`, `RESUME_SAFE` settings may differ from the checkpoint's (the change is
recorded in train_config.json); any other difference is refused, naming the setting.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from sparsekd.config import check, check_local, default_of, section, setting
from sparsekd.kernels import divergences as DV
from sparsekd.kernels.sparse_kl import BACKENDS
from sparsekd.student_train.schedules import SCHEDULES

LOSSES = ("ce", *DV.NAMES)
BETA_LOSSES = tuple(n for n in DV.NAMES if DV.get(n).param == "beta")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    cache: str = setting(
        doc="Training cache (or a refined set): a path or a URI (s3://..., gs://...).",
        flag="--cache",
    )
    teacher_cache: str | None = setting(
        None,
        "Take the KD targets of --cache's sequences from this full cache (for a refined set).",
        flag=True,
    )
    batch_size: int = setting(8, "Sequences per micro-batch per rank.", flag=True)
    shuffle_buffer: int = setting(
        256, "Sequences shuffled together (whole row groups; also what a resume decodes)."
    )
    prefetch: int = setting(4, "Batches prepared ahead by the reader's thread (0: none).")
    read_ahead: int | None = setting(
        None,
        "Row groups read concurrently ahead of use (default: 0 on a local disk, 32 from an "
        "object store: enough to hide ~20 ms per request; docs/storage.md).",
    )

    def __post_init__(self):
        check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1")
        check(self.prefetch >= 0, "data.prefetch must be >= 0")
        check(self.read_ahead is None or self.read_ahead >= 0, "data.read_ahead must be >= 0")


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    kind: str = setting(
        "fkl",
        "ce ignores the teacher; the others distil (docs/losses.md).",
        flag="--loss",
        choices=LOSSES,
    )
    kd_weight: float | None = setting(
        None, "A in (1 - A) CE + A KD (default 0.9; not with --loss ce).", flag=True
    )
    temperature: float = setting(1.0, "Student logits are divided by it in the loss.")
    beta: float | None = setting(
        None,
        "Mixture weight of skew_fkl, skew_rkl and jsd (default 0.1; only for those; the "
        "start value when loss.schedule moves it).",
    )
    t: float | None = setting(
        None, "TAID's interpolation t at the first step (default 0.4, the paper's; only taid)."
    )
    schedule: str | None = setting(
        None,
        "How the divergence's parameter (beta, or taid's t) moves during training: constant; "
        "linear or cosine from its start value to loss.schedule_end over "
        "loss.schedule_steps; taid, TAID's adaptive pace (only --loss taid, its default).",
        choices=SCHEDULES,
    )
    schedule_end: float | None = setting(
        None, "The parameter's value at the end of a schedule (needed but by taid: 1.0)."
    )
    schedule_steps: int | None = setting(
        None, "Steps a schedule takes to reach its end (default: --steps; kept on resume)."
    )
    taid_alpha: float = setting(
        5e-4, "TAID's step size alpha (the paper's default; only with loss.schedule taid)."
    )
    taid_momentum: float = setting(
        0.99, "TAID's momentum of the loss's relative change (only with loss.schedule taid)."
    )
    backend: str = setting(
        "auto", "Loss backend (auto: triton on CUDA, torch on CPU).", flag=True, choices=BACKENDS
    )
    chunk_rows: int | None = setting(None, "Rows per loss chunk (default: from a memory budget).")

    def __post_init__(self):
        check(
            self.kd_weight is None or self.kind != "ce",
            "loss.kd_weight (--kd-weight) weighs the KD term, and --loss ce has none",
        )
        check(
            0.0 <= self.effective_kd_weight <= 1.0,
            f"loss.kd_weight must be in [0, 1], got {self.kd_weight}",
        )
        check(self.temperature > 0, "loss.temperature must be > 0")
        check(
            self.beta is None or self.param == "beta",
            f"loss.beta applies to --loss {', '.join(BETA_LOSSES)} only, not --loss {self.kind}",
        )
        check(self.t is None or self.param == "t", f"loss.t is TAID's: not for --loss {self.kind}")
        self._check_schedule()
        check(self.chunk_rows is None or self.chunk_rows >= 1, "loss.chunk_rows must be >= 1")

    def _check_schedule(self) -> None:
        name, kind = self.param, self.schedule_kind
        check(
            name is not None or self.schedule in (None, "constant"),
            f"loss.schedule {self.schedule} moves a divergence's parameter, and --loss "
            f"{self.kind} has none",
        )
        check(
            kind != "taid" or self.kind == "taid",
            f"loss.schedule taid is TAID's own pace: for --loss taid, not --loss {self.kind}",
        )
        moving = kind in ("linear", "cosine", "taid")
        check(
            self.schedule_end is None or moving,
            "loss.schedule_end needs a moving loss.schedule (linear, cosine or taid)",
        )
        check(
            self.schedule_steps is None or moving,
            "loss.schedule_steps needs a moving loss.schedule (linear, cosine or taid)",
        )
        check(
            kind not in ("linear", "cosine") or self.schedule_end is not None,
            f"loss.schedule {kind} needs loss.schedule_end, the value it ends at",
        )
        for key in ("taid_alpha", "taid_momentum"):  # TAID's pace only: else no effect
            check(
                kind == "taid" or getattr(self, key) == default_of(LossConfig, key),
                f"loss.{key} sets TAID's adaptive pace (loss.schedule taid), which "
                + (
                    f"--loss {self.kind} does not have"
                    if self.kind != "taid"
                    else f"loss.schedule {kind} replaces"
                ),
            )
        if name is None:
            return
        lo_open = name == "beta"  # beta in (0, 1); TAID's t in [0, 1]
        for what, v in ((f"loss.{name}", self.start), ("loss.schedule_end", self.end)):
            ok = 0.0 < v < 1.0 if lo_open else 0.0 <= v <= 1.0
            check(ok, f"{what} must be in {'(0, 1)' if lo_open else '[0, 1]'}, got {v}")
        check(
            kind != "taid" or self.end >= self.start,
            f"TAID's t rises: loss.schedule_end {self.end} is below loss.t {self.start}",
        )
        check(
            self.schedule_steps is None or self.schedule_steps >= 1,
            "loss.schedule_steps must be >= 1",
        )
        check(
            0.0 <= self.taid_alpha <= 1.0,
            f"loss.taid_alpha must be in [0, 1], got {self.taid_alpha}",
        )
        check(
            0.0 <= self.taid_momentum < 1.0,
            f"loss.taid_momentum must be in [0, 1), got {self.taid_momentum}",
        )

    @property
    def divergence(self) -> str:
        return "fkl" if self.kind == "ce" else self.kind

    @property
    def effective_kd_weight(self) -> float:
        if self.kind == "ce":
            return 0.0
        return 0.9 if self.kd_weight is None else self.kd_weight

    @property
    def param(self) -> str | None:
        """The name of the divergence's parameter (beta, t), None if it has none."""
        return None if self.kind == "ce" else DV.get(self.kind).param

    @property
    def start(self) -> float:
        """The parameter's value at the first step."""
        if self.param is None:
            return 0.0
        given = getattr(self, self.param)
        return DV.get(self.kind).default if given is None else given

    @property
    def schedule_kind(self) -> str:
        return self.schedule or ("taid" if self.kind == "taid" else "constant")

    @property
    def end(self) -> float:
        if self.schedule_end is not None:
            return self.schedule_end
        return 1.0 if self.schedule_kind == "taid" else self.start

    def kernel_config(self, *, validate: bool):
        """The loss's SparseKLConfig: (1 - A) CE + A KD, the parameter at its start value
        (a schedule passes later values per call). The one place this rule is written."""
        from sparsekd.kernels.sparse_kl import SparseKLConfig

        kd = self.effective_kd_weight
        return SparseKLConfig(
            divergence=self.divergence,
            kd_weight=kd,
            ce_weight=1.0 - kd,
            temperature=self.temperature,
            beta=self.start if self.param == "beta" else None,
            t=self.start if self.param == "t" else None,
            backend=self.backend,
            chunk_rows=self.chunk_rows,
            validate=validate,
        )


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = setting(1e-3, "Peak learning rate.", flag=True)
    warmup: int = setting(10, "Linear warm-up steps.", flag=True)
    decay_steps: int | None = setting(
        None, "Length of the cosine decay to 10 % (default: --steps; kept on resume)."
    )
    weight_decay: float = setting(0.01, "AdamW weight decay (matrices only, not norms or biases).")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.")
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", flag=True)

    def __post_init__(self):
        check(self.lr > 0, "optim.lr must be > 0")
        check(self.warmup >= 0, "optim.warmup must be >= 0")
        check(self.decay_steps is None or self.decay_steps >= 1, "optim.decay_steps must be >= 1")
        check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        check(self.max_grad_norm > 0, "optim.max_grad_norm must be > 0")
        check(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    every: int = setting(
        0, "Checkpoint every C steps (0: only the final model).", flag="--save-every"
    )
    resume: bool = setting(
        False, "Continue from the newest intact checkpoint of --out.", flag="--resume"
    )
    preempt_signals: tuple[str, ...] = setting(
        ("SIGTERM", "SIGUSR1"),
        "Signals that stop the run cleanly: it finishes its step, writes a checkpoint and "
        "exits with checkpoint.preempt_exit_code (docs/training.md); empty: none.",
    )
    preempt_exit_code: int = setting(75, "Exit status after a preemption (75: try again).")
    background: bool = setting(
        False,
        "Write each checkpoint's model and optimizer state in a background thread: the step "
        "waits only for a copy of the state in host memory (one more copy of each rank's "
        "share); the checkpoint counts (DONE) from the next logging step at which every rank "
        "has finished writing it, and a run killed before then resumes from the one before.",
    )

    def __post_init__(self):
        check(self.every >= 0, f"checkpoint.every must be >= 0, got {self.every}")
        for name in self.preempt_signals:
            sig = getattr(signal, name, None) if name.startswith("SIG") else None
            check(
                isinstance(sig, signal.Signals) and name not in ("SIGKILL", "SIGSTOP"),
                f"checkpoint.preempt_signals: {name!r} is not a signal a process can catch",
            )
        check(
            1 <= self.preempt_exit_code <= 255 and self.preempt_exit_code != 2,
            "checkpoint.preempt_exit_code must be in 1..255 and not 2 (sparsekd's error "
            f"status), got {self.preempt_exit_code}",
        )


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    cache: str | None = setting(None, "Cache to evaluate on.", flag="--eval-cache")
    every: int = setting(0, "Evaluate every E steps.", flag="--eval-every")
    sequences: int = setting(64, "Held-out sequences per evaluation.")

    def __post_init__(self):
        check(self.every >= 0, "eval.every must be >= 0")
        check(self.sequences >= 1, "eval.sequences must be >= 1")
        check(not (self.every and not self.cache), "--eval-every needs --eval-cache")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    fsdp: bool = setting(False, "Shard with FSDP2 under torchrun (default: DDP).", flag="--fsdp")
    activation_checkpointing: bool = setting(
        False,
        "Keep only each decoder layer's input and recompute its activations in the backward "
        "pass: activation memory of one layer instead of all, for about one more forward "
        "pass of compute (the same gradients).",
    )
    compile: bool = setting(
        False,
        "torch.compile each decoder layer (a compilation at the first steps, then fused "
        "kernels; on CPU the compilation rarely pays back).",
    )
    mixed_precision: str | None = setting(
        None,
        "bf16: FSDP2 keeps fp32 parameter shards and optimizer state, gathers and computes "
        "in bf16 and reduces gradients in fp32 (half the all-gather traffic and parameter "
        "memory of a layer in use); needs --fsdp and CUDA. Default: fp32 parameters (under "
        "CUDA the step already runs in bf16 autocast).",
    )

    def __post_init__(self):
        check(
            self.mixed_precision in (None, "bf16"),
            f"parallel.mixed_precision must be bf16 or unset, got {self.mixed_precision!r}",
        )
        check(
            self.mixed_precision is None or self.fsdp,
            "parallel.mixed_precision=bf16 needs --fsdp (DDP keeps fp32 parameters; the step "
            "runs in bf16 autocast on CUDA already)",
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    student: str = setting(doc="Student model folder (init-student or any causal LM).", flag=True)
    out: str = setting(doc="Run directory (metrics, checkpoints, final model).", flag=True)
    steps: int = setting(doc="Optimizer steps.", flag=True)
    seed: int = setting(
        0, "Seed of the model's dropout, the data order and the shuffle.", flag=True
    )
    data: DataConfig = section(DataConfig, "What to read.", required=True)
    loss: LossConfig = section(LossConfig, "The objective.")
    optim: OptimConfig = section(OptimConfig, "The optimizer and schedule.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Saving and resuming.")
    eval: EvalConfig = section(EvalConfig, "Held-out evaluation.")
    parallel: ParallelConfig = section(ParallelConfig, "Data parallelism.")
    log_every: int = setting(1, "Write a metrics record every N steps (a host sync each).")
    progress: bool = setting(True, "Show a progress bar.", flag="--progress/--quiet")
    tensorboard: bool = setting(True, "Also log to TensorBoard when it is installed.")

    def __post_init__(self):
        check_local(self.student, "--student")
        check_local(self.out, "--out")
        check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        check(0 <= self.seed < 2**63, f"seed must be in 0..2^63-1, got {self.seed}")
        check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")


# Settings a resumed run may change: they touch neither the data order nor the math.
RESUME_SAFE = (
    "steps",
    "log_every",
    "progress",
    "tensorboard",
    "checkpoint.every",
    "checkpoint.resume",
    "checkpoint.preempt_signals",
    "checkpoint.preempt_exit_code",
    "checkpoint.background",
    "eval.cache",
    "eval.every",
    "eval.sequences",
    "data.prefetch",
    "data.read_ahead",
    "loss.backend",
    "parallel.fsdp",
    "parallel.activation_checkpointing",
    "parallel.compile",
    "out",
    "student",
    "data.cache",
    "data.teacher_cache",
)
