"""What a run writes as it goes: `metrics.jsonl` (rank 0; TensorBoard too when installed)
and `data/rank-R.txt` (per step, the seq_ids rank R trained on: an audit trail of the data
order). On resume from step N both are cut back to step N first, so a killed and resumed
run leaves the same files as an uninterrupted one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sparsekd.errors import RunError


def truncate_lines(path: Path, step: int, step_of) -> None:
    """Keep the lines whose step (`step_of(line)`) is <= `step`. A torn last line (the trace
    of a kill while it was written) is dropped with a note; damage elsewhere is named."""
    if not path.exists():
        return
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    keep = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            at = step_of(ln)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            if i == len(lines) - 1 and not text.endswith("\n"):  # torn: the last, unfinished
                print(f"sparsekd: note: dropped the torn last line of {path}", file=sys.stderr)
                break
            raise RunError(f"{path} line {i + 1} is damaged; restore or remove the file") from e
        if at <= step:
            keep.append(ln)
    path.write_text("".join(ln + "\n" for ln in keep))


class MetricsLog:
    """metrics.jsonl on rank 0 (other ranks write nothing)."""

    def __init__(self, out: Path, rank: int, start: int, tensorboard: bool):
        self.fh = self.tb = None
        if rank != 0:
            return
        path = out / "metrics.jsonl"
        truncate_lines(path, start, lambda ln: json.loads(ln)["step"])
        self.fh = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard not installed: metrics.jsonl only
                self.tb = None

    def write(self, rec: dict) -> None:
        if self.fh is None:
            return
        self.fh.write(json.dumps(rec) + "\n")
        self.fh.flush()
        if self.tb is not None:
            values = rec.get("eval") or rec
            for k, v in values.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(("eval/" if "eval" in rec else "train/") + k, v, rec["step"])

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()


class DataLog:
    """data/rank-R.txt: "STEP seq_id seq_id ..." per step, flushed so that a killed run
    leaves complete lines up to its last checkpoint."""

    def __init__(self, out: Path, rank: int, start: int):
        path = out / "data" / f"rank-{rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        truncate_lines(path, start, lambda ln: int(ln.split()[0]))
        self.fh = open(path, "a")

    def write(self, step: int, seq_ids) -> None:
        self.fh.write(f"{step} {' '.join(map(str, seq_ids))}\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()
