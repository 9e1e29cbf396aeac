"""Multi-process training under `torchrun`: process group, DistributedDataParallel, consistent BN statistics.

DDP averages the gradients of what runs inside the forward of the module it wraps, overlapping the
all-reduce with backward. Methods call `model.features()` and `model.head()` directly and MORE runs the
model twice per step, so DDP wraps the whole loss computation (`MethodStep`), not the bare model.

The functions that communicate are collectives: every rank must call them, in the same order, or the
ranks wait for each other until the process-group timeout. Every collective of the package goes through
this module, and each puts its tensors on `comm_device()` first: a process group serves only the
device types its backend map names (NCCL: CUDA alone), so a CPU tensor handed to an NCCL group fails.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from longtail.errors import ConfigError

_created_here = False  # whether `init_from_env` made the process group (and `cleanup` may destroy it)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0; before the process group exists, the process torchrun started as rank 0 (others print nothing)."""
    return rank() == 0 if dist.is_initialized() else os.environ.get("RANK", "0") == "0"


def device_for_backend_config(config: str) -> str:
    """The device type to communicate on, from a backend map such as "cpu:gloo,cuda:nccl".

    CUDA when NCCL serves it (fastest, and the tensors usually live there), else CPU when the map serves
    CPU tensors (gloo), else CUDA (a CUDA-only map, as NCCL's own).
    """
    served = dict(part.split(":", 1) for part in config.replace(" ", "").split(",") if ":" in part)
    if served.get("cuda") == "nccl":
        return "cuda"
    return "cpu" if "cpu" in served else "cuda"


def comm_device() -> torch.device:
    """The device whose tensors the default process group's collectives accept."""
    kind = device_for_backend_config(dist.get_backend_config())
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` reduced over the ranks (sum or max), on `t`'s own device; a new tensor, `t` is left alone."""
    buf = t.detach().to(comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` concatenated along dim 0 in rank order, on `t`'s device; row counts may differ."""
    device = comm_device()
    local = t.detach().to(device)
    length = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world_size())]
    dist.all_gather(lengths, length)
    counts = [int(n) for n in torch.cat(lengths).tolist()]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(t.device)


def all_gather_object(obj: Any) -> list:
    """Every rank's picklable `obj`, in rank order (only for small, trusted, in-run values)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


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


class MethodStep(nn.Module):
    """The forward pass of one training step: `method.loss` on the model, returning (loss, logs)."""

    def __init__(self, model: nn.Module, method: Any):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor, progress: float) -> tuple[torch.Tensor, dict]:
        return self.method.loss(self.model, x, y, progress)


def training_step(model: nn.Module, method: Any, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """`MethodStep`, wrapped in DistributedDataParallel when several processes train.

    Wrapping broadcasts rank 0's parameters and buffers, so every rank starts from the same model.
    `broadcast_buffers=False`: each rank's BN running statistics follow its own batches, and
    `average_bn_stats` makes them equal before every evaluation and checkpoint.
    """
    step = MethodStep(model, method)
    if world_size() == 1:
        return step
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, find_unused_parameters=find_unused_parameters)


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
    flat = all_reduce(torch.cat([s.reshape(-1).double() for s in stats])) / world_size()
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


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that logged it.

    The ranks first agree on the union of their keys: reducing key by key would hang as soon as one
    rank logged a key the others did not (each all-reduce waits for every rank).
    """
    if world_size() == 1:
        return dict(values)
    keys = list(dict.fromkeys(k for ks in all_gather_object(list(values)) for k in ks))
    if not keys:
        return {}
    rows = [[float(values.get(k, 0.0)), float(k in values)] for k in keys]
    table = all_reduce(torch.tensor(rows, dtype=torch.float64))
    return {k: total / count for k, (total, count) in zip(keys, table.tolist())}


def barrier() -> None:
    if world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])  # NCCL would otherwise guess the device
    else:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group if `init_from_env` made it (a caller's own group is left alone)."""
    global _created_here
    if _created_here and dist.is_initialized():
        dist.destroy_process_group()
    _created_here = False
