"""The process's runtime: the device, the seeds, the global RNG state a checkpoint saves and restores.

Layer: building blocks. Imports only the foundation (errors).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from longtail.errors import ConfigError


def check_device_name(name: str) -> None:
    """That `name` names a device (not that this machine has it: a sweep for a cluster is planned on a login node)."""
    if name == "auto":
        return
    try:
        torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def select_device(name: str) -> torch.device:
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} was asked for but CUDA is not available; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int, purpose: int) -> torch.Generator:
    """A generator re-seeded per (seed, epoch, purpose): a resumed run draws exactly what the original did."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + purpose)


def rng_state() -> dict:
    """Every global generator's whole state (NumPy's with its position), so a resumed run draws on."""
    numpy_kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": keys.astype(np.int64).tolist(),
             "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(gauss)],
             "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    has_gauss, gauss = state.get("numpy_gauss", [0, 0.0])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state.get("numpy_pos", 624),
                         int(has_gauss), float(gauss)))
    random.setstate((3, tuple(state["python"]), state.get("python_gauss")))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

