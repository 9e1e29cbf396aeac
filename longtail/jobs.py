"""What `longtail sweep` and its SLURM backend share: a sweep point, how it ended, the `train` command that
runs it, and what its log and run directory say afterwards.

Layer: tools. Imports the standard library and the foundation's file reading; `slurm` and `sweep` import it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from longtail.checkpoint import read_json


@dataclass
class Point:
    name: str  # the run directory's name, from the varied keys and the seed: `loss.name=la,seed=1`
    config: str  # the YAML config
    overrides: list[str]  # the config's overrides, then the point's own
    out: Path


@dataclass
class Outcome:
    point: Point
    status: str  # finished | skipped | failed | stopped
    seconds: float = 0.0
    returncode: int = 0
    message: str = ""
    results: Optional[dict] = field(default=None, repr=False)


def train_command(point: Point, data_root: Optional[str], download: bool) -> list[str]:
    cmd = [sys.executable, "-m", "longtail", "train", point.config, *point.overrides, "--out", str(point.out),
           "--resume"]
    if data_root:
        cmd += ["--data-root", data_root]
    if download:
        cmd.append("--download")
    return cmd


def last_error(log: Path) -> str:
    """The `longtail train: error: ...` line of a failed run's log, else its last line."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [line for line in lines if line.startswith("longtail train: ")]
    return (errors or lines or ["(no output)"])[-1][:500]


def read_results(point: Point) -> Optional[dict]:
    path = point.out / "results.json"
    return read_json(path) if path.exists() else None
