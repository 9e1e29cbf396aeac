"""The one training engine: every method runs through `fit`.

    fit: build data, model, method -> for each epoch: train_one_epoch, evaluate, checkpoint
         -> select the checkpoint -> method.finalize (merge, fold) -> post-hoc adjustment
         -> results.json, model.pt + model.yaml
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml
from torch import nn
from tqdm import tqdm

from longtail import distributed as dist
from longtail.checkpoint import atomic_torch_save, atomic_write_json, atomic_write_text, load_checkpoint
from longtail.config import Config, flatten, flatten_saved, from_dict, read_yaml, resolve_epochs, save_config
from longtail.data import LTData, build_data
from longtail.errors import ConfigError, DivergedError
from longtail.losses import build_loss
from longtail.methods import build_method
from longtail.methods.base import RunInfo
from longtail.metrics import flip_tta, format_table, gather_unique, summarize
from longtail.models import build_model, load_exported, model_spec

# Keys that may differ between a run and its resumption without changing what is computed.
RESUME_FREE_KEYS = {"data.root", "data.num_workers", "train.device", "train.log_every", "train.find_unused_parameters"}


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


def effective_lr(cfg: Config) -> float:
    """`optim.lr`, scaled by the linear rule when asked: lr * world * batch / base_batch."""
    if cfg.optim.lr_scaling == "none":
        return cfg.optim.lr
    base = cfg.optim.base_batch_size or cfg.data.batch_size
    return cfg.optim.lr * dist.world_size() * cfg.data.batch_size / base


def build_optimizer(cfg: Config, groups: list[dict]) -> torch.optim.Optimizer:
    lr = effective_lr(cfg)
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas))


def resolved_schedule(cfg: Config) -> dict:
    """Epoch numbers the fractional settings resolve to for this run's length."""
    epochs = cfg.train.epochs
    return {
        "warmup_epochs": round(cfg.schedule.warmup_epochs * epochs, 3) if cfg.schedule.warmup_epochs < 1
        else cfg.schedule.warmup_epochs,
        "milestones": [resolve_epochs(m, epochs) for m in cfg.schedule.milestones],
        "drw_start_epoch": None if cfg.loss.drw_start is None else resolve_epochs(cfg.loss.drw_start, epochs),
    }


def lr_factor(step: int, cfg: Config, steps_per_epoch: int) -> float:
    """Multiplier of the base lr at optimiser step `step`: linear warm-up, then multistep or cosine."""
    resolved = resolved_schedule(cfg)
    total = cfg.train.epochs * steps_per_epoch
    w = cfg.schedule.warmup_epochs
    warmup = int(round(w * total)) if w < 1 else int(w * steps_per_epoch)  # in steps, so short runs keep it
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule.name == "multistep":
        epoch = step // steps_per_epoch
        return cfg.schedule.gamma ** sum(epoch >= m for m in resolved["milestones"])
    if cfg.schedule.name == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        floor = cfg.schedule.min_lr / effective_lr(cfg)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def collect_logits(
    model: nn.Module, split: Any, device: torch.device, batch_size: int = 512, tta: str = "none"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets of a whole split, in split order, each sample exactly once across processes."""
    was_training = model.training
    model.eval()
    logits, targets, idxs = [], [], []
    for x, y, idx in split.batches(batch_size, sampler=None, seed=0, epoch=0, rank=dist.rank(), world=dist.world_size()):
        x = split.to_input(x, device, train=False, generator=None)
        z = flip_tta(model, x) if tta == "flip" else model(x)
        logits.append(z.float().cpu())
        targets.append(y)
        idxs.append(idx)
    model.train(was_training)
    return gather_unique(torch.cat(logits), torch.cat(targets), torch.cat(idxs))[:2]


def evaluate(model: nn.Module, split: Any, device: torch.device, cfg: Config, data: LTData) -> dict:
    logits, targets = collect_logits(model, split, device, cfg.eval.batch_size, cfg.eval.tta)
    return summarize(logits, targets, data.class_counts, thresholds_of(cfg, data), cfg.eval.ece_bins)


def thresholds_of(cfg: Config, data: LTData) -> tuple[int, int]:
    return tuple(cfg.eval.thresholds) if cfg.eval.thresholds is not None else tuple(data.default_thresholds)


# ----------------------------------------------------------------------------- training


def train_one_epoch(
    model: nn.Module,
    method: Any,
    step_fn: nn.Module,
    split: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    epoch: int,
    cfg: Config,
    device: torch.device,
    writer: Any,
    checkpoint_path: Path,
) -> dict:
    method.train_mode(model)
    steps = split.num_batches(cfg.data.batch_size, world=dist.world_size(), drop_last=False)
    total_steps = cfg.train.epochs * steps
    # Offset by rank so that the i-th image of every rank's batch does not get the same crop and flip.
    aug_gen = epoch_generator(cfg.train.seed + 7919 * dist.rank(), epoch, purpose=1)
    batches = split.batches(
        cfg.data.batch_size, sampler=cfg.data.sampler, seed=cfg.train.seed, epoch=epoch,
        rank=dist.rank(), world=dist.world_size(),
    )
    amp = cfg.train.amp and device.type == "cuda"
    sums: dict[str, float] = {}
    seen, start = 0, time.perf_counter()
    bar = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not dist.is_main(),
               leave=False, mininterval=1.0, dynamic_ncols=True)
    for i, (x, y, _) in enumerate(bar):
        if len(y) == 1:
            # BatchNorm cannot normalise a single training sample: skip a last batch of one (on every rank
            # alike, since ranks get equal shares) and keep the schedule on its step count.
            scheduler.step()
            continue
        x = split.to_input(x, device, train=True, generator=aug_gen)
        y = y.to(device, non_blocking=True)
        if cfg.train.channels_last and device.type == "cuda" and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        step = epoch * steps + i
        with torch.autocast(device.type, enabled=amp):
            loss, logs = step_fn(x, y, step / total_steps)
        if not torch.isfinite(loss):
            raise DivergedError(
                f"the loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; training stopped and the last "
                f"good checkpoint ({checkpoint_path}) is kept. Try a lower optim.lr or train.amp=false."
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        method.after_step(model)
        seen += len(y)
        for key, value in {"loss": loss.detach(), **logs}.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        if i % cfg.train.log_every == 0 or i == steps - 1:
            rate = seen * dist.world_size() / (time.perf_counter() - start)
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            if writer is not None:
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", lr, step)
                for key, value in logs.items():
                    writer.add_scalar(f"train/{key}", float(value), step)
    dist.average_bn_stats(model)  # before evaluation and checkpointing, so every rank holds the same model
    method.after_epoch(model, epoch)
    elapsed = time.perf_counter() - start
    means = dist.mean_over_ranks({k: v / steps for k, v in sums.items()}, device)
    stats = {f"train_{k}" if k == "loss" else k: v for k, v in means.items()}
    stats.update(lr=optimizer.param_groups[0]["lr"], images_per_sec=seen * dist.world_size() / elapsed,
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
    seed_everything(cfg.train.seed)
    data = build_data(cfg.data, data_root, download)
    if data.val is None and (cfg.eval.select == "best_val" or cfg.eval.split == "val"):
        raise ConfigError(f"eval.select={cfg.eval.select} / eval.split={cfg.eval.split} need a validation split and "
                          f"{data.name} has none here: set data.val_per_class (e.g. 20) or give data.val_list")
    if data.val is None and cfg.posthoc.kind != "none" and cfg.posthoc.tau is None:
        raise ConfigError(f"posthoc.tau: null means searching tau on the validation split, and {data.name} has none "
                          "here: set data.val_per_class (e.g. 20) or give a fixed posthoc.tau")
    # Resolve dataset defaults into the config so the saved config.yaml shows what was used.
    cfg.data.mean, cfg.data.std = list(data.mean), list(data.std)
    model = build_model(cfg.model, data.num_classes, data.in_channels, data.image_size)
    steps = data.train.num_batches(cfg.data.batch_size, world=dist.world_size(), drop_last=False)
    info = RunInfo(cfg=cfg, num_classes=data.num_classes, class_counts=list(data.class_counts),
                   epochs=cfg.train.epochs, steps_per_epoch=steps, device=device, data=data,
                   run_dir=str(run_dir) if run_dir else None)
    method = build_method(cfg, info, build_loss(cfg.loss, data.class_counts, cfg.train.epochs))
    model = method.prepare(model).to(device)
    if cfg.train.sync_bn:
        model = dist.convert_sync_batchnorm(model, device)
    if cfg.train.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return Run(cfg, data, model, method, info, device)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].astype(np.int64).tolist(),
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_resumable(saved: dict, cfg: Config, path: Path) -> None:
    old, new = flatten_saved(saved), flatten(cfg.to_dict())
    differ = sorted(k for k in set(old) | set(new) if k not in RESUME_FREE_KEYS and old.get(k) != new.get(k))
    if differ:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:5])
        raise ConfigError(f"--resume: the config differs from the one saved in {path} ({shown}); "
                          "resume with the same config or start a new --out directory")


def fit(cfg: Config, out_dir: str | Path, resume: bool = False, data_root: Optional[str] = None,
        download: bool = False) -> dict:
    """Train `cfg` into `out_dir` (resumable), then select, finalise, evaluate and export. Returns results."""
    out = Path(out_dir)
    ckpt_path = out / "checkpoint.pt"
    if not resume and (out / "checkpoint.pt").exists():
        raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it or choose another directory")
    if resume and not ckpt_path.exists():
        raise ConfigError(f"--resume: {ckpt_path} does not exist; start the run without --resume")
    run = setup(cfg, data_root, download, out)
    model, method, device, data = run.model, run.method, run.device, run.data
    groups = method.param_groups(model)
    if not any(group["params"] for group in groups):
        # Nothing trains (tau-normalisation): the method's finalize does all the work.
        if cfg.eval.select != "final":
            raise ConfigError(f"eval.select: {cfg.eval.select} picks an epoch, but method {cfg.method.name} trains "
                              "nothing; set eval.select=final")
        if dist.is_main():
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        return finish(run, out, {"metric": None, "epoch": None}, epoch=0)
    optimizer = build_optimizer(cfg, groups)
    steps = run.info.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp and device.type == "cuda")
    train_split = method.train_split(data.train, model)

    start_epoch, best = 0, {"metric": -1.0, "epoch": None}
    if resume:
        _check_resumable(read_yaml(out / "config.yaml"), cfg, out / "config.yaml")
        state = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        # The schedule is rebuilt at this run's step rather than loaded: steps per epoch and the linearly
        # scaled lr depend on the number of processes, which may differ from the run that saved it.
        for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
            group["initial_lr"] = base_lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps),
                                                      last_epoch=(state["epoch"] + 1) * steps - 1)
        scaler.load_state_dict(state["scaler"])
        _restore_rng(state["rng"])
        start_epoch, best = state["epoch"] + 1, state["best"]
        if dist.is_main():
            _truncate_metrics(out / "metrics.jsonl", start_epoch)
    elif dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    writer = _tensorboard(out) if dist.is_main() else None
    if dist.is_main():
        print(f"run {out}: {data.name} {len(data.train)} train images, {data.num_classes} classes, "
              f"{cfg.model.name}/{cfg.model.head}, method {cfg.method.name}{' + MORE' if cfg.more.enabled else ''}, "
              f"loss {cfg.loss.name}, {cfg.train.epochs} epochs on {device} "
              f"(schedule resolved to {resolved_schedule(cfg)})", flush=True)

    step_fn = dist.training_step(model, method, device, cfg.train.find_unused_parameters)
    select_split = {"best_val": data.val, "best_test": data.test}.get(cfg.eval.select)
    for epoch in range(start_epoch, cfg.train.epochs):
        stats = train_one_epoch(model, method, step_fn, train_split, optimizer, scheduler, scaler, epoch, cfg, device,
                                writer, ckpt_path)
        record = {"epoch": epoch + 1, **stats}
        last = epoch == cfg.train.epochs - 1
        scheduled = (epoch + 1) % cfg.eval.every == 0 or last
        for name, split in (("val", data.val), ("test", data.test)):
            # The selection split is evaluated every epoch; the other only every `eval.every` epochs.
            if split is not None and (scheduled or split is select_split):
                m = evaluate(model, split, device, cfg, data)
                record[name] = {k: m[k] for k in ("top1", "balanced", "many", "medium", "few", "ece", "nll")}
        if cfg.train.track_every and (epoch + 1) % cfg.train.track_every == 0:
            from longtail.analysis import track

            record["track"] = track(model, data.train, device)
        if select_split is not None:
            score = record["val" if cfg.eval.select == "best_val" else "test"]["balanced"]
            if score > best["metric"]:
                best = {"metric": score, "epoch": epoch + 1}
                if dist.is_main():
                    atomic_torch_save({"model": model.state_dict(), "epoch": epoch + 1, "metric": score}, out / "best.pt")
        if dist.is_main():
            _log_epoch(out, writer, record)
            atomic_torch_save({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                "best": best, "rng": _rng_state(), "config": cfg.to_dict(),
            }, ckpt_path)
        dist.barrier()
    if writer is not None:
        writer.close()
    results = finish(run, out, best)
    dist.cleanup()
    return results


def finish(run: Run, out: Path, best: dict, epoch: Optional[int] = None) -> dict:
    """Select the checkpoint, finalise the method, apply post-hoc adjustment, evaluate and export."""
    cfg, model, data, device = run.cfg, run.model, run.data, run.device
    epoch = cfg.train.epochs if epoch is None else epoch
    if cfg.eval.select != "final":
        state = load_checkpoint(out / "best.pt", map_location=device)
        model.load_state_dict(state["model"])
        epoch = state["epoch"]
    model = run.method.finalize(model)
    posthoc = None
    if cfg.posthoc.kind != "none":
        from longtail.methods.posthoc import apply_posthoc

        model, posthoc = apply_posthoc(model, cfg, data, device)
    split = data.val if cfg.eval.split == "val" else data.test
    metrics = evaluate(model, split, device, cfg, data)
    results = {
        **metrics,
        "split": cfg.eval.split,
        "checkpoint": cfg.eval.select,
        "epoch": epoch,
        "seed": cfg.train.seed,
        "dataset": data.name,
        "imbalance": cfg.data.imbalance,
        "selection": cfg.data.selection,
        "val_per_class": cfg.data.val_per_class,
        "indices_sha256": data.indices_sha256,
        "model": cfg.model.name,
        "method": cfg.method.name + ("+more" if cfg.more.enabled else ""),
        "loss": cfg.loss.name,
        "epochs": cfg.train.epochs,
        "tta": cfg.eval.tta,
        "schedule_resolved": resolved_schedule(cfg),
        "effective_batch_size": cfg.data.batch_size * dist.world_size(),
        "effective_lr": effective_lr(cfg),
        "world_size": dist.world_size(),
        "posthoc": posthoc,
        "method_record": run.info.extra or None,
        "config": cfg.to_dict(),
    }
    if dist.is_main():
        export_model(model, cfg, data, out)
        atomic_write_json(out / "results.json", results)
        print(format_table([(f"{results['method']}/{cfg.loss.name} ({cfg.eval.split}, {cfg.eval.select})", results)]))
    dist.barrier()  # no rank returns before rank 0 has written the run's files
    return results


def export_model(model: nn.Module, cfg: Config, data: LTData, out: Path) -> None:
    """`model.pt`: a plain state dict; `model.yaml`: the architecture it loads into."""
    spec = model_spec(cfg.model, model, data.num_classes, data.in_channels, data.image_size)
    spec["data"] = {"name": data.name, "mean": list(data.mean), "std": list(data.std)}
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    atomic_write_text(out / "model.yaml", yaml.safe_dump(spec, sort_keys=False))


def _tensorboard(out: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out))


def _log_epoch(out: Path, writer: Any, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for split in ("val", "test"):
            for key, value in record.get(split, {}).items():
                if value is not None:
                    writer.add_scalar(f"{split}/{key}", value, record["epoch"])
        for key, value in record.get("track", {}).items():
            if isinstance(value, (int, float)):
                writer.add_scalar(f"track/{key}", value, record["epoch"])
    parts = [f"epoch {record['epoch']}", f"loss {record['train_loss']:.4f}", f"lr {record['lr']:.2e}",
             f"{record['images_per_sec']:.0f} img/s"]
    for split in ("val", "test"):
        if split in record:
            parts.append(f"{split} top1 {record[split]['top1']:.2f}")
    print(" | ".join(parts), flush=True)


def _truncate_metrics(path: Path, next_epoch: int) -> None:
    """Drop records of epochs after the checkpoint (a run killed between the two writes)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= next_epoch]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- finished runs


@dataclass
class LoadedRun:
    cfg: Config
    model: nn.Module
    data: LTData
    run_dir: Path
    results: Optional[dict]


def load_run(path: str | Path, data_root: Optional[str] = None, download: bool = False) -> LoadedRun:
    """A finished run (its directory, or a model.pt inside one): config, exported model, data."""
    path = Path(path)
    # Checked first: a mistyped name must not fall back to the model.pt of the folder it points into.
    if not path.exists():
        raise ConfigError(f"{path} does not exist: expected a run directory written by `longtail train` "
                          "or the model.pt in one")
    run_dir = path if path.is_dir() else path.parent
    model_pt = path if path.is_file() else run_dir / "model.pt"
    for needed in (run_dir / "config.yaml", run_dir / "model.yaml", model_pt):
        if not needed.exists():
            raise ConfigError(f"{needed} does not exist: expected a run directory written by `longtail train` "
                              "(config.yaml, model.yaml, model.pt)")
    cfg = from_dict(read_yaml(run_dir / "config.yaml"))
    spec = read_yaml(run_dir / "model.yaml")
    state = load_checkpoint(model_pt)
    # checkpoint.pt / best.pt hold the weights before the method's finalize (MORE merge, head folding).
    if not isinstance(state, dict) or ("model" in state and "epoch" in state):
        raise ConfigError(f"{model_pt} is not an exported model (a plain state dict; checkpoint.pt and best.pt "
                          "are training checkpoints): pass the run directory or its model.pt")
    model = load_exported(spec, state)
    data = build_data(cfg.data, data_root, download)
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    return LoadedRun(cfg, model, data, run_dir, results)


def evaluate_run(path: str | Path, split_name: str = "test", plots: bool = False, data_root: Optional[str] = None,
                 download: bool = False) -> dict:
    """`longtail eval`: re-evaluate an exported model, write eval-<split>.json (and figures)."""
    run = load_run(path, data_root, download)
    split = run.data.val if split_name == "val" else run.data.test
    if split is None:
        raise ConfigError(f"--split val: the run {run.run_dir} has no validation split (data.val_per_class / data.val_list)")
    device = select_device(run.cfg.train.device)
    model = run.model.to(device)
    logits, targets = collect_logits(model, split, device, run.cfg.eval.batch_size, run.cfg.eval.tta)
    metrics = summarize(logits, targets, run.data.class_counts, thresholds_of(run.cfg, run.data), run.cfg.eval.ece_bins)
    metrics.update(split=split_name, model_file=str(Path(path)), tta=run.cfg.eval.tta)
    if plots:
        from longtail import plots as plotting

        fig = run.run_dir / "figures"
        fig.mkdir(exist_ok=True)
        metrics["figures"] = [
            str(plotting.plot_per_class_accuracy(metrics["per_class"], run.data.class_counts, fig / f"per_class-{split_name}.png")),
            str(plotting.plot_confusion(logits, targets, run.data.num_classes, fig / f"confusion-{split_name}.png", run.data.class_counts)),
            str(plotting.plot_reliability(logits, targets, fig / f"reliability-{split_name}.png", run.cfg.eval.ece_bins)),
        ]
    atomic_write_json(run.run_dir / f"eval-{split_name}.json", metrics)
    return metrics
