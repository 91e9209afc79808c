"""What every benchmark records beside its figures: commit, machine, and a CSV to append to."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{platform.machine()} CPU x{os.cpu_count()} (no GPU)"


def append_csv(name: str, rows: list[dict]) -> Path:
    """Append dict rows to results/NAME (header written on first use), with commit/machine."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    rows = [{"commit": commit(), "machine": machine(), **r} for r in rows]
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    return path
