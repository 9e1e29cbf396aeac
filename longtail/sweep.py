"""`longtail sweep`: a config times a grid of settings times seeds, as ordinary run directories.

Every point runs `python -m longtail train CONFIG OVERRIDES --out DIR --resume` in a subprocess of its
own: `--resume` already starts, continues or reports a run (the requeue semantics of `train`), so a
sweep that is run again picks up exactly where the last attempt stopped. Points run `jobs` at a time
here, or as a SLURM array through submitit (`longtail.slurm`).
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue
from typing import Any, Optional

import yaml

from longtail.checkpoint import make_directory
from longtail.config import load_config, read_yaml, takes_list
from longtail.errors import ConfigError, LongtailError
from longtail.jobs import Outcome, Point, last_error, read_results, train_command
from longtail.methods import check_config
from longtail.task import get_task


def parse_grid(items: list[str]) -> list[tuple[str, list]]:
    """`KEY=[V1,V2]` (a YAML flow list) -> (KEY, [V1, V2]); list-valued keys nest: `k=[[0.5,0.75],[0.8]]`."""
    grid = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or len(key.split(".")) != 2:
            raise ConfigError(f"--grid {item!r}: expected section.key=[v1,v2,...], e.g. loss.name=[ce,la]")
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--grid {item!r}: the values are not a YAML list: {exc}") from None
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--grid {item!r}: the values must be a non-empty YAML list in brackets, e.g. {key}=[a,b]")
        if key == "train.seed":
            raise ConfigError("--grid train.seed: give seeds with --seeds 0,1,2")
        if key in (k for k, _ in grid):
            raise ConfigError(f"--grid {key}: given twice; put every value in one list")
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:  # the same point twice would run twice and count twice in the report
            raise ConfigError(f"--grid {item!r}: {key}={_value_text(repeated[0])} is given twice; give each value once")
        single = [v for v in values if v is not None and not isinstance(v, list)]
        if single and takes_list(key):
            raise ConfigError(f"--grid {item!r}: {key} takes a list and {single[0]!r} is not one; the grid needs one "
                              f"list per point, e.g. --grid '{key}=[{text.strip()}]'")
        grid.append((key, values))
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is given twice")
    return seeds


def _value_text(value: Any) -> str:
    """A value as part of a directory name: strings bare, anything else in compact flow style."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def plan(config: str, overrides: list[str], grid: list[tuple[str, list]], seeds: Optional[list[int]],
         out: str | Path) -> list[Point]:
    """Every point of the grid for every seed, each config validated before anything runs."""
    base_seed = load_config(config, overrides).train.seed
    points = []
    for values in itertools.product(*(v for _, v in grid)):
        for seed in seeds if seeds is not None else [base_seed]:
            varied = [f"{key}={_value_text(value)}" for (key, _), value in zip(grid, values)]
            name = ",".join([*varied, f"seed={seed}"]).replace("/", "_")
            # A string value is passed quoted (JSON is YAML), so `ce` stays the string "ce" and `null` is null.
            own = [f"{key}={json.dumps(value)}" for (key, _), value in zip(grid, values)] + [f"train.seed={seed}"]
            check_config(load_config(config, [*overrides, *own]))  # a bad value stops the sweep before any point runs
            points.append(Point(name, config, [*overrides, *own], Path(out) / name))
    return points


def check_points(points: list[Point]) -> list[Point]:
    """The points still to run. A directory holding another config stops the sweep, naming the keys."""
    from longtail.training.checkpointing import config_differences

    todo = []
    for point in points:
        saved = point.out / "config.yaml"
        if saved.exists():
            differ = config_differences(read_yaml(saved), load_config(point.config, point.overrides))
            if differ:
                raise ConfigError(f"{point.out} holds a run of another config (differs in {', '.join(differ[:5])}"
                                  f"{', ...' if len(differ) > 5 else ''}); remove it or choose another --out")
        if not (point.out / "results.json").exists():
            todo.append(point)
    return todo


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def slot_environments(jobs: int, cores: int, gpus: list[str], cap: Optional[int] = None) -> list[dict]:
    """The environment of each of `jobs` concurrent runs: the cores split evenly (at least one each, so
    the runs together never ask for more threads than there are cores, where jobs <= cores), at most
    `cap` each (the sweep's own OMP_NUM_THREADS: a user sharing the machine asked for no more), and with
    GPUs one GPU per run, round-robin where there are more runs than GPUs."""
    threads = str(max(1, min(cores // jobs, cap or cores)))
    envs = []
    for slot in range(jobs):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        envs.append(env)
    return envs


def thread_cap() -> Optional[int]:
    """OMP_NUM_THREADS of this process as a positive whole number, else None (unset or not a count)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


class SweepStopped(LongtailError):
    """A stop signal reached the sweep: its running points checkpointed and stopped; rerun to continue."""
    exit_code = 143  # as `train` stopped by its signal: what a scheduler expects of a job that stopped on it


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def run_local(points: list[Point], jobs: int, data_root: Optional[str], download: bool,
              log_dir: Path, on_done: Any) -> list[Outcome]:
    """Run the points `jobs` at a time, each in its own `longtail train` process; `on_done(outcome)`
    is called as each one ends. A failed point does not stop the others. A stop signal (TERM, USR1,
    USR2) is passed on to the running points, which checkpoint and exit 143 (`train`'s stop signals),
    and no further point starts: the sweep then raises SweepStopped, and the same command continues."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    slots: Queue = Queue()
    for env in slot_environments(jobs, cores, visible_gpus(), thread_cap()):
        slots.put(env)
    make_directory(log_dir)
    lock = threading.Lock()
    running: set[subprocess.Popen] = set()
    stopped = threading.Event()

    def forward(signum: int, frame: Any) -> None:
        stopped.set()
        with lock:
            for proc in running:
                proc.send_signal(signum)

    def run_one(point: Point) -> Optional[Outcome]:
        env = slots.get()
        log = log_dir / f"{point.name}.log"
        start = time.monotonic()
        try:
            with lock:
                if stopped.is_set():
                    return None
                with open(log, "a") as f:
                    f.write(f"$ {shlex.join(train_command(point, data_root, download))}\n")
                    f.flush()
                    proc = subprocess.Popen(train_command(point, data_root, download), stdout=f,
                                            stderr=subprocess.STDOUT, env={**os.environ, **env})
                running.add(proc)
            proc.wait()
            with lock:
                running.discard(proc)
        finally:
            slots.put(env)
        seconds = time.monotonic() - start
        if proc.returncode == 0:
            outcome = Outcome(point, "finished", seconds, 0, "", read_results(point))
        elif proc.returncode == SweepStopped.exit_code and stopped.is_set():
            outcome = Outcome(point, "stopped", seconds, proc.returncode, f"checkpointed (log: {log})")
        else:
            outcome = Outcome(point, "failed", seconds, proc.returncode, f"{last_error(log)} (log: {log})")
        with lock:
            on_done(outcome)
        return outcome

    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS} if main else {}
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            outcomes = [o for o in pool.map(run_one, points) if o is not None]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped.is_set():
        raise SweepStopped(f"stopped by a signal: {sum(o.status == 'stopped' for o in outcomes)} running runs "
                           f"checkpointed, {len(points) - len(outcomes)} not started; rerun the same command to continue")
    return outcomes


_HEADLINE = {False: (("All", "top1"), ("Many", "many"), ("Medium", "medium"), ("Few", "few")),
             True: (("mAP", "map"), ("Head", "map_head"), ("Medium", "map_medium"), ("Tail", "map_tail"))}


def progress_line(done: int, total: int, outcome: Outcome) -> str:
    head = f"[{done}/{total}] {outcome.point.name}"
    if outcome.status == "stopped":
        return f"{head}: stopped by a signal after {outcome.seconds:.0f} s, {outcome.message}"
    if outcome.status == "failed":
        return f"{head}: FAILED (exit {outcome.returncode}) after {outcome.seconds:.0f} s: {outcome.message}"
    r = outcome.results or {}
    headline = _HEADLINE[get_task(r.get("task")).multilabel]
    groups = ", ".join(f"{title} {r[key]:.2f}" for title, key in headline if r.get(key) is not None)
    when = "already finished" if outcome.status == "skipped" else f"{outcome.seconds:.0f} s"
    return f"{head}: {when}; {groups}"


def run_points(points: list[Point], out: str | Path, jobs: int = 1, slurm: Optional[dict] = None,
               data_root: Optional[str] = None, download: bool = False) -> list[Outcome]:
    """Skip the finished points, run the rest here or on SLURM; a progress line per run and a summary.
    A failed point does not stop the others: the outcomes say which failed."""
    if jobs < 1:
        raise ConfigError(f"--jobs: must be >= 1, got {jobs}")
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is a file; a sweep writes a directory of runs, one per point: choose another "
                          "--out")
    if any((Path(out) / name).exists() for name in ("config.yaml", "checkpoint.pt", "results.json")):
        raise ConfigError(f"--out {out} holds a single run (its config.yaml); a sweep writes a directory of runs, one "
                          "per point, and its report would not see them there: choose another --out")
    if slurm is not None:
        from longtail.slurm import check_slurm

        check_slurm(slurm, Path(out) / "slurm")
    todo = check_points(points)
    total = len(points)
    outcomes = [Outcome(p, "skipped", results=read_results(p)) for p in points if p not in todo]
    print(f"{out}: {total} runs ({len(outcomes)} already finished, {len(todo)} to run"
          f"{' on SLURM' if slurm is not None else f', {jobs} at a time'})", flush=True)
    for i, outcome in enumerate(outcomes, 1):
        print(progress_line(i, total, outcome), flush=True)

    def on_done(outcome: Outcome) -> None:
        outcomes.append(outcome)
        print(progress_line(len(outcomes), total, outcome), flush=True)

    if todo and slurm is not None:
        from longtail.slurm import run_slurm

        run_slurm(todo, slurm, data_root, download, Path(out) / "slurm", on_done)
    elif todo:
        run_local(todo, jobs, data_root, download, Path(out) / "logs", on_done)
    failed = sum(o.status == "failed" for o in outcomes)
    ran = sum(o.status == "finished" for o in outcomes)
    print(f"{out}: {ran} ran, {total - len(todo)} already finished, {failed} failed", flush=True)
    return outcomes


def raise_failures(outcomes: list[Outcome]) -> None:
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        names = ", ".join(o.point.name for o in failed)
        raise LongtailError(f"{len(failed)} of {len(outcomes)} runs failed ({names}); their logs say why. "
                            "Rerun the same command to retry them: finished runs are skipped")


def finished_runs_named(out: str | Path, name: str) -> list[str]:
    """The finished run directories in `out` of the point `name` (any seed): a recipe that another sweep into
    the same directory ran, e.g. the CE baseline beside an LDAM-DRW sweep of another config."""
    runs = [d for d in sorted(Path(out).glob(f"{name},seed=*")) if (d / "results.json").is_file()]
    return [str(d) for d in runs]


def sweep(config: str, overrides: list[str], grid: list[tuple[str, list]], seeds: Optional[list[int]], out: str,
          jobs: int = 1, slurm: Optional[dict] = None, data_root: Optional[str] = None, download: bool = False,
          baseline: Optional[str] = None) -> list[Outcome]:
    """Plan, run (`run_points`), print the report of the finished runs; raises LongtailError at the end
    when a point failed (after every other point ran)."""
    from longtail.report import report

    points = plan(config, overrides, grid, seeds, out)
    names = {p.name.rsplit(",seed=", 1)[0] for p in points}
    earlier: list[str] = []  # the baseline's runs when an earlier sweep into OUT made them
    if baseline is not None and baseline not in names and not any(Path(baseline).resolve() == p.out.resolve()
                                                                   for p in points):
        earlier = finished_runs_named(out, baseline)
        if not earlier:
            raise ConfigError(f"--baseline {baseline}: not a point of this sweep (points: {', '.join(sorted(names))}) "
                              f"nor a finished run of an earlier sweep in {out}")
    outcomes = run_points(points, out, jobs, slurm, data_root, download)
    finished = earlier + [str(p.out) for p in points if (p.out / "results.json").exists()]
    if finished:
        print(report(finished, baseline=baseline))
    raise_failures(outcomes)
    return outcomes
