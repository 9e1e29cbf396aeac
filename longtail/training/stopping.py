"""Stop signals (preemption, requeue): the flag the step loop reads, and the error that ends a stopped run.

Layer: training. Imports the foundation and the building blocks (distributed).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Optional

import torch

from longtail import distributed as dist
from longtail.errors import ConfigError, LongtailError


class Preempted(LongtailError):
    """A stop signal (preemption, requeue) or Ctrl-C ended training after a checkpoint; rerun with --resume."""

    def __init__(self, message: str, signum: Optional[int] = None):
        super().__init__(message)
        # 128 + the signal: what a scheduler expects of a job that stopped on its SIGTERM, a shell of a Ctrl-C
        self.exit_code = 130 if signum == signal.SIGINT else 143


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
    """Set by a stop signal or a first Ctrl-C; read by the step loop at its next check, where the ranks agree on
    it. A second Ctrl-C stops at once (KeyboardInterrupt), without a checkpoint."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in stop_signals():
                self._previous[sig] = signal.signal(sig, self._set)
            # Ctrl-C too, unless someone else handles or ignores it (a job started with SIGINT ignored)
            if signal.SIGINT not in self._previous and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def _set(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def _interrupt(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if dist.is_main():
            print("Ctrl-C: checkpointing at the next step, then stopping (rerun with --resume to continue); "
                  "press Ctrl-C again to stop at once, without a checkpoint", file=sys.stderr, flush=True)

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

