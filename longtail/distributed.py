"""Multi-process training under `torchrun`: process-group set-up and gradient averaging.

Gradients are averaged with an explicit all-reduce after backward instead of wrapping the model in
DistributedDataParallel: methods call `model.features()` and `model.head()` directly and MORE runs two
forward passes per backward, neither of which DDP's single-`forward()` hooks support.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_kind: str) -> torch.device | None:
    """Join the process group `torchrun` describes in the environment; None when not launched by it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    backend = "nccl" if device_kind == "cuda" else "gloo"
    timeout = timedelta(seconds=int(os.environ.get("LONGTAIL_DIST_TIMEOUT", "600")))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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
    if world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_mean(value: float, device: torch.device) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world_size()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
