"""Data parallelism under torchrun: the process group, the device, DDP or FSDP2 wrapping,
and full (unsharded) state dicts for checkpoints.

Without torchrun (no WORLD_SIZE) everything is a single process and nothing is wrapped.
NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsekd.errors import RunError


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _env_int(name: str, default: str) -> int:
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise RunError(f"environment variable {name}={value!r} is not an integer") from None


def env_rank_world() -> tuple[int, int]:
    """(rank, world size): the process group's when one is up, else torchrun's environment
    (RANK, WORLD_SIZE), else (0, 1). The one place these variables are read."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return _env_int("RANK", "0"), _env_int("WORLD_SIZE", "1")


def init() -> Dist:
    """The process group (under torchrun: WORLD_SIZE > 1), or one process. A distributed
    environment left half set (WORLD_SIZE or RANK without MASTER_ADDR) is refused by name."""
    _, world = env_rank_world()
    if world > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
        if missing:
            raise RunError(
                f"WORLD_SIZE={world} is set but {', '.join(missing)} is not: launch with "
                "torchrun, or unset WORLD_SIZE for one process"
            )
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Dist(rank, world, device)


def wrap(module: torch.nn.Module, decoder_layers, d: Dist, fsdp: bool, bf16: bool = False):
    """The module the step calls: DDP, FSDP2 (each decoder layer a unit, the root last;
    `bf16`: parameters gathered and used in bf16, gradients reduced in fp32), or the module
    itself on one process."""
    if bf16 and (d.device.type != "cuda" or d.world == 1 or not fsdp):
        raise RunError(
            "parallel.mixed_precision=bf16 needs FSDP2 on CUDA under torchrun with more than "
            f"one rank; this run: {d.world} rank(s) on {d.device.type}"
        )
    if d.world == 1:
        return module
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        kw = {"mp_policy": mp} if bf16 else {}
        for layer in decoder_layers:
            fully_shard(layer, **kw)
        fully_shard(module, **kw)
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def agree(d: Dist, make):
    """`make()` on every rank, with one verdict: a user error (a SparsekdError) on any rank
    stops every rank here, before any of them goes on to the next collective. The rank that
    hit it raises its own one-line error; the others raise one naming that rank. Under
    torchrun every rank then ends with one line and exit status 2, none in a collective."""
    from sparsekd.errors import SparsekdError

    mine = None
    try:
        value = make()
    except SparsekdError as e:
        mine, value = e, None
    if d.world > 1:
        first = torch.tensor([float(d.rank if mine is not None else d.world)], device=d.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)  # the lowest rank that refused
        bad = int(first.item())
        if mine is None and bad < d.world:
            raise RunError(f"rank {bad} refused the run (its line says why); rank {d.rank} stops")
    if mine is not None:
        raise mine
    return value


def all_finite(params, d: Dist) -> bool:
    """Whether every parameter is finite on every rank (a collective, and a host sync).
    Under FSDP2 each rank checks its own shards (DTensor locals)."""
    local = [p.detach() for p in params]
    local = [p.to_local() if hasattr(p, "to_local") else p for p in local]
    ok = torch.stack([p.isfinite().all() for p in local]).all().to(torch.float32)
    if d.world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def full_state(model, opt=None):
    """Full model and optimizer state dicts on the CPU (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=o)
    osd = get_optimizer_state_dict(model, opt, options=o) if opt is not None else None
    return msd, osd


def load_full_state(model, opt, model_sd, optim_sd) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=o)
    set_optimizer_state_dict(model, opt, optim_sd, options=o)


def _one() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def save_sharded(path, model, opt, background: bool = False):
    """Model and optimizer state with torch.distributed.checkpoint (a collective): each
    rank writes its own part (its FSDP2 shards; replicated DDP state is spread over the
    ranks), nothing is gathered. Loadable on another number of ranks.

    `background`: the state is first copied to host memory (the caller may then change
    the model), and written by a thread, whose collectives use a process group of their
    own; returns the write's Future (`wait_sharded` takes its result). Else None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    with _named_write_errors(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process
        if not background:
            dcp.save(state, storage_writer=_writer(path), no_dist=_one())
            return None
        # the writer stages: a fresh host copy of every tensor, made before this returns
        return dcp.async_save(
            state, storage_writer=_writer(path), process_group=_checkpoint_group(), no_dist=_one()
        )


def wait_sharded(future) -> None:
    """The end of a background write (its errors raised as `save_sharded` raises them)."""
    with _named_write_errors():
        future.result()


_GROUP = None


def _checkpoint_group():
    """A gloo group for background checkpoint writes, created once (a collective: every
    rank creates it at the same save): its collectives never meet the training's."""
    global _GROUP
    if _one():
        return None
    if _GROUP is None:
        _GROUP = dist.new_group(backend="gloo")
    return _GROUP


@contextlib.contextmanager
def _named_write_errors():
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:  # a BaseException: every rank gets every rank's failure
        refused = [f for f, *_ in e.failures.values() if isinstance(f, OSError)]
        if refused:  # a disk that refused a rank's writes: named by its errno on every rank
            raise refused[0] from e
        raise


def _writer(path):
    """DCP's file writer, whose failed writes report the OSError the file raised: torch's
    zip writer turns it into "unexpected pos ..." otherwise."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    class Stream:
        def __init__(self, raw, refused: list):
            self._raw, self._refused = raw, refused

        def write(self, data):
            try:
                return self._raw.write(data)
            except OSError as e:
                self._refused.append(e)
                raise

        def __getattr__(self, name):
            return getattr(self._raw, name)

    class Recording(FileSystem):
        def __init__(self):
            self.refused: list[OSError] = []

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            with super().create_stream(path, mode) as raw:
                yield Stream(raw, self.refused) if "r" not in mode else raw

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            try:
                return super().write_data(plan, planner)
            except Exception:
                if self.fs.refused:
                    raise self.fs.refused[0] from None
                raise

    w = Writer(str(path))
    w.fs = Recording()
    return w


def load_sharded(path, model, opt) -> None:
    """The inverse of `save_sharded`, resharded to this run's layout (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=_one())
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
