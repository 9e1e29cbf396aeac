"""The step loop: one epoch of optimiser steps, and the `Loop` it runs with.

Layer: training. Imports the foundation, the building blocks, the methods' interface (through the `Loop`)
and the other training modules below it (state, optim, stopping, checkpointing, trackers).
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from longtail import distributed as dist
from longtail.config import Config
from longtail.errors import DivergedError
from longtail.finetune import part_groups
from longtail.mixing import Mixer
from longtail.progress import Progress, say
from longtail.runtime import epoch_generator
from longtail.training.checkpointing import save_checkpoint
from longtail.training.optim import build_optimizer, lr_factor
from longtail.training.setup import Run
from longtail.training.state import Loop, rank_state, run_eta
from longtail.training.stopping import Preempted, StopFlag, read_flags
from longtail.training.trackers import Trackers


def needs_two_samples(model: nn.Module) -> bool:
    """Whether a training batch of one image would fail: a BatchNorm layer in training mode normalises over it."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


@dataclass
class Epoch:
    """What one epoch's step loop carries from step to step, and `check` reads and folds."""

    index: int  # the epoch, from 0
    usable: int  # batches that train: a last batch of one image is skipped where BatchNorm trains
    num_batches: int
    aug_gen: torch.Generator
    nonfinite: torch.Tensor  # on the device: a loss was non-finite since the last check
    bar: Progress
    start: float  # time.perf_counter() when this process began the epoch
    elapsed_before: float = 0.0  # seconds the epoch ran before a mid-epoch checkpoint
    seen: int = 0  # images this process trained on
    sums: dict = field(default_factory=dict)  # logged values over the epoch, folded in at each check
    window: dict = field(default_factory=dict)  # logged values since the last check
    window_steps: int = 0


def divergence_remedies(cfg: Config) -> str:
    """What a diverged run can change, of the keys it uses: MORE's steps on alpha * L_MORE grow with the
    amplitude (docs/methods/more.md#stability); half precision can overflow where float32 does not."""
    remedies = ["a lower optim.lr"]
    if cfg.more.enabled:
        remedies.append(f"a lower more.amplitude (now {cfg.more.amplitude:g})")
    if cfg.train.amp:
        remedies.append("train.amp=false")
    return " or ".join(remedies)


def check(loop: Loop, ep: Epoch, i: int, due: bool = False) -> None:
    """After the step ending with batch `i`, read the flags (the one wait for the device): stop on a
    non-finite loss, fold the window into the epoch's sums and log it, checkpoint when due or asked to stop."""
    cfg, epoch, accum, world = loop.cfg, ep.index, loop.cfg.train.accum_steps, dist.world_size()
    steps = loop.steps_per_epoch
    bad, stopping = read_flags(ep.nonfinite, loop.stop)
    if bad:
        ckpt = loop.out / "checkpoint.pt"
        kept = (f"the last good checkpoint ({ckpt}) is kept" if ckpt.exists() else
                "no checkpoint had been written yet, so the same command starts the run over")
        raise DivergedError(f"the loss became non-finite in epoch {epoch + 1}, at or before step {i // accum + 1}; "
                            f"training stopped and {kept}. Try {divergence_remedies(cfg)}.")
    for key, value in ep.window.items():
        ep.sums[key] = ep.sums[key] + value if key in ep.sums else value
    if ep.window_steps:
        means = {k: float(v) / ep.window_steps for k, v in ep.window.items()}
        rate = ep.seen * world / max(ep.elapsed_before + time.perf_counter() - ep.start, 1e-9)
        lr = loop.optimizer.param_groups[0]["lr"]
        ep.bar.note(f"loss {means['loss']:.4f}", f"{rate:.0f} img/s", f"ETA {run_eta(loop)}", f"lr {lr:.2e}")
        if ep.bar.mode == "lines" and i + 1 < ep.usable:  # after the last step the epoch's own line follows
            say(f"epoch {epoch + 1}/{cfg.train.epochs} | step {i // accum + 1}/{steps} | loss {means['loss']:.4f} "
                f"| lr {lr:.2e} | {rate:.0f} img/s | ETA {run_eta(loop)}")
        loop.trackers.log({"train/loss": means.pop("loss"), "train/lr": lr,
                           **{f"train/{key}": value for key, value in means.items()}}, epoch * steps + i // accum)
        ep.window, ep.window_steps = {}, 0
    if stopping or (due and i + 1 < ep.usable):
        save_checkpoint(loop, epoch, {  # after the last batch, the skipped one-image batch counts as done too
            "epoch": epoch, "batch": i + 1 if i + 1 < ep.usable else ep.num_batches,
            "steps_done": loop.scheduler.last_epoch,
            "elapsed": ep.elapsed_before + time.perf_counter() - ep.start,
            "rank": rank_state(loop.model, ep.aug_gen, ep.sums, ep.seen)})
    if stopping:
        cause = "Ctrl-C" if loop.stop.signum == signal.SIGINT else f"signal {loop.stop.signum}"
        raise Preempted(f"stopped by {cause} after step {i // accum + 1} of epoch {epoch + 1}; "
                        f"{loop.out / 'checkpoint.pt'} holds it: rerun the same command with --resume",
                        loop.stop.signum)


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
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    amp = cfg.train.amp  # float16 on a CPU is refused by `setup`
    amp_dtype = torch.bfloat16 if cfg.train.amp_dtype == "bfloat16" else torch.float16
    start = time.perf_counter()
    batches = split.batches(batch, sampler=cfg.data.sampler, seed=cfg.train.seed, epoch=epoch, rank=dist.rank(),
                            world=world, start=first)
    # In a file the bar writes nothing: `check` writes a plain line at each check point instead.
    bar = Progress(steps, f"epoch {epoch + 1}/{cfg.train.epochs}", "step", initial=first // accum, lines=False)
    ep = Epoch(epoch, usable, num_batches, aug_gen, nonfinite, bar, start, elapsed_before, seen, sums)

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
            ep.seen += n
            for key, value in {"loss": loss, **logs}.items():
                # Tensors stay on the device (float64, as the epoch means always were); plain numbers stay numbers.
                value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
                ep.window[key] = ep.window.get(key, 0) + (value / group if group > 1 else value)
            if not last_of_group:
                continue
            loop.scaler.step(loop.optimizer)
            loop.scaler.update()
            # A parameter a method froze mid-run (MORE's more.freeze_general_at) keeps no optimiser state.
            for p in [p for p in loop.optimizer.state if not p.requires_grad]:
                del loop.optimizer.state[p]
            loop.scheduler.step()
            loop.method.after_step(model)
            bar.update()
            ep.window_steps += 1
            step_in_epoch = i // accum
            due = (bool(cfg.train.checkpoint_every)
                   and (epoch * steps + step_in_epoch + 1) % cfg.train.checkpoint_every == 0)
            if step_in_epoch % cfg.train.log_every == 0 or due or (world == 1 and loop.stop.signum is not None):
                check(loop, ep, i, due)
        check(loop, ep, usable - 1)  # always before the epoch's checkpoint: a NaN never reaches checkpoint.pt
    dist.average_bn_stats(model)  # before evaluation and checkpointing, so every rank holds the same model
    loop.method.after_epoch(model, epoch)
    elapsed = elapsed_before + time.perf_counter() - start
    means = dist.mean_over_ranks({k: float(v) / steps for k, v in ep.sums.items()})
    stats = {f"train_{k}" if k == "loss" else k: v for k, v in means.items()}
    stats.update(lr=loop.optimizer.param_groups[0]["lr"], images_per_sec=ep.seen * world / elapsed,
                 epoch_seconds=elapsed)
    return stats


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
                trackers=Trackers([]), stop=StopFlag(), best={"metric": -1.0, "epoch": None})

