"""Run a command that may hang (a multi-process launch) with a hard time limit."""
import os
import signal
import subprocess
import time

import pytest


def launch(args: list, env: dict, timeout: float = 150) -> tuple[subprocess.CompletedProcess, float]:
    """Run to completion; past `timeout` kill the whole process group (launcher and workers) and fail."""
    start = time.monotonic()
    proc = subprocess.Popen([str(a) for a in args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, args))} still ran after {timeout} s (hung?)\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err), time.monotonic() - start


def run_forked(fn, args: tuple, nprocs: int = 2, timeout: float = 120) -> None:
    """torch.multiprocessing's forked workers, joined with a deadline: a worker hung in a collective (or in
    gloo's teardown) fails the test instead of blocking the whole suite."""
    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, start_method="fork", join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__}: workers still ran after {timeout} s (hung?)")
