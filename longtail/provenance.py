"""Where a run ran: recorded in results.json so a number can be traced to code and hardware."""
from __future__ import annotations

import subprocess
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


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"commit": git_commit(), "torch": torch.__version__, "device": str(device) + (f" ({name})" if name else "")}
