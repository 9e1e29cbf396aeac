"""What a person sees while a command works, decided here for every phase that takes time.

- stderr is a terminal: a tqdm bar per phase (items, rate, time left), gone when the phase ends.
- stderr is a file or a pipe (a cluster log, nohup, CI): no bars, whose carriage returns would pile up
  into one line; a phase that runs long writes a plain line every `LINE_EVERY` seconds and one at its
  end, flushed, so `tail -f` of the log reads line by line. The training loop writes its own lines.
- `--quiet` (`set_quiet`), or any rank but 0 under torchrun: no progress and no status lines at all.

Progress goes to stderr; status lines (`say`: a run's header, its step and epoch lines) to stdout,
beside the results.
"""
from __future__ import annotations

import sys
import time
from typing import Collection, Iterator, TypeVar

from tqdm import tqdm

from longtail import distributed as dist

LINE_EVERY = 30.0  # seconds between the plain lines of one phase in a file: a long phase, not every phase

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """`--quiet`: from now on no progress and no status lines, only the commands' results."""
    global _quiet
    _quiet = quiet


def mode() -> str:
    """`off` (quiet, or a rank other than 0), `bar` (stderr is a terminal) or `lines` (a file or a pipe)."""
    if _quiet or not dist.is_main():
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


def say(message: str) -> None:
    """A status line on stdout, flushed at once (a log file is read while it grows); not when `off`."""
    if mode() != "off":
        print(message, flush=True)


def duration(seconds: float) -> str:
    """`1h02m`, `5m07s`, `42s`."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """One phase of `total` units, counted with `update(n)`; use it as a context manager.

    With `lines=False` a file gets no lines from it: for a caller that writes its own (the training loop
    writes one at each check, where it reads the logged values anyway).
    """

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, lines: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.first = initial
        self.mode = mode()
        self.plain = self.mode == "lines" and lines
        self.written = 0
        self.start = self.last = time.perf_counter()
        # Not iterated: a bar iterating with mininterval keeps its count in a local variable and shows a
        # stale one whenever it is refreshed from outside (set_postfix), e.g. 0/97 all epoch long.
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, mininterval=1.0,
                        dynamic_ncols=True) if self.mode == "bar" else None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.plain and time.perf_counter() - self.last >= LINE_EVERY:
            self.last = time.perf_counter()
            rate = self._rate()
            self._line(f"{self.n}/{self.total} {self.unit}, {rate:.0f} {self.unit}/s, "
                       f"ETA {duration((self.total - self.n) / max(rate, 1e-9))}")

    def note(self, **values: str) -> None:
        """Values shown after the bar (loss, lr); a file gets them from the caller's own lines."""
        if self.bar is not None:
            self.bar.set_postfix(values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.written:  # a phase that reported itself says when it ended
            self._line(f"{self.n} {self.unit} in {duration(time.perf_counter() - self.start)}, "
                       f"{self._rate():.0f} {self.unit}/s")

    def _rate(self) -> float:
        return (self.n - self.first) / max(time.perf_counter() - self.start, 1e-9)

    def _line(self, text: str) -> None:
        self.written += 1
        print(f"{self.desc}: {text}", file=sys.stderr, flush=True)


def track(items: Collection[T], desc: str, unit: str = "it") -> Iterator[T]:
    """`items`, each counted by a `Progress` once it is done (the caller's loop body ran)."""
    with Progress(len(items), desc, unit) as progress:
        for item in items:
            yield item
            progress.update()
