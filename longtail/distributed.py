"""Multi-process training under `torchrun`: process group, gradient averaging, consistent BN statistics.

Gradients are averaged with an explicit all-reduce after backward instead of wrapping the model in
DistributedDataParallel: methods call `model.features()` and `model.head()` directly and MORE runs two
forward passes per backward, neither of which DDP's single-`forward()` hooks support.

The functions that communicate are collectives: every rank must call them, in the same order, or the
ranks wait for each other until the process-group timeout.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from longtail.errors import ConfigError

_created_here = False  # whether `init_from_env` made the process group (and `cleanup` may destroy it)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_kind: str) -> torch.device | None:
    """Join the process group `torchrun` describes in the environment; None when not launched by it.

    Collectives give up after LONGTAIL_DIST_TIMEOUT seconds (default 600), so a rank whose peers died
    outside `torchrun` (which itself stops all workers when one fails) raises instead of hanging.
    """
    global _created_here
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda" and local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                          "start at most that many processes per machine (torchrun --nproc_per_node)")
    timeout = timedelta(seconds=int(os.environ.get("LONGTAIL_DIST_TIMEOUT", "600")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo", timeout=timeout)
        _created_here = True
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def broadcast_model(model: nn.Module) -> None:
    """Start every process from rank 0's parameters and buffers."""
    if world_size() == 1:
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def average_gradients(model: nn.Module) -> None:
    """Replace every gradient by its mean over ranks, in one all-reduce.

    A parameter that got no gradient on some rank (its batch skipped a branch) counts as zero there, and
    has a gradient afterwards on every rank if it had one on any: all ranks then step the same parameters
    by the same amounts, and the all-reduce has the same length everywhere.
    """
    if world_size() == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
    flat = torch.cat([*grads, has_grad.to(grads[0].dtype)])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, got in zip(params, flat[-len(params):].tolist()):
        piece = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if got == 0:
            continue
        if p.grad is None:
            p.grad = piece.to(p.dtype).clone()
        else:
            p.grad.copy_(piece)


def average_bn_stats(model: nn.Module) -> None:
    """Set BN running means and variances to their mean over ranks.

    Each rank updated them on its own batches, so without this the ranks would evaluate (and rank 0 would
    checkpoint) different models. The mean uses every rank's batches; broadcasting rank 0's would discard
    the others. With `train.sync_bn` they are already equal and this changes nothing.
    """
    if world_size() == 1:
        return
    stats = [
        buf
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for buf in (m.running_mean, m.running_var)
        if buf is not None
    ]
    if not stats:
        return
    flat = torch.cat([s.reshape(-1).double() for s in stats])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for s in stats:
        s.copy_(flat[offset:offset + s.numel()].view_as(s))
        offset += s.numel()


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """`train.sync_bn`: BN layers normalise with statistics of the global batch (all ranks together)."""
    if world_size() == 1:
        return model
    if device.type == "cpu":
        raise ConfigError("train.sync_bn: torch's SyncBatchNorm runs only on GPUs and this run has CPU processes; "
                          "set train.sync_bn=false (BN running statistics are still averaged over the processes "
                          "before every evaluation and checkpoint)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each key's mean over the ranks that logged it.

    The ranks first agree on the union of their keys: reducing key by key would hang as soon as one
    rank logged a key the others did not (each all-reduce waits for every rank).
    """
    if world_size() == 1:
        return dict(values)
    key_lists: list[list[str]] = [[] for _ in range(world_size())]
    dist.all_gather_object(key_lists, list(values))
    keys = list(dict.fromkeys(k for ks in key_lists for k in ks))
    if not keys:
        return {}
    rows = [[float(values.get(k, 0.0)), float(k in values)] for k in keys]
    table = torch.tensor(rows, dtype=torch.float64, device=device)
    dist.all_reduce(table)
    return {k: total / count for k, (total, count) in zip(keys, table.tolist())}


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group if `init_from_env` made it (a caller's own group is left alone)."""
    global _created_here
    if _created_here and dist.is_initialized():
        dist.destroy_process_group()
    _created_here = False
