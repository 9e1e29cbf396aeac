"""Where a run ran: recorded in results.json so a number can be traced to code and hardware."""
from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch


def git_commit() -> Optional[str]:
    """The commit of the checkout this package runs from; None when it is not a git checkout (an
    installed wheel) or git is missing. A `+dirty` suffix marks uncommitted changes to tracked files."""
    where = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of /proc/cpuinfo's first processor."""
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def cpu_model(cpuinfo: Optional[str] = None) -> str:
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def native_bf16(cpuinfo: Optional[str] = None) -> Optional[str]:
    """The CPU's native bfloat16 instructions (AMX, AVX512-BF16) by name, or None: where bfloat16 autocast is
    faster than float32 rather than emulated."""
    flags = cpu_flags(_cpuinfo() if cpuinfo is None else cpuinfo)
    found = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return " and ".join(found) or None


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"commit": git_commit(), "torch": str(torch.__version__), "device": str(device) + (f" ({name})" if name else ""),
            "cpu": cpu_model(), "threads": torch.get_num_threads()}


def segment(device: torch.device, epoch: int, step: int, precision: str) -> dict:
    """One (re)started stretch of a run, from `epoch` / `step` (0-based, where it began) on: where that part ran."""
    return {"epoch": epoch, "step": step, **environment(device), "precision": precision,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
