"""Stop signals (preemption, requeue): the flag the step loop reads, and the error that ends a stopped run.

Layer: training. Imports the foundation and the building blocks (distributed).
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

import torch

from longtail import distributed as dist
from longtail.errors import ConfigError, LongtailError


class Preempted(LongtailError):
    """A stop signal (preemption, requeue) ended training after a checkpoint; rerun with --resume."""

    exit_code = 143  # 128 + SIGTERM: what a scheduler expects of a job that stopped on its signal


def stop_signals() -> list[signal.Signals]:
    """The signals that stop training at the next step boundary: $LONGTAIL_STOP_SIGNALS (names, comma-separated),
    default TERM, USR1, USR2 (torchrun forwards TERM and kills its workers 30 s later; submitit sends USR2)."""
    names = os.environ.get("LONGTAIL_STOP_SIGNALS", "TERM,USR1,USR2")
    chosen = []
    for name in filter(None, (n.strip().upper() for n in names.split(","))):
        try:
            chosen.append(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
        except KeyError:
            raise ConfigError(f"LONGTAIL_STOP_SIGNALS: {name!r} is not a signal name; use e.g. TERM,USR1,USR2") from None
    return chosen


class StopFlag:
    """Set by a stop signal; read by the step loop at its next check, where the ranks agree on it."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in stop_signals():
                self._previous[sig] = signal.signal(sig, self._set)
        return self

    def _set(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def read_flags(flags: torch.Tensor, stop: StopFlag) -> tuple[bool, bool]:
    """(a loss was non-finite, a stop was asked for) on any rank: the step loop's one wait for the device."""
    both = torch.stack([flags.float(), torch.tensor(float(stop.signum is not None), device=flags.device)])
    if dist.world_size() > 1:
        both = dist.all_reduce(both, op="max")
    bad, stopping = both.tolist()
    return bad > 0, stopping > 0

