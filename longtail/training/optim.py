"""The optimiser and the learning rate: the effective batch and lr, the schedule as a pure function of the step.

Layer: training. Imports the foundation and the building blocks (distributed).
"""
from __future__ import annotations

import math

import torch

from longtail import distributed as dist
from longtail.config import Config, resolve_epochs


def effective_batch_size(cfg: Config) -> int:
    """Images per optimiser step: processes x per-process batch x accumulated micro-batches."""
    return dist.world_size() * cfg.data.batch_size * cfg.train.accum_steps


def effective_lr(cfg: Config) -> float:
    """`optim.lr`, scaled by the linear rule when asked: lr * effective batch / base batch."""
    if cfg.optim.lr_scaling == "none":
        return cfg.optim.lr
    base = cfg.optim.base_batch_size or cfg.data.batch_size
    return cfg.optim.lr * effective_batch_size(cfg) / base


def build_optimizer(cfg: Config, groups: list[dict]) -> torch.optim.Optimizer:
    """A group may carry `lr_scale` (MORE's `more.general_lr_scale`): its lr is then that times the lr it would have."""
    lr = effective_lr(cfg)
    groups = [{**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": g.get("lr", lr) * g["lr_scale"]}
              if "lr_scale" in g else g for g in groups]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas))


def resolved_schedule(cfg: Config) -> dict:
    """Epoch numbers the fractional settings resolve to for this run's length."""
    epochs = cfg.train.epochs
    resolved = {
        "warmup_epochs": round(cfg.schedule.warmup_epochs * epochs, 3) if cfg.schedule.warmup_epochs < 1
        else cfg.schedule.warmup_epochs,
        "drw_start_epoch": None if cfg.loss.drw_start is None else resolve_epochs(cfg.loss.drw_start, epochs),
    }
    if cfg.schedule.name == "multistep":  # the other schedules have no milestones
        resolved["milestones"] = [resolve_epochs(m, epochs) for m in cfg.schedule.milestones]
    return resolved


def describe_schedule(cfg: Config) -> str:
    """The resolved schedule in words, for a run's first log line: `lr 0.1, warm-up 5 epochs, x0.01 after epochs
    160, 180`."""
    resolved, schedule = resolved_schedule(cfg), cfg.schedule
    parts = [f"lr {effective_lr(cfg):g}"]
    if resolved["warmup_epochs"]:
        parts.append(f"warm-up {resolved['warmup_epochs']:g} epochs")
    if schedule.name == "multistep" and resolved["milestones"]:
        epochs = resolved["milestones"]
        parts.append(f"x{schedule.gamma:g} after epoch{'s' if len(epochs) > 1 else ''} {', '.join(map(str, epochs))}")
    elif schedule.name == "cosine":
        parts.append(f"cosine to {schedule.min_lr:g} at epoch {cfg.train.epochs}"
                     + (", changed once an epoch" if schedule.step_per == "epoch" else ""))
    elif schedule.name == "constant":
        parts.append("then constant")
    if resolved["drw_start_epoch"] is not None:
        parts.append(f"class re-weighting (DRW) after epoch {resolved['drw_start_epoch']}")
    return ", ".join(parts)


def lr_factor(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at optimiser step `step`: linear warm-up, then multistep or cosine. A function of
    the step alone, so a resumed run (LambdaLR's step count restored, mid-epoch too) follows the same lrs."""
    total = cfg.train.epochs * steps_per_epoch
    w = cfg.schedule.warmup_epochs
    warmup = int(round(w * total)) if w < 1 else int(w * steps_per_epoch)  # in steps, so short runs keep it
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule.name == "multistep":
        epoch = step // steps_per_epoch
        return cfg.schedule.gamma ** sum(epoch >= m for m in resolved_schedule(cfg)["milestones"])
    if cfg.schedule.name == "cosine":
        if cfg.schedule.step_per == "epoch":  # held at the epoch's first step (after warm-up): LIFT's CosineAnnealingLR
            step = max(warmup, step - step % steps_per_epoch)
        t = (step - warmup) / max(1, total - warmup)
        floor = cfg.schedule.min_lr / effective_lr(cfg)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0

