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
