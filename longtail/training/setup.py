"""Everything a run builds before its first epoch: device, data, model, method (`Run`).

Layer: training. Imports everything below it (foundation, building blocks, run services, methods).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from longtail import distributed as dist
from longtail.config import HEAD_ONLY_METHODS, Config
from longtail.data import LTData, build_data, resize_inputs
from longtail.data.splits import InMemorySplit
from longtail.errors import ConfigError
from longtail.finetune import apply_finetune
from longtail.methods import build_method, check_config
from longtail.methods.base import RunInfo
from longtail.methods.weight_balancing import load_init
from longtail.models import build_model
from longtail.models.hf import HF_MODELS, init_text_head
from longtail.models.hf import input_size as hf_input_size
from longtail.models.hf import normalisation as hf_normalisation
from longtail.rundir import eval_transform
from longtail.runtime import seed_everything, select_device
from longtail.task import task_of


@dataclass
class Run:
    """Everything `fit` builds before the first epoch."""

    cfg: Config
    data: LTData
    model: nn.Module
    method: Any
    info: RunInfo
    device: torch.device


def setup(cfg: Config, data_root: Optional[str] = None, download: bool = False, run_dir: Optional[Path] = None) -> Run:
    check_config(cfg)  # the method's own rules, before the data, the device or the process group
    device = select_device(cfg.train.device)
    device = dist.init_from_env(device.type) or device
    if cfg.train.amp and cfg.train.amp_dtype == "float16" and device.type != "cuda":
        # CPU autocast in float16 is slow and has no loss scaling: refuse rather than train in another precision.
        raise ConfigError(f"train.amp with train.amp_dtype: float16 needs a CUDA device and this run is on {device}; "
                          "on a CPU use train.amp_dtype=bfloat16 (or --fast), or train.amp=false")
    if cfg.eval.amp and cfg.train.amp_dtype == "float16" and device.type != "cuda":
        raise ConfigError(f"eval.amp evaluates in train.amp_dtype, float16, which needs a CUDA device and this run is "
                          f"on {device}; on a CPU set train.amp_dtype=bfloat16 (or --fast), or eval.amp=false")
    seed_everything(cfg.train.seed)
    if cfg.data.root is not None:  # saved absolute, so that `longtail eval` finds the data from any directory
        cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
    if cfg.model.name in HF_MODELS and cfg.data.mean is None and cfg.data.std is None:
        cfg.data.mean, cfg.data.std = hf_normalisation(cfg.model)  # the checkpoint's, not the dataset's
    data = build_data(cfg.data, data_root, download)
    if cfg.model.name in HF_MODELS and cfg.data.resize_to is None and isinstance(data.train, InMemorySplit):
        size = hf_input_size(cfg.model)  # e.g. 224: CIFAR's 32-pixel images are resized to it on the device
        if size != data.image_size:
            cfg.data.resize_to = size
            resize_inputs(data, size)
    eval_transform(data, cfg.eval.tta)  # refuses a TTA the data cannot give, before any work
    task = task_of(data)
    task.check(cfg)
    if data.val is None and (cfg.eval.select == "best_val" or cfg.eval.split == "val"):
        raise ConfigError(f"eval.select={cfg.eval.select} / eval.split={cfg.eval.split} need a validation split and "
                          f"{data.name} has none here: set data.val_per_class (e.g. 20) or give data.val_list")
    if data.val is None and cfg.posthoc.kind != "none" and cfg.posthoc.tau is None:
        raise ConfigError(f"posthoc.tau: null means searching tau on the validation split, and {data.name} has none "
                          "here: set data.val_per_class (e.g. 20) or give a fixed posthoc.tau")
    if data.val is None and cfg.posthoc.calibrate != "none":
        raise ConfigError(f"posthoc.calibrate: {cfg.posthoc.calibrate} is fitted on the validation split, and {data.name} "
                          "has none here: set data.val_per_class (e.g. 20) or give data.val_list, or posthoc.calibrate: none")
    # Resolve dataset defaults into the config so the saved config.yaml shows what was used.
    cfg.data.mean, cfg.data.std = list(data.mean), list(data.std)
    place_splits(data, device, cfg.data.on_device)
    model = build_model(cfg.model, data.num_classes, data.in_channels, data.image_size)
    if cfg.model.head_init == "text":
        init_text_head(model, cfg.model, list(data.class_names))
    if cfg.method.init_from is not None and cfg.method.name not in HEAD_ONLY_METHODS:
        # Any one-stage method starts from an earlier run's model.pt; the second stages load it themselves.
        load_init(model, cfg)
    model = apply_finetune(model, cfg)
    if cfg.train.grad_checkpoint:
        if not hasattr(model, "enable_grad_checkpoint"):
            raise ConfigError(f"train.grad_checkpoint: model {cfg.model.name} does not support it; "
                              "hf_clip and hf_vit do")
        model.enable_grad_checkpoint()
    batches = data.train.num_batches(cfg.data.batch_size, world=dist.world_size(), drop_last=False)
    steps = math.ceil(batches / cfg.train.accum_steps)  # optimiser steps: what schedules and progress count
    info = RunInfo(cfg=cfg, num_classes=data.num_classes, class_counts=list(data.class_counts),
                   epochs=cfg.train.epochs, steps_per_epoch=steps, device=device, data=data,
                   run_dir=str(run_dir) if run_dir else None, task=task.name)
    method = build_method(cfg, info, task.build_loss(cfg, data))
    model = method.prepare(model).to(device)
    if cfg.train.sync_bn:
        model = dist.convert_sync_batchnorm(model, device)
    if cfg.train.channels_last:  # on a CPU too: oneDNN's convolutions are faster in NHWC, most of all in bfloat16
        model = model.to(memory_format=torch.channels_last)
    return Run(cfg, data, model, method, info, device)


def place_splits(data: LTData, device: torch.device, on_device: str) -> None:
    """`data.on_device`: hold in-memory splits on the training device (auto: a GPU with room to spare)."""
    splits = [s for s in (data.train, data.val, data.test) if s is not None]
    if on_device == "false":
        return
    if not all(isinstance(s, InMemorySplit) for s in splits):
        if on_device == "true":
            raise ConfigError(f"data.on_device: true holds in-memory datasets (cifar10_lt, cifar100_lt, "
                              f"fashion_mnist_lt) on the device, but {data.name} decodes image files in loader "
                              "workers; use data.on_device: auto or false")
        return
    if on_device == "auto":
        if device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(device)
        if sum(s.images.numel() * s.images.element_size() for s in splits) > free / 2:
            return
    for s in splits:
        s.to_device(device)

