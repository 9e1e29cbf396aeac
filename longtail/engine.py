"""The one training engine: every method runs through `fit`.

    fit: build data, model, method -> for each epoch: train_one_epoch, evaluate, checkpoint
         -> select the checkpoint -> method.finalize (merge, fold) -> post-hoc adjustment
         -> temperature calibration -> results.json, model.pt + model.yaml
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from torch import nn

from longtail import distributed as dist
from longtail.calibration import calibration_record, fit_temperature
from longtail.checkpoint import (append_line, atomic_torch_save, atomic_write_json, atomic_write_text, load_checkpoint,
                                 read_json, read_jsonl, remove_stale_temporaries, run_lock)
from longtail.config import Config, flatten, flatten_saved, from_dict, read_yaml, resolve_epochs, save_config
from longtail.data import LTData, build_data, resize_inputs
from longtail.data.image_transforms import LIFT_EXPAND, eval_resize
from longtail.data.splits import InMemorySplit
from longtail.errors import ConfigError, DivergedError, LongtailError
from longtail.finetune import adapter_spec, apply_finetune, parameter_counts, part_groups
from longtail.lowrank import merge
from longtail.losses import logit_scale
from longtail.methods import build_method
from longtail.methods.base import RunInfo
from longtail.metrics import format_table, gather_unique, tta_logits
from longtail.mixing import Mixer
from longtail.models import build_model, load_exported, model_spec, scale_head
from longtail.models.hf import HF_MODELS, init_text_head
from longtail.models.hf import input_size as hf_input_size
from longtail.models.hf import normalisation as hf_normalisation
from longtail.priors import logit_prior, logit_prior_vector
from longtail.progress import Progress, duration, say
from longtail.provenance import environment, native_bf16, segment
from longtail.task import get_task, task_of

# Keys that may differ between a run and its resumption without changing what is computed.
RESUME_FREE_KEYS = {"data.root", "data.num_workers", "data.on_device", "train.device", "train.log_every",
                    "train.checkpoint_every", "train.find_unused_parameters"}


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} was asked for but CUDA is not available; use auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int, purpose: int) -> torch.Generator:
    """A generator re-seeded per (seed, epoch, purpose): a resumed run draws exactly what the original did."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + purpose)


# ----------------------------------------------------------------------------- optimisation


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
    lr = effective_lr(cfg)
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


# ----------------------------------------------------------------------------- evaluation


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


# ----------------------------------------------------------------------------- training


class Preempted(LongtailError):
    """A stop signal (preemption, requeue) ended training after a checkpoint; rerun with --resume."""

    exit_code = 143  # 128 + SIGTERM: what a scheduler expects of a job that stopped on its signal


def stop_signals() -> list[signal.Signals]:
    """The signals that stop training at the next step boundary: $LONGTAIL_STOP_SIGNALS (names, comma-separated),
    default TERM, USR1, USR2 (torchrun forwards TERM and kills its workers 30 s later; submitit sends USR2)."""
    names = os.environ.get("LONGTAIL_STOP_SIGNALS", "TERM,USR1,USR2")
    chosen = []
    for name in filter(None, (n.strip().upper() for n in names.split(","))):
        try:
            chosen.append(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
        except KeyError:
            raise ConfigError(f"LONGTAIL_STOP_SIGNALS: {name!r} is not a signal name; use e.g. TERM,USR1,USR2") from None
    return chosen


class StopFlag:
    """Set by a stop signal; read by the step loop at its next check, where the ranks agree on it."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in stop_signals():
                self._previous[sig] = signal.signal(sig, self._set)
        return self

    def _set(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
    writer: Any
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


def augmentation_summary(cfg: Config) -> str:
    """The training augmentation in its order (docs/augmentation.md), e.g. `crop_flip + autoaugment_cifar +
    cutout 16 + mixup 1.0`."""
    d = cfg.data
    policy = {"none": "", "autoaugment_cifar": d.policy,
              "randaugment": f"randaugment n={d.randaugment_n} m={d.randaugment_m}"}[d.policy]
    parts = [d.augment, policy, f"cutout {d.cutout}" if d.cutout else "",
             f"mixup {d.mixup_alpha:g}" if d.mixup_alpha else "",
             f"cutmix {d.cutmix_alpha:g}" if d.cutmix_alpha else ""]
    return " + ".join(p for p in parts if p)


def needs_two_samples(model: nn.Module) -> bool:
    """Whether a training batch of one image would fail: a BatchNorm layer in training mode normalises over it."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf for name, buf in model.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


def _rank_state(model: nn.Module, aug_gen: torch.Generator, sums: dict, seen: int) -> dict:
    """What differs between ranks in the middle of an epoch: RNG and augmentation streams, BN statistics
    (averaged only at epoch ends), the logged sums."""
    return {"rng": _rng_state(), "aug": aug_gen.get_state(), "seen": seen,
            "sums": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in sums.items()},
            "bn": {k: v.detach().cpu() for k, v in _bn_buffers(model).items()}}


def save_checkpoint(loop: Loop, epochs_done: int, partial: Optional[dict] = None) -> None:
    """checkpoint.pt (rank 0), then best.pt when this checkpoint made it: a kill between the two leaves a
    checkpoint whose `best` names its own epoch, and resuming rewrites best.pt from it (`_restore_best`)."""
    rank_states = dist.all_gather_object(partial.pop("rank")) if partial is not None else None
    if dist.is_main():
        state = {
            "model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict(), "scaler": loop.scaler.state_dict(), "epoch": epochs_done - 1,
            "best": loop.best, "rng": _rng_state(), "config": loop.cfg.to_dict(), "segments": loop.segments,
        }
        if partial is not None:
            state["partial"] = {**partial, "world": dist.world_size(), "ranks": rank_states}
        atomic_torch_save(state, loop.out / "checkpoint.pt")
        if partial is None and loop.best["epoch"] == epochs_done:
            atomic_torch_save({"model": loop.model.state_dict(), "epoch": epochs_done, "metric": loop.best["metric"]},
                              loop.out / "best.pt")
    dist.barrier()


def _read_flags(flags: torch.Tensor, stop: StopFlag) -> tuple[bool, bool]:
    """(a loss was non-finite, a stop was asked for) on any rank: the step loop's one wait for the device."""
    both = torch.stack([flags.float(), torch.tensor(float(stop.signum is not None), device=flags.device)])
    if dist.world_size() > 1:
        both = dist.all_reduce(both, op="max")
    bad, stopping = both.tolist()
    return bad > 0, stopping > 0


def train_one_epoch(loop: Loop, split: Any, epoch: int, partial: Optional[dict] = None) -> dict:
    """One epoch of optimiser steps (each `train.accum_steps` micro-batches); `partial` continues one cut
    short by a mid-epoch checkpoint. Logged values and the non-finite flag stay on the device and are
    read every `train.log_every` steps and at the end, so the loop does not wait for the GPU every step."""
    cfg, model, device = loop.cfg, loop.model, loop.device
    loop.method.train_mode(model)
    batch, accum, world = cfg.data.batch_size, cfg.train.accum_steps, dist.world_size()
    num_batches = split.num_batches(batch, world=world, drop_last=False)
    steps, total_steps = loop.steps_per_epoch, cfg.train.epochs * loop.steps_per_epoch
    # BatchNorm cannot normalise a single training sample: a last batch of one is skipped (on every rank
    # alike, since ranks get equal shares); a step it made alone still counts, keeping the schedule.
    usable = num_batches
    if needs_two_samples(model) and num_batches and math.ceil(len(split) / world) - (num_batches - 1) * batch == 1:
        usable -= 1
    # Offset by rank so that the i-th image of every rank's batch does not get the same crop and flip.
    aug_gen = epoch_generator(cfg.train.seed + 7919 * dist.rank(), epoch, purpose=1)
    mixer = Mixer.from_config(cfg.data)  # draws from aug_gen too, so mid-epoch checkpoints resume it exactly
    sums: dict[str, Any] = {}
    seen, elapsed_before, first = 0, 0.0, 0
    if partial is not None:
        mine = partial["ranks"][dist.rank()]
        aug_gen.set_state(mine["aug"])
        sums = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in mine["sums"].items()}
        seen, elapsed_before, first = mine["seen"], partial["elapsed"], partial["batch"]
    window: dict[str, Any] = {}
    window_steps = 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    amp = cfg.train.amp  # float16 on a CPU is refused by `setup`
    amp_dtype = torch.bfloat16 if cfg.train.amp_dtype == "bfloat16" else torch.float16
    start = time.perf_counter()
    batches = split.batches(batch, sampler=cfg.data.sampler, seed=cfg.train.seed, epoch=epoch, rank=dist.rank(),
                            world=world, start=first)
    # In a file the bar writes nothing: `check` writes a plain line at each check point instead.
    bar = Progress(steps, f"epoch {epoch + 1}/{cfg.train.epochs}", "step", initial=first // accum, lines=False)

    def check(i: int, due: bool = False) -> None:
        """After the step ending with batch `i`, read the flags (the one wait for the device): stop on a
        non-finite loss, fold the window into the epoch's sums and log it, checkpoint when due or asked to stop."""
        nonlocal window, window_steps
        bad, stopping = _read_flags(nonfinite, loop.stop)
        if bad:
            raise DivergedError(
                f"the loss became non-finite in epoch {epoch + 1}, at or before step {i // accum + 1}; training stopped "
                f"and the last good checkpoint ({loop.out / 'checkpoint.pt'}) is kept. Try a lower optim.lr or "
                "train.amp=false.")
        for key, value in window.items():
            sums[key] = sums[key] + value if key in sums else value
        if window_steps:
            means = {k: float(v) / window_steps for k, v in window.items()}
            rate = seen * world / max(elapsed_before + time.perf_counter() - start, 1e-9)
            lr = loop.optimizer.param_groups[0]["lr"]
            bar.note(loss=f"{means['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            if bar.mode == "lines" and i + 1 < usable:  # after the last step the epoch's own line follows
                say(f"epoch {epoch + 1}/{cfg.train.epochs} | step {i // accum + 1}/{steps} | loss {means['loss']:.4f} "
                    f"| lr {lr:.2e} | {rate:.0f} img/s | ETA {run_eta(loop)}")
            if loop.writer is not None:
                step = epoch * steps + i // accum
                loop.writer.add_scalar("train/loss", means.pop("loss"), step)
                loop.writer.add_scalar("train/lr", lr, step)
                for key, value in means.items():
                    loop.writer.add_scalar(f"train/{key}", value, step)
            window, window_steps = {}, 0
        if stopping or (due and i + 1 < usable):
            save_checkpoint(loop, epoch, {  # after the last batch, the skipped one-image batch counts as done too
                "epoch": epoch, "batch": i + 1 if i + 1 < usable else num_batches,
                "steps_done": loop.scheduler.last_epoch,
                "elapsed": elapsed_before + time.perf_counter() - start,
                "rank": _rank_state(model, aug_gen, sums, seen)})
        if stopping:
            raise Preempted(f"stopped by signal {loop.stop.signum} after step {i // accum + 1} of epoch {epoch + 1}; "
                            f"{loop.out / 'checkpoint.pt'} holds it: rerun the same command with --resume")

    with bar:
        for i, (x, y, _) in enumerate(batches, start=first):
            if i >= usable:
                if i % accum == 0:
                    loop.scheduler.step()
                break
            group_start = i - i % accum
            group = min(accum, usable - group_start)  # a partial last group is stepped with its own mean
            last_of_group = i - group_start == group - 1
            x = split.to_input(x, device, train=True, generator=aug_gen)
            y = y.to(device, non_blocking=True)
            n = len(y)
            if mixer.active:  # on the normalised batch, the last step of docs/augmentation.md's order
                x, y = mixer(x, y, aug_gen)  # y: MixedTargets, which the losses and MORE's weights handle
            if cfg.train.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if i == group_start:
                loop.optimizer.zero_grad(set_to_none=True)
            # Under DDP only the last micro-batch of a group all-reduces the summed gradients.
            sync = contextlib.nullcontext() if last_of_group or world == 1 else loop.step_fn.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    loss, logs = loop.compiled_step(x, y, (epoch * steps + i // accum) / total_steps)
                loop.scaler.scale(loss / group if group > 1 else loss).backward()
            nonfinite |= ~torch.isfinite(loss.detach())
            seen += n
            for key, value in {"loss": loss, **logs}.items():
                # Tensors stay on the device (float64, as the epoch means always were); plain numbers stay numbers.
                value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
                window[key] = window.get(key, 0) + (value / group if group > 1 else value)
            if not last_of_group:
                continue
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
            loop.scheduler.step()
            loop.method.after_step(model)
            bar.update()
            window_steps += 1
            step_in_epoch = i // accum
            due = (bool(cfg.train.checkpoint_every)
                   and (epoch * steps + step_in_epoch + 1) % cfg.train.checkpoint_every == 0)
            if step_in_epoch % cfg.train.log_every == 0 or due or (world == 1 and loop.stop.signum is not None):
                check(i, due)
        check(usable - 1)  # always before the epoch's checkpoint: a NaN never reaches checkpoint.pt
    dist.average_bn_stats(model)  # before evaluation and checkpointing, so every rank holds the same model
    loop.method.after_epoch(model, epoch)
    elapsed = elapsed_before + time.perf_counter() - start
    means = dist.mean_over_ranks({k: float(v) / steps for k, v in sums.items()})
    stats = {f"train_{k}" if k == "loss" else k: v for k, v in means.items()}
    stats.update(lr=loop.optimizer.param_groups[0]["lr"], images_per_sec=seen * world / elapsed,
                 epoch_seconds=elapsed)
    return stats


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
    device = select_device(cfg.train.device)
    device = dist.init_from_env(device.type) or device
    if cfg.train.amp and cfg.train.amp_dtype == "float16" and device.type != "cuda":
        # CPU autocast in float16 is slow and has no loss scaling: refuse rather than train in another precision.
        raise ConfigError(f"train.amp with train.amp_dtype: float16 needs a CUDA device and this run is on {device}; "
                          "on a CPU use train.amp_dtype=bfloat16 (or --fast), or train.amp=false")
    seed_everything(cfg.train.seed)
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


def _rng_state() -> dict:
    """Every global generator's whole state (NumPy's with its position), so a resumed run draws on."""
    numpy_kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": keys.astype(np.int64).tolist(),
             "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(gauss)],
             "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    has_gauss, gauss = state.get("numpy_gauss", [0, 0.0])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state.get("numpy_pos", 624),
                         int(has_gauss), float(gauss)))
    random.setstate((3, tuple(state["python"]), state.get("python_gauss")))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_loop(run: Run, out: Path) -> Loop:
    """The optimiser, lr schedule, AMP scaler and training step (DDP-wrapped, optionally compiled) of a run."""
    cfg, model, device = run.cfg, run.model, run.device
    optimizer = build_optimizer(cfg, part_groups(model, run.method.param_groups(model), cfg))
    steps = run.info.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps))
    fp16 = cfg.train.amp and device.type == "cuda" and cfg.train.amp_dtype == "float16"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)  # bfloat16 has float32's range: no scaling
    # Wrapping broadcasts rank 0's parameters and buffers; a checkpoint loaded afterwards is every rank's.
    step_fn = dist.training_step(model, run.method, device, cfg.train.find_unused_parameters)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    compiled = torch.compile(step_fn) if cfg.train.compile else step_fn
    return Loop(cfg, model, run.method, step_fn, compiled, optimizer, scheduler, scaler, device, steps, out,
                writer=None, stop=StopFlag(), best={"metric": -1.0, "epoch": None})


def resume_loop(loop: Loop, state: dict, path: Path) -> tuple[int, Optional[dict]]:
    """Load a checkpoint into `loop`; returns the epoch to continue with and the mid-epoch position, if any."""
    cfg, steps, partial = loop.cfg, loop.steps_per_epoch, state.get("partial")
    if partial is not None and partial["world"] != dist.world_size():
        raise ConfigError(f"--resume: {path} was written in the middle of epoch {partial['epoch'] + 1} by "
                          f"{partial['world']} processes, and this run has {dist.world_size()}: a mid-epoch "
                          f"position is a position in each process's share of the epoch. Resume with "
                          f"{partial['world']} processes (checkpoints written at epoch ends resume with any number)")
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    # The schedule is rebuilt at this run's step rather than loaded: steps per epoch and the linearly
    # scaled lr depend on the number of processes, which may differ from the run that saved it.
    for group, base_lr in zip(loop.optimizer.param_groups, loop.scheduler.base_lrs):
        group["initial_lr"] = base_lr
    steps_done = partial["steps_done"] if partial is not None else (state["epoch"] + 1) * steps
    loop.scheduler = torch.optim.lr_scheduler.LambdaLR(loop.optimizer, lambda s: lr_factor(s, cfg, steps),
                                                       last_epoch=steps_done - 1)
    loop.scaler.load_state_dict(state["scaler"])
    loop.best = state["best"]
    if partial is None:
        _restore_rng(state["rng"])
        return state["epoch"] + 1, None
    mine = partial["ranks"][dist.rank()]
    buffers = dict(loop.model.named_buffers())
    for name, value in mine["bn"].items():  # each rank's own BN statistics: they are averaged at epoch ends
        buffers[name].copy_(value)
    _restore_rng(mine["rng"])
    return partial["epoch"], partial


# Keys whose null `setup` resolves to the dataset's values (and saves resolved).
RESOLVED_KEYS = {"data.mean", "data.std", "data.resize_to"}


def config_differences(saved: dict, cfg: Config) -> list[str]:
    """Keys where a saved config.yaml and `cfg` differ in what they compute (`RESUME_FREE_KEYS` aside; a
    null that `setup` resolves matches the resolved value saved)."""
    old, new = flatten_saved(saved), flatten(cfg.to_dict())
    return sorted(k for k in set(old) | set(new) if k not in RESUME_FREE_KEYS and old.get(k) != new.get(k)
                  and not (k in RESOLVED_KEYS and new.get(k) is None))


def _check_resumable(saved: dict, cfg: Config, path: Path) -> None:
    differ = config_differences(saved, cfg)
    if differ:
        old, new = flatten_saved(saved), flatten(cfg.to_dict())
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:5])
        raise ConfigError(f"--resume: the config differs from the one saved in {path} ({shown}); resume with the "
                          f"same config (only {', '.join(sorted(RESUME_FREE_KEYS))} may differ) or start a new "
                          "--out directory")


def _start_fresh(cfg: Config, out: Path) -> None:
    """A new run directory, or one whose run was killed before its first checkpoint: that attempt's
    epoch records, best.pt and TensorBoard events belong to a branch nothing continues."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / "metrics.jsonl", out / "best.pt", *out.glob("events.out.tfevents.*")]:
        stale.unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")


def _restore_best(out: Path, state: dict, device: torch.device) -> None:
    """best.pt is written after the checkpoint that records it; a kill between the two leaves a checkpoint
    whose best epoch is its own, and its weights are the best ones."""
    epochs_done = state["epoch"] + 1
    if "partial" in state or state["best"].get("epoch") != epochs_done:
        return
    path = out / "best.pt"
    if not path.exists() or load_checkpoint(path, map_location=device).get("epoch") != epochs_done:
        atomic_torch_save({"model": state["model"], "epoch": epochs_done, "metric": state["best"]["metric"]}, path)


def fit(cfg: Config, out_dir: str | Path, resume: bool = False, data_root: Optional[str] = None,
        download: bool = False) -> dict:
    """Train `cfg` into `out_dir`, then select, finalise, evaluate and export. Returns results.

    With `resume`, one command serves every moment of a run's life (a requeued cluster job): it starts a
    run that has no checkpoint yet, continues one that has, and reports a finished one unchanged. The run
    holds `out_dir`'s lock from before its first read to its end: a second writer is refused.
    """
    out = Path(out_dir)
    # Under torchrun the writing rank holds it; the others write nothing into the directory.
    with run_lock(out) if dist.is_main() else contextlib.nullcontext():
        return _fit(cfg, out, resume, data_root, download)


def _fit(cfg: Config, out: Path, resume: bool, data_root: Optional[str], download: bool) -> dict:
    ckpt_path, results_path = out / "checkpoint.pt", out / "results.json"
    if not resume and (ckpt_path.exists() or results_path.exists()):
        raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it or choose another directory")
    if resume and (out / "config.yaml").exists():  # before any work; again once setup resolved the nulls
        _check_resumable(read_yaml(out / "config.yaml"), cfg, out / "config.yaml")
    if resume and results_path.exists():
        results = json.loads(results_path.read_text())
        say(f"{out}: already finished; nothing was rewritten")
        if dist.is_main():
            print(format_table([(f"{results['method']}/{results['loss']} ({results['split']}, {results['checkpoint']})",
                                 results)], get_task(results.get("task")).columns))
        return results
    run = setup(cfg, data_root, download, out)
    model, method, device, data = run.model, run.method, run.device, run.data
    method.train_mode(model)
    if cfg.data.batch_size == 1 and needs_two_samples(model):
        raise ConfigError("data.batch_size: 1 cannot train this model: its BatchNorm layers normalise over the "
                          "batch and need at least two images per batch (per process); use data.batch_size >= 2")
    if resume and (out / "config.yaml").exists():
        _check_resumable(read_yaml(out / "config.yaml"), cfg, out / "config.yaml")
    fresh = not ckpt_path.exists()
    if resume and fresh:
        say(f"--resume: {out} holds no checkpoint yet; starting the run")
    groups = method.param_groups(model)
    if not any(group["params"] for group in groups):
        # Nothing trains (tau-normalisation): the method's finalize does all the work.
        if cfg.eval.select != "final":
            raise ConfigError(f"eval.select: {cfg.eval.select} picks an epoch, but method {cfg.method.name} trains "
                              "nothing; set eval.select=final")
        if dist.is_main():
            _start_fresh(cfg, out)
        results = finish(run, out, {"metric": None, "epoch": None}, epoch=0,
                         segments=[segment(device, 0, 0, precision(cfg))])
        dist.cleanup()
        return results
    train_split = method.train_split(data.train, model)
    loop = build_loop(run, out)
    start_epoch, partial = 0, None
    if not fresh:
        state = load_checkpoint(ckpt_path, map_location=device)
        start_epoch, partial = resume_loop(loop, state, ckpt_path)
        loop.segments = list(state.get("segments", []))  # checkpoints written before segments were recorded: none
        if dist.is_main():
            _truncate_metrics(out / "metrics.jsonl", state["epoch"] + 1)
            _restore_best(out, state, device)
    elif dist.is_main():
        _start_fresh(cfg, out)
    loop.segments.append(segment(device, start_epoch, partial["batch"] if partial else 0, precision(cfg)))

    writer = loop.writer = _tensorboard(out) if dist.is_main() else None
    loop.started = (time.perf_counter(), loop.scheduler.last_epoch)
    say(f"run {out}: {data.name} {len(data.train)} train images, {data.num_classes} classes, "
        f"{cfg.model.name}/{cfg.model.head}, method {cfg.method.name}{' + MORE' if cfg.more.enabled else ''}, "
        f"loss {cfg.loss.name}, augmentation {augmentation_summary(cfg)}, {cfg.train.epochs} epochs of "
        f"{loop.steps_per_epoch} steps on {device} (schedule resolved to {resolved_schedule(cfg)})")
    trainable, total = parameter_counts(model)
    say(f"parameters: {trainable:,} trainable of {total:,} (finetune.mode {cfg.finetune.mode})")
    hint = precision_hint(cfg, device)
    if hint:
        say(hint)
    select_split = {"best_val": data.val, "best_test": data.test}.get(cfg.eval.select)
    with loop.stop:
        try:
            for epoch in range(start_epoch, cfg.train.epochs):
                resumed, partial = (partial if partial is not None and partial["epoch"] == epoch else None), None
                stats = train_one_epoch(loop, train_split, epoch, resumed)
                record = {"epoch": epoch + 1, **stats}
                last = epoch == cfg.train.epochs - 1
                scheduled = (epoch + 1) % cfg.eval.every == 0 or last
                for name, split in (("val", data.val), ("test", data.test)):
                    # The selection split is evaluated every epoch; the other only every `eval.every` epochs.
                    if split is not None and (scheduled or split is select_split):
                        m = evaluate(model, split, device, cfg, data, f"evaluate {name}")
                        record[name] = task_of(data).epoch_record(m)
                if cfg.train.track_every and (epoch + 1) % cfg.train.track_every == 0:
                    from longtail.analysis import track

                    if not task_of(data).multilabel:  # FDR and cosines group features by one class per sample
                        record["track"] = track(model, data.train, device)
                    if cfg.more.enabled:
                        record.update(method.diagnostics(model, data.train, device))
                if select_split is not None:
                    score = record["val" if cfg.eval.select == "best_val" else "test"][task_of(data).select_key]
                    if score > loop.best["metric"]:
                        loop.best = {"metric": score, "epoch": epoch + 1}
                if dist.is_main():
                    _log_epoch(out, writer, record, cfg.train.epochs, run_eta(loop))
                save_checkpoint(loop, epoch + 1)
        except Preempted:
            dist.cleanup()
            raise
        finally:
            if writer is not None:
                writer.close()
    results = finish(run, out, loop.best, segments=loop.segments)
    dist.cleanup()
    return results


def precision(cfg: Config) -> str:
    """How the run trains, e.g. `bfloat16 autocast + channels_last`: the part of a run's segment record that
    says what its speed depends on."""
    name = f"{cfg.train.amp_dtype} autocast" if cfg.train.amp else "float32"
    return name + (" + channels_last" if cfg.train.channels_last else "")


def precision_hint(cfg: Config, device: torch.device, cpuinfo: Optional[str] = None) -> Optional[str]:
    """A one-line hint when a run trains in float32 on a CPU that computes bfloat16 natively."""
    native = native_bf16(cpuinfo) if device.type == "cpu" and not cfg.train.amp else None
    if native is None:
        return None
    return (f"hint: this CPU has native bfloat16 ({native}) and the run trains in float32; `longtail train ... --fast` "
            "(train.amp=true train.amp_dtype=bfloat16 train.channels_last=true) is about 2.8x faster for ResNet-32 "
            "(docs/cli.md#speed)")


def finish(run: Run, out: Path, best: dict, epoch: Optional[int] = None, segments: Optional[list] = None) -> dict:
    """Select the checkpoint, finalise the method, apply post-hoc adjustment and calibration, evaluate and export."""
    cfg, model, data, device = run.cfg, run.model, run.data, run.device
    epoch = cfg.train.epochs if epoch is None else epoch
    if cfg.eval.select != "final":
        state = load_checkpoint(out / "best.pt", map_location=device)
        model.load_state_dict(state["model"])
        epoch = state["epoch"]
    # LoRA's low-rank parts fold into plain weights first (MORE's too), so methods fold into a plain model.
    model = run.method.finalize(merge(model))
    scale_head(model.head, logit_scale(cfg.loss))  # the logits the loss saw (LDAM: x ldam_scale), margins aside
    folds = training_folds(cfg, run.info.extra)
    posthoc, temperature = None, None
    if cfg.posthoc.kind != "none":
        from longtail.methods.posthoc import apply_posthoc

        model, posthoc = apply_posthoc(model, cfg, data, device)
        folds.append({"kind": "logit_adjustment", "form": posthoc["kind"], "tau": posthoc["tau"]})
    if cfg.posthoc.calibrate == "temperature":
        temperature = calibrate(model, cfg, data, device, logit_prior(cfg, folds)[0])
        folds.append({"kind": "temperature", "temperature": temperature})
    if dist.is_main():
        export_model(model, cfg, data, out, folds)
    dist.barrier()  # every rank scores the exported model.pt
    # The recorded numbers are `longtail eval`'s: the same function on the model read back from model.pt, so the
    # two agree by construction (the in-memory model can differ from its export in the last float32 bit).
    exported, spec, _ = load_model(out)
    scores, _, _ = score_model(exported.to(device), spec, cfg, data, cfg.eval.split, device)
    results = {
        **scores,
        "task": data.task,
        "class_names": list(data.class_names),
        "thresholds_rule": data.thresholds_rule if cfg.eval.thresholds is None else "eval.thresholds from the config",
        "split": cfg.eval.split,
        "checkpoint": cfg.eval.select,
        "epoch": epoch,
        "seed": cfg.train.seed,
        "dataset": data.name,
        "imbalance": data.imbalance,
        "selection": cfg.data.selection,
        "val_per_class": cfg.data.val_per_class,
        "indices_sha256": data.indices_sha256,
        "model": cfg.model.name,
        "method": cfg.method.name + ("+more" if cfg.more.enabled else ""),
        "loss": cfg.loss.name,
        "epochs": cfg.train.epochs,
        "tta": cfg.eval.tta,
        "schedule_resolved": resolved_schedule(cfg),
        "effective_batch_size": effective_batch_size(cfg),
        "effective_lr": effective_lr(cfg),
        "world_size": dist.world_size(),
        "environment": environment(device),  # commit, torch version, device, CPU model, threads
        "segments": segments,  # each (re)started part of the training: where it began and where it ran
        "posthoc": posthoc,
        "method_record": run.info.extra or None,
        "config": cfg.to_dict(),
    }
    if dist.is_main():
        atomic_write_json(out / "results.json", results)
        print(format_table([(f"{results['method']}/{cfg.loss.name} ({cfg.eval.split}, {cfg.eval.select})", results)],
                           task_of(data).columns))
        if temperature is not None:
            print(f"temperature {temperature:.4f}: ECE {results['ece_uncalibrated']:.2f} -> {results['ece']:.2f}, "
                  f"NLL {results['nll_uncalibrated']:.3f} -> {results['nll']:.3f}")
    dist.barrier()  # no rank returns before rank 0 has written the run's files
    return results


def training_folds(cfg: Config, method_record: dict) -> list[dict]:
    """What `finish` has folded into the model before the post-hoc steps, in order, as model.yaml records it."""
    folds = [{"kind": "more_merge"}] if cfg.more.enabled else []
    if cfg.finetune.mode == "lora":  # with MORE the same parts: more_merge then names them too
        folds.append({"kind": "lora_merge", "rank": cfg.finetune.lora_rank,
                      "scale": cfg.finetune.lora_alpha / cfg.finetune.lora_rank})
    if cfg.method.name == "lws":
        folds.append({"kind": "lws_scales"})
    if cfg.method.name == "tau_norm":
        folds.append({"kind": "tau_norm", "tau": method_record["tau_norm"]["tau"]})
    if logit_scale(cfg.loss) != 1.0:
        folds.append({"kind": "logit_scale", "scale": logit_scale(cfg.loss)})
    return folds


def calibrate(model: nn.Module, cfg: Config, data: LTData, device: torch.device, prior: str) -> float:
    """Fit the temperature on the validation split (NLL under the logits' prior) and fold 1 / T into the head."""
    logits, targets = collect_logits(model, data.val, device, cfg.eval.batch_size, cfg.eval.tta)
    temperature = fit_temperature(logits, targets, logit_prior_vector(prior, data.class_counts))
    scale_head(model.head, 1.0 / temperature)
    return temperature


def eval_transform(data: LTData, tta: str) -> dict:
    """model.yaml's `transform`: how an image becomes the model's input at evaluation. In-memory datasets
    (CIFAR, Fashion-MNIST) take their images as they are unless resized to the model's size; image files, and
    resized in-memory images, are resized and centre-cropped (`tta_resize`: what lift_crops' five crops are
    cut from)."""
    as_is = isinstance(data.test, InMemorySplit) and data.test.resize is None
    if tta == "lift_crops" and as_is:
        raise ConfigError(f"eval.tta: lift_crops is LIFT's five {data.image_size}-pixel crops of an image resized to "
                          f"{data.image_size + LIFT_EXPAND}; {data.name}'s images go into this model as they are "
                          "(no data.resize_to), so there is nothing to crop from; use eval.tta flip or none")
    geometry = {"kind": "as_is"} if as_is else {"kind": "resize_center_crop", "resize": eval_resize(data.image_size)}
    if isinstance(data.test, InMemorySplit) and not as_is:  # resized as floats on the device, not as 8-bit images
        geometry["resize_on"] = "float"
    crops = {"tta_resize": data.image_size + LIFT_EXPAND} if tta == "lift_crops" else {}
    return {**geometry, "size": data.image_size, "mean": list(data.mean), "std": list(data.std), "tta": tta, **crops}


def export_model(model: nn.Module, cfg: Config, data: LTData, out: Path, folds: list[dict]) -> None:
    """`model.pt`: a plain state dict; `model.yaml`: everything needed to use it without the dataset or the
    config (docs/deployment.md): the architecture, class names and counts, the evaluation transform, the
    folds in its weights and the prior its logits are calibrated to."""
    spec = model_spec(cfg.model, model, data.num_classes, data.in_channels, data.image_size)
    if task_of(data).multilabel:  # per-class sigmoids: no softmax prior to calibrate to
        prior, note = None, "multi-label: independent per-class sigmoid scores; a class prior does not apply"
    else:
        prior, note = logit_prior(cfg, folds)
    spec.update(task=data.task,
                data={"name": data.name, "class_names": list(data.class_names),
                      "class_counts": list(data.class_counts)},
                transform=eval_transform(data, cfg.eval.tta), folds=folds, logit_prior=prior, logit_prior_note=note,
                adapters=adapter_spec(model))
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    atomic_write_text(out / "model.yaml", yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))


def _tensorboard(out: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out))


def _log_epoch(out: Path, writer: Any, record: dict, epochs: int, eta: str) -> None:
    append_line(out / "metrics.jsonl", json.dumps(record))
    if writer is not None:
        for split in ("val", "test"):
            for key, value in record.get(split, {}).items():
                if value is not None:
                    writer.add_scalar(f"{split}/{key}", value, record["epoch"])
        for key, value in record.get("track", {}).items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"track/{key}", value, record["epoch"])
        for group, value in record.get("more_discrepancy", {}).items():
            if value is not None:
                writer.add_scalar(f"more/discrepancy/{group}", value, record["epoch"])
        for layer, value in record.get("more_layer_ratio", {}).items():
            writer.add_scalar(f"more/ratio/{layer}", value, record["epoch"])
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['train_loss']:.4f}", f"lr {record['lr']:.2e}",
             f"{record['images_per_sec']:.0f} img/s"]
    for split in ("val", "test"):
        if split in record:  # the task's headline number: top1, or map
            key, value = next(iter(record[split].items()))
            parts.append(f"{split} {key} {value:.2f}")
    say(" | ".join([*parts, f"ETA {eta}"]))


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Keep the records of the epochs the checkpoint holds: later ones (a run killed between the epoch's
    record and its checkpoint) and a torn last line (killed mid-write) are dropped."""
    if not path.exists():
        return
    kept = [record for record in read_jsonl(path) if record["epoch"] <= epochs_done]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


# ----------------------------------------------------------------------------- finished runs


@dataclass
class LoadedRun:
    cfg: Config
    model: nn.Module
    spec: dict  # model.yaml
    data: LTData
    run_dir: Path
    results: Optional[dict]


def model_file(path: str | Path) -> Path:
    """The model.pt of a run directory, or `path` itself when it names a file; a missing path is refused."""
    path = Path(path)
    # Checked first: a mistyped name must not fall back to the model.pt of the folder it points into.
    if not path.exists():
        raise ConfigError(f"{path} does not exist: expected a run directory written by `longtail train` "
                          "or the model.pt in one")
    return path if path.is_file() else path / "model.pt"


def load_model(path: str | Path, needs: tuple[str, ...] = ()) -> tuple[nn.Module, dict, Path]:
    """An exported model (a run directory, or a model.pt beside its model.yaml): the model, its model.yaml and
    the model.pt path. `needs` names further files the directory must hold (config.yaml)."""
    model_pt = model_file(path)
    for needed in (*(model_pt.parent / name for name in needs), model_pt.parent / "model.yaml", model_pt):
        if not needed.exists():
            raise ConfigError(f"{needed} does not exist: expected a run directory written by `longtail train` "
                              f"({', '.join((*needs, 'model.yaml', 'model.pt'))})")
    spec = read_yaml(model_pt.parent / "model.yaml")
    state = load_checkpoint(model_pt)
    # checkpoint.pt / best.pt hold the weights before the method's finalize (MORE merge, head folding).
    if not isinstance(state, dict) or ("model" in state and "epoch" in state):
        raise ConfigError(f"{model_pt} is not an exported model (a plain state dict; checkpoint.pt and best.pt "
                          "are training checkpoints): pass the run directory or its model.pt")
    return load_exported(spec, state, str(model_pt.parent / "model.yaml")).eval(), spec, model_pt


def load_run(path: str | Path, data_root: Optional[str] = None, download: bool = False) -> LoadedRun:
    """A finished run (its directory, or a model.pt inside one): config, exported model, data."""
    model, spec, model_pt = load_model(path, needs=("config.yaml",))
    run_dir = model_pt.parent
    cfg = from_dict(read_yaml(run_dir / "config.yaml"))
    data = build_data(cfg.data, data_root, download)
    results_path = run_dir / "results.json"
    results = read_json(results_path) if results_path.exists() else None
    return LoadedRun(cfg, model, spec, data, run_dir, results)


def folded_temperature(spec: dict) -> Optional[float]:
    """The temperature folded into a model (model.yaml's folds), or None."""
    found = [fold["temperature"] for fold in spec.get("folds", []) if fold["kind"] == "temperature"]
    return found[-1] if found else None


def score_model(model: nn.Module, spec: dict, cfg: Config, data: LTData, split_name: str,
                device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """An exported model's metrics on a split (with its folded temperature's calibration record), its logits
    and targets: what `fit` records as the final result and what `longtail eval` reports."""
    split = data.val if split_name == "val" else data.test
    logits, targets = collect_logits(model, split, device, cfg.eval.batch_size, cfg.eval.tta, f"evaluate {split_name}")
    metrics = task_of(data).summarize(logits, targets, data, cfg)
    metrics.update(calibration_record(logits, targets, folded_temperature(spec), cfg.eval.ece_bins))
    return metrics, logits, targets


def evaluate_run(path: str | Path, split_name: str = "test", plots: bool = False, data_root: Optional[str] = None,
                 download: bool = False) -> dict:
    """`longtail eval`: re-evaluate an exported model, write eval-<split>.json (and figures), holding the run
    directory's lock: what it reads and what it writes belong to one model."""
    with run_lock(model_file(path).parent):
        return _evaluate_run(path, split_name, plots, data_root, download)


def _evaluate_run(path: str | Path, split_name: str, plots: bool, data_root: Optional[str], download: bool) -> dict:
    run = load_run(path, data_root, download)
    split = run.data.val if split_name == "val" else run.data.test
    if split is None:
        raise ConfigError(f"--split val: the run {run.run_dir} has no validation split (data.val_per_class / data.val_list)")
    device = select_device(run.cfg.train.device)
    metrics, logits, targets = score_model(run.model.to(device), run.spec, run.cfg, run.data, split_name, device)
    task, temperature = task_of(run.data), folded_temperature(run.spec)
    metrics.update(task=task.name, split=split_name, model_file=str(Path(path)), tta=run.cfg.eval.tta)
    if plots:
        fig = run.run_dir / "figures"
        fig.mkdir(exist_ok=True)
        remove_stale_temporaries(fig)  # of a killed `eval --plots` or `analyze`
        metrics["figures"] = [str(f) for f in task.figures(metrics, logits, targets, run.data, run.cfg, fig, split_name,
                                                           temperature)]
    atomic_write_json(run.run_dir / f"eval-{split_name}.json", metrics)
    return metrics
