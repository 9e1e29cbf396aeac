"""Running a model over a whole split in eval mode: logits, penultimate features, metrics.

Every such pass (evaluation, post-hoc searches, calibration, feature collection for analysis and second
stages, MORE's diagnostics) goes through `run_split`: the eval transform, each sample exactly once across
processes, and one mode-restore rule.

Layer: run services. Imports the foundation and the building blocks (distributed, metrics, progress, task, data).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from longtail import distributed as dist
from longtail.config import Config
from longtail.data import LTData
from longtail.errors import DivergedError
from longtail.metrics import gather_unique, tta_logits
from longtail.progress import Progress
from longtail.task import task_of


@torch.no_grad()
def collect_logits(
    model: nn.Module, split: Any, device: torch.device, batch_size: int = 512, tta: str = "none",
    desc: str = "evaluate",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of a whole split, in split order, each sample exactly once across processes.
    `desc` names the pass in its progress."""
    was_training = model.training
    model.eval()
    logits, targets, idxs = [], [], []
    batches = split.batches(batch_size, sampler=None, seed=0, epoch=0, rank=dist.rank(), world=dist.world_size(),
                            tta=tta)
    with Progress(math.ceil(len(split) / dist.world_size()), desc, "img") as progress:  # this rank's share
        for x, y, idx in batches:
            x = split.to_input(x, device, train=False, generator=None, tta=tta)
            z = tta_logits(model, x, tta)
            logits.append(z.float().cpu())
            targets.append(y)
            idxs.append(idx)
            progress.update(len(y))
    model.train(was_training)
    return gather_unique(torch.cat(logits), torch.cat(targets), torch.cat(idxs))[:2]


def evaluate(model: nn.Module, split: Any, device: torch.device, cfg: Config, data: LTData,
             desc: str = "evaluate") -> dict:
    logits, targets = collect_logits(model, split, device, cfg.eval.batch_size, cfg.eval.tta, desc)
    if not torch.isfinite(logits).all():
        # Weights can explode while the training loss stays finite; such a model must not be recorded or exported.
        raise DivergedError("the model's logits are not finite (its weights exploded though the training loss stayed "
                            "finite); nothing was recorded for this epoch and the last good checkpoint is kept. Try a "
                            "lower optim.lr, a longer schedule.warmup_epochs or train.amp=false.")
    return task_of(data).summarize(logits, targets, data, cfg)

