"""What a person sees while a command works, decided here for every phase that takes time.

- stderr is a terminal: a tqdm bar per phase (items, time left, rate or the caller's values), gone when
  the phase ends. On a narrow terminal the bar keeps `MIN_BAR` cells: the values after it are left out,
  the last first, rather than squeezing the bar to one cell.
- stderr is a file or a pipe (a cluster log, nohup, CI): no bars, whose carriage returns would pile up
  into one line; a phase that runs long writes a plain line every `LINE_EVERY` seconds (a download: at
  each further tenth of its bytes) and one at its end, flushed, so `tail -f` of the log reads line by
  line. The training loop writes its own lines.
- `--quiet` (`set_quiet`), or any rank but 0 under torchrun: no progress and no status lines at all.

Progress goes to stderr; status lines (`say`: a run's header, its step and epoch lines) to stdout,
beside the results.
"""
from __future__ import annotations

import sys
import time
from typing import Collection, Iterator, Optional, TypeVar

from tqdm import tqdm
from tqdm.utils import disp_len

from longtail import distributed as dist

LINE_EVERY = 30.0  # seconds between the plain lines of one phase in a file: a long phase, not every phase
MIN_BAR = 10  # cells the bar keeps on a narrow terminal
BAR_FORMAT = "{desc} |{bar}| {n_fmt}/{total_fmt} {unit}{postfix}"

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


def size(n: float) -> str:
    """Bytes as `512 B`, `17.0 MiB`, `1.2 GiB`."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def rate_text(rate: float, unit: str) -> str:
    """`1234 img/s`, `0.52 tau/s`, `3.1 MiB/s` (unit `B`)."""
    if unit == "B":
        return f"{size(rate)}/s"
    return f"{rate:.0f} {unit}/s" if rate >= 10 else f"{rate:.2g} {unit}/s"


class FittedBar(tqdm):
    """A tqdm bar showing after its count the caller's `values`, or its own time left and rate, as many
    of them as leave the bar `MIN_BAR` cells at the terminal's current width (the last go first)."""

    values: tuple[str, ...] = ()

    @property
    def format_dict(self) -> dict:
        d = super().format_dict
        shown = list(self.values)
        if not shown and d["rate"]:
            if d["total"]:
                shown.append(f"ETA {duration((d['total'] - d['n']) / d['rate'])}")
            shown.append(rate_text(d["rate"], self.unit))
        if d["ncols"]:
            rest = {**d, "ncols": None, "bar_format": BAR_FORMAT.replace("{bar}", "")}
            while shown and disp_len(self.format_meter(**{**rest, "postfix": ", ".join(shown)})) > d["ncols"] - MIN_BAR:
                shown.pop()
        return {**d, "postfix": ", ".join(shown)}


class Progress:
    """One phase of `total` units, counted with `update(n)`; use it as a context manager.

    With `lines=False` a file gets no lines from it: for a caller that writes its own (the training loop
    writes one at each check, where it reads the logged values anyway). Unit `B` counts bytes (a
    download): shown as KiB / MiB / GiB, and a file gets a line at each further tenth of `total`. A
    `total` of None (a server that does not say) shows the count without a bar.
    """

    def __init__(self, total: Optional[int], desc: str, unit: str = "it", initial: int = 0, lines: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.first = initial
        self.mode = mode()
        self.plain = self.mode == "lines" and lines
        self.written = 0
        self.tenths = 0  # of a byte count: the tenths of `total` a line has reported
        self.start = self.last = time.perf_counter()
        # Not iterated: a bar iterating with mininterval keeps its count in a local variable and shows a
        # stale one whenever it is refreshed from outside (`note`), e.g. 0/97 all epoch long.
        self.bar = FittedBar(total=total, initial=initial, desc=desc, unit=unit, leave=False, mininterval=1.0,
                             dynamic_ncols=True, bar_format=BAR_FORMAT, unit_scale=unit == "B",
                             unit_divisor=1024) if self.mode == "bar" else None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.plain and self._due():
            self.last = time.perf_counter()
            rate = self._rate()
            eta = "" if self.total is None else f", ETA {duration((self.total - self.n) / max(rate, 1e-9))}"
            if self.unit == "B":
                done = f"{size(self.n)}" + ("" if self.total is None else
                                            f" of {size(self.total)} ({100 * self.n // self.total} %)")
            else:
                done = f"{self.n}/{self.total} {self.unit}"
            self._line(f"{done}, {rate_text(rate, self.unit)}{eta}")

    def _due(self) -> bool:
        if self.unit == "B" and self.total:
            tenths = 10 * self.n // self.total
            if tenths > self.tenths and self.n < self.total:  # the end line reports the whole
                self.tenths = tenths
                return True
            return False
        return time.perf_counter() - self.last >= LINE_EVERY

    def note(self, *values: str) -> None:
        """Values shown after the bar, most important first (`loss 0.41`, `512 img/s`, `lr 1e-2`): the last
        are left out on a narrow terminal. A file gets them from the caller's own lines."""
        if self.bar is not None:
            self.bar.values = values
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.written:  # a phase that reported itself says when it ended
            done = size(self.n) if self.unit == "B" else f"{self.n} {self.unit}"
            self._line(f"{done} in {duration(time.perf_counter() - self.start)}, {rate_text(self._rate(), self.unit)}")

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
