"""Running a model over a whole split in eval mode: logits, penultimate features, metrics.

Every such pass (evaluation, post-hoc searches, calibration, feature collection for analysis and second
stages, MORE's diagnostics) goes through `run_split`: the eval transform, each sample exactly once across
processes, and one mode-restore rule.

Layer: run services. Imports the foundation and the building blocks (distributed, metrics, progress, task, data).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

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
def run_split(model: nn.Module, split: Any, device: torch.device, forward: Callable[[torch.Tensor], torch.Tensor],
              batch_size: int = 512, desc: str = "evaluate", tta: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """`forward` of every input batch of `split` (eval transform, eval mode) as float32 on the CPU, and the
    targets, in split order, each sample exactly once across processes. `desc` names the pass in its progress.

    Each module gets its own `training` flag back afterwards, not the model's: a frozen BatchNorm of a
    second stage stays in eval mode."""
    modes = [m.training for m in model.modules()]
    model.eval()
    outputs, targets, idxs = [], [], []
    batches = split.batches(batch_size, sampler=None, seed=0, epoch=0, rank=dist.rank(), world=dist.world_size(),
                            tta=tta)
    try:
        with Progress(math.ceil(len(split) / dist.world_size()), desc, "img") as progress:  # this rank's share
            for x, y, idx in batches:
                x = split.to_input(x, device, train=False, generator=None, tta=tta)
                outputs.append(forward(x).float().cpu())
                targets.append(y)
                idxs.append(idx)
                progress.update(len(y))
    finally:
        for module, mode in zip(model.modules(), modes):
            module.training = mode
    # gather_unique drops the samples a distributed split repeats to even out the ranks' shares.
    return gather_unique(torch.cat(outputs), torch.cat(targets), torch.cat(idxs))[:2]


def collect_logits(
    model: nn.Module, split: Any, device: torch.device, batch_size: int = 512, tta: str = "none",
    desc: str = "evaluate", autocast: Optional[torch.dtype] = None, channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of a whole split, in split order, each sample exactly once across processes.
    `desc` names the pass in its progress; `autocast` a dtype to compute in (`eval_precision`), with
    `channels_last` image batches for a model stored so."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            return tta_logits(model, x, tta)

    return run_split(model, split, device, forward, batch_size, desc, tta)


def eval_precision(cfg: Config) -> dict:
    """`collect_logits`' precision arguments for the run's evaluations: float32 unless `eval.amp`."""
    if not cfg.eval.amp:
        return {}
    dtype = torch.bfloat16 if cfg.train.amp_dtype == "bfloat16" else torch.float16
    return {"autocast": dtype, "channels_last": cfg.train.channels_last}


def collect_features(
    model: nn.Module, split: Any, device: torch.device, batch_size: int = 512, desc: str = "features"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N x d, float32, CPU) and labels of a whole split in split order, eval transform.
    `desc` names the pass in its progress."""
    return run_split(model, split, device, model.features, batch_size, desc)


def evaluate(model: nn.Module, split: Any, device: torch.device, cfg: Config, data: LTData,
             desc: str = "evaluate") -> dict:
    logits, targets = collect_logits(model, split, device, cfg.eval.batch_size, cfg.eval.tta, desc,
                                     **eval_precision(cfg))
    if not torch.isfinite(logits).all():
        # Weights can explode while the training loss stays finite; such a model must not be recorded or exported.
        raise DivergedError("the model's logits are not finite (its weights exploded though the training loss stayed "
                            "finite); nothing was recorded for this epoch and the last good checkpoint is kept. Try a "
                            "lower optim.lr, a longer schedule.warmup_epochs or train.amp=false.")
    return task_of(data).summarize(logits, targets, data, cfg)

