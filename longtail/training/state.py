"""What training holds while it runs: the `Loop` (model, optimiser, schedule, ...) and each process's
mid-epoch state that a checkpoint saves.

Layer: training. Imports the foundation, the building blocks and `training.stopping`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longtail.config import Config
from longtail.progress import duration
from longtail.runtime import rng_state
from longtail.training.stopping import StopFlag


@dataclass
class Loop:
    """What the step loop works with, built once per run by `fit`."""

    cfg: Config
    model: nn.Module
    method: Any
    step_fn: nn.Module  # the method's loss on the model, DDP-wrapped under torchrun
    compiled_step: Any  # step_fn, or its torch.compile'd form
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device
    steps_per_epoch: int  # optimiser steps
    out: Path
    trackers: Any  # training.trackers.Trackers: rank 0's experiment trackers (none on the other ranks)
    stop: StopFlag
    best: dict
    started: tuple[float, int] = (0.0, 0)  # (time.perf_counter(), optimiser steps done) when this process began training
    segments: list = field(default_factory=list)  # where each (re)started part of the run ran (results.json)


def run_eta(loop: Loop) -> str:
    """Time left in the run at this process's pace since it began training, evaluations included."""
    began, steps_then = loop.started
    done, total = loop.scheduler.last_epoch, loop.cfg.train.epochs * loop.steps_per_epoch
    if done <= steps_then:
        return "?"
    return duration((time.perf_counter() - began) / (done - steps_then) * (total - done))


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf for name, buf in model.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def rank_state(model: nn.Module, aug_gen: torch.Generator, sums: dict, seen: int) -> dict:
    """What differs between ranks in the middle of an epoch: RNG and augmentation streams, BN statistics
    (averaged only at epoch ends), the logged sums."""
    return {"rng": rng_state(), "aug": aug_gen.get_state(), "seen": seen,
            "sums": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in sums.items()},
            "bn": {k: v.detach().cpu() for k, v in bn_buffers(model).items()}}

