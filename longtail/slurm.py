"""`longtail sweep --slurm`: the points as one SLURM job array, through submitit (extra `slurm`).

Each array task runs the point's `longtail train ... --resume` in a child process, one SLURM task per
GPU. Before a preemption or the time limit SLURM signals USR2; submitit then calls `TrainPoint.checkpoint`,
which passes the signal on to rank 0's `train` (which writes a mid-epoch checkpoint and exits 143; with
several processes every rank stops at the same step) and hands submitit the same point to requeue.
The requeued task runs the same `--resume` command, which continues from that checkpoint.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from longtail.checkpoint import make_directory
from longtail.errors import ConfigError
from longtail.jobs import Outcome, last_error, read_results, train_command

# How long checkpoint() waits for `train` to write its checkpoint and exit after the signal; SLURM's
# signal comes `signal_delay_s` (90 s by default) before the kill.
STOP_WAIT_S = 60


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError("--slurm needs submitit: pip install 'longtail[slurm]' (or pip install submitit)") from None
    return submitit


class TrainPoint:
    """A picklable callable: one sweep point's `train --resume`, requeued on preemption."""

    def __init__(self, command: list[str], log: str) -> None:
        self.command = command
        self.log = log
        self._proc: Optional[subprocess.Popen] = None

    def __getstate__(self) -> dict:
        return {"command": self.command, "log": self.log}  # a child process does not travel

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _proc=None)

    def __call__(self) -> int:
        submitit = _submitit()
        env = dict(os.environ)
        job = submitit.JobEnvironment()
        if job.num_tasks > 1:  # one process per GPU: the variables torchrun would set
            dist_env = submitit.helpers.TorchDistributedEnvironment()
            env.update(RANK=str(dist_env.rank), LOCAL_RANK=str(dist_env.local_rank),
                       WORLD_SIZE=str(dist_env.world_size), LOCAL_WORLD_SIZE=str(dist_env.local_world_size),
                       MASTER_ADDR=dist_env.master_addr, MASTER_PORT=str(dist_env.master_port))
        log = self.log if job.global_rank == 0 else f"{self.log}.rank{job.global_rank}"
        with open(log, "a") as f:
            self._proc = subprocess.Popen(self.command, stdout=f, stderr=subprocess.STDOUT, env=env)
            code = self._proc.wait()
        if code != 0:
            raise RuntimeError(f"longtail train exited {code}; see {log}")
        return code

    def checkpoint(self) -> Any:
        """Called by submitit on the preemption / time-limit signal: stop `train` at a checkpoint, requeue."""
        proc = self._proc
        if proc is not None and not _exited(proc):
            proc.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + STOP_WAIT_S
            while not _exited(proc) and time.monotonic() < deadline:
                time.sleep(0.2)
        return _submitit().helpers.DelayedSubmission(TrainPoint(self.command, self.log))


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it. checkpoint() runs in a signal handler that interrupts
    `__call__`'s proc.wait(), which holds Popen's waitpid lock: proc.poll() there always answers "running", so
    it waited the whole STOP_WAIT_S after every preemption. waitid(WNOWAIT) only looks."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def check_slurm(options: dict, folder: Path) -> None:
    """Before anything is written or submitted: SLURM's commands are here, and no value that goes into the
    batch script holds a control character (a newline there would start a shell command of its own; submitit
    shell-quotes each value, which covers `;`, `$(...)` and quotes)."""
    for flag, value in (("--partition", options.get("partition")), ("--out", str(folder))):
        if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in str(value)):
            raise ConfigError(f"{flag} {value!r}: holds a control character (a newline, tab, ...), which cannot go "
                              "into a SLURM batch script; remove it")
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if options.get("cluster", "slurm") == "slurm" and missing:
        raise ConfigError(f"--slurm: SLURM is not available here ({' and '.join(missing)} not on PATH); run on a "
                          "SLURM login node, or leave out --slurm (--jobs N runs the points on this machine)")


def make_executor(folder: Path, options: dict) -> Any:
    """A submitit executor for the `--slurm` options: one SLURM task per GPU (at least one task)."""
    submitit = _submitit()
    # cluster "local" runs the jobs on this machine through submitit's local executor (the tests do).
    executor = submitit.AutoExecutor(folder, cluster=options.get("cluster", "slurm"))
    gpus = options.get("gpus", 0)
    # One task per GPU; without GPUs `tasks` CPU processes (the tests' two-process job), else one.
    params = {"name": "longtail-sweep", "timeout_min": options.get("time", 60), "nodes": 1,
              "tasks_per_node": gpus or options.get("tasks", 1), "cpus_per_task": options.get("cpus", 4)}
    if gpus:
        params["gpus_per_node"] = gpus
    if options.get("partition"):
        params["slurm_partition"] = options["partition"]
    executor.update_parameters(**params)
    return executor


def submit(points: list, options: dict, data_root: Optional[str], download: bool,
           folder: Path) -> list:
    """Submit the points as one array; returns the submitit jobs in the points' order."""
    check_slurm(options, folder)
    make_directory(folder)
    executor = make_executor(folder, options)
    calls = [TrainPoint(train_command(p, data_root, download), str(folder / f"{p.name}.log"))
             for p in points]
    with executor.batch():
        jobs = [executor.submit(call) for call in calls]
    for point, job in zip(points, jobs):
        print(f"submitted {point.name}: job {job.job_id}", flush=True)
    return jobs


def run_slurm(points: list, options: dict, data_root: Optional[str], download: bool,
              folder: Path, on_done: Any) -> None:
    """Submit, then wait, reporting each point as its job ends (in the order they end)."""
    jobs = submit(points, options, data_root, download, folder)
    start = time.monotonic()
    pending = list(zip(points, jobs))
    while pending:
        for point, job in [pj for pj in pending if pj[1].done()]:
            pending.remove((point, job))
            seconds = time.monotonic() - start
            try:
                job.results()  # every task's (one per process); raises the failure of any
                on_done(Outcome(point, "finished", seconds, 0, "", read_results(point)))
            except Exception as exc:  # submitit re-raises the job's failure here; one failure stops nothing
                log = folder / f"{point.name}.log"
                on_done(Outcome(point, "failed", seconds, 1, f"{last_error(log) if log.exists() else exc} "
                                f"(log: {log}; submitit: {job.paths.stderr})"))
        if pending:
            time.sleep(options.get("poll_s", 10))
