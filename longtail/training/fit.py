"""`fit`: a run from start (or resume) to results.json and the exported model.

    fit: setup -> for each epoch: train_one_epoch, evaluate, checkpoint
         -> finish: select the checkpoint -> method.finalize (merge, fold) -> post-hoc adjustment
            -> temperature calibration -> model.pt + model.yaml -> results.json

Layer: training (the top of it). Imports everything below it; only the tools and the CLI import it.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch

from longtail import distributed as dist
from longtail.checkpoint import append_line, atomic_write_json, load_checkpoint, run_lock
from longtail.config import Config, from_dict, read_yaml
from longtail.errors import ConfigError
from longtail.finetune import parameter_counts
from longtail.inference import evaluate
from longtail.lowrank import merge
from longtail.losses import logit_scale
from longtail.metrics import format_table
from longtail.models import scale_head
from longtail.priors import logit_prior
from longtail.progress import say
from longtail.provenance import environment, native_bf16, segment
from longtail.methods import check_config, training_folds
from longtail.rundir import calibrate, export_model, load_model, score_model
from longtail.task import get_task, task_of
from longtail.training.checkpointing import (check_new_run_directory, check_resumable, occupied, restore_best,
                                             resume_loop, save_checkpoint, start_fresh, truncate_metrics)
from longtail.training.loop import build_loop, needs_two_samples, train_one_epoch
from longtail.training.optim import describe_schedule, effective_batch_size, effective_lr, resolved_schedule
from longtail.training.setup import Run, setup
from longtail.training.state import Loop, run_eta
from longtail.training.stopping import Preempted
from longtail.training.trackers import Trackers, check_installed, open_trackers


def fit(cfg: Config | dict, out_dir: str | Path, resume: bool = False, data_root: Optional[str] = None,
        download: bool = False) -> dict:
    """Train `cfg` into `out_dir`, then select, finalise, evaluate and export. Returns results.

    `cfg` is a `Config`, or a plain dict of sections as a YAML config holds them (`{"train": {"epochs": 2}}`),
    validated as a config file is: an unknown key or a bad value is a ConfigError naming it.

    With `resume`, one command serves every moment of a run's life (a requeued cluster job): it starts a
    run that has no checkpoint yet, continues one that has, and reports a finished one unchanged. The run
    holds `out_dir`'s lock from before its first read to its end: a second writer is refused.
    """
    if isinstance(cfg, dict):
        cfg = from_dict(cfg)
    elif not isinstance(cfg, Config):
        raise ConfigError(f"fit: cfg must be a longtail.config.Config or a dict of config sections "
                          f"(e.g. {{'train': {{'epochs': 2}}}}), got {type(cfg).__name__}")
    out = Path(out_dir)
    check_config(cfg)  # the method's own rules, before the directory is locked or read
    check_installed(cfg)  # the trackers' packages, before the data is loaded
    # Under torchrun the writing rank holds it; the others write nothing into the directory.
    with run_lock(out) if dist.is_main() else contextlib.nullcontext():
        return _fit(cfg, out, resume, data_root, download)


def _fit(cfg: Config, out: Path, resume: bool, data_root: Optional[str], download: bool) -> dict:
    ckpt_path, results_path = out / "checkpoint.pt", out / "results.json"
    if not resume and (ckpt_path.exists() or results_path.exists()):
        raise occupied(out, cfg)
    if not ckpt_path.exists() and not results_path.exists():
        check_new_run_directory(out, cfg)
    if resume and (out / "config.yaml").exists():  # before any work; again once setup resolved the nulls
        check_resumable(read_yaml(out / "config.yaml"), cfg, out / "config.yaml")
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
        check_resumable(read_yaml(out / "config.yaml"), cfg, out / "config.yaml")
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
            start_fresh(cfg, out)
        with open_trackers(cfg, out, 0) as trackers:
            results = finish(run, out, {"metric": None, "epoch": None}, epoch=0,
                             segments=[segment(device, 0, 0, precision(cfg))], trackers=trackers)
        dist.cleanup()
        return results
    train_split = method.train_split(data.train, model)
    loop = build_loop(run, out)
    start_epoch, partial, epochs_done = 0, None, 0
    if not fresh:
        state = load_checkpoint(ckpt_path, map_location=device)
        start_epoch, partial = resume_loop(loop, state, ckpt_path)
        loop.segments = list(state.get("segments", []))  # checkpoints written before segments were recorded: none
        epochs_done = state["epoch"] + 1
        if dist.is_main():
            truncate_metrics(out / "metrics.jsonl", epochs_done)
            restore_best(out, state, device)
    elif dist.is_main():
        start_fresh(cfg, out)
    loop.segments.append(segment(device, start_epoch, partial["batch"] if partial else 0, precision(cfg)))
    with open_trackers(cfg, out, epochs_done) as trackers:
        loop.trackers = trackers
        results = _train(run, loop, out, train_split, start_epoch, partial)
    dist.cleanup()
    return results


def _train(run: Run, loop: Loop, out: Path, train_split: Any, start_epoch: int, partial: Optional[dict]) -> dict:
    """The epochs from `start_epoch` (`partial`: a mid-epoch position in it), then `finish`."""
    cfg, model, method, device, data = run.cfg, run.model, run.method, run.device, run.data
    loop.started = (time.perf_counter(), loop.scheduler.last_epoch)
    say(f"run {out}: {data.name} {len(data.train)} train images, {data.num_classes} classes, "
        f"{cfg.model.name}/{cfg.model.head}, method {cfg.method.name}{' + MORE' if cfg.more.enabled else ''}, "
        f"loss {cfg.loss.name}, augmentation {augmentation_summary(cfg)}, {cfg.train.epochs} epochs of "
        f"{loop.steps_per_epoch} steps on {device} (schedule: {describe_schedule(cfg)})")
    trainable, total = parameter_counts(model)
    say(f"parameters: {trainable:,} trainable of {total:,} (finetune.mode {cfg.finetune.mode})")
    hint = precision_hint(cfg, device)
    if hint:
        say(hint)
    if loop.trackers.where():
        say(f"loggers: {loop.trackers.where()}")
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
                    record.update(method.diagnostics(model, data.train, device))
                if select_split is not None:
                    score = record["val" if cfg.eval.select == "best_val" else "test"][task_of(data).select_key]
                    if score > loop.best["metric"]:
                        loop.best = {"metric": score, "epoch": epoch + 1}
                if dist.is_main():
                    _log_epoch(out, loop.trackers, record, cfg.train.epochs, run_eta(loop))
                save_checkpoint(loop, epoch + 1)
        except Preempted:
            dist.cleanup()
            raise
    return finish(run, out, loop.best, segments=loop.segments, trackers=loop.trackers)


def finish(run: Run, out: Path, best: dict, epoch: Optional[int] = None, segments: Optional[list] = None,
           trackers: Optional[Trackers] = None) -> dict:
    """Select the checkpoint, finalise the method, apply post-hoc adjustment and calibration, evaluate and export;
    the final metrics go to the `trackers` too."""
    cfg, model, data, device = run.cfg, run.model, run.data, run.device
    epoch = cfg.train.epochs if epoch is None else epoch
    if cfg.eval.select != "final":
        state = load_checkpoint(out / "best.pt", map_location=device)
        model.load_state_dict(state["model"])
        epoch = state["epoch"]
    # Each kind of low-rank part has one owner of its merge: LoRA's (finetune.mode lora) merge here, before the
    # method's finalize, so methods fold into a plain model; MORE's merge in More.finalize, before the method it
    # wraps folds. With LoRA + MORE the parts are the same ones, and More's merge finds none left (merge is
    # idempotent).
    model = run.method.finalize(merge(model) if cfg.finetune.mode == "lora" else model)
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
        if trackers is not None:
            trackers.log_final({f"final/{key}": value for key, value in scores.items()
                                if isinstance(value, (int, float)) and not isinstance(value, bool)})
        print(format_table([(f"{results['method']}/{cfg.loss.name} ({cfg.eval.split}, {cfg.eval.select})", results)],
                           task_of(data).columns))
        if temperature is not None:
            print(f"temperature {temperature:.4f}: ECE {results['ece_uncalibrated']:.2f} -> {results['ece']:.2f}, "
                  f"NLL {results['nll_uncalibrated']:.3f} -> {results['nll']:.3f}")
    dist.barrier()  # no rank returns before rank 0 has written the run's files
    return results


def precision(cfg: Config) -> str:
    """How the run trains and evaluates, e.g. `bfloat16 autocast + channels_last, evaluated in bfloat16`: the part
    of a run's segment record that says what its speed depends on."""
    name = f"{cfg.train.amp_dtype} autocast" if cfg.train.amp else "float32"
    return (name + (" + channels_last" if cfg.train.channels_last else "")
            + (f", evaluated in {cfg.train.amp_dtype}" if cfg.eval.amp else ""))


def precision_hint(cfg: Config, device: torch.device, cpuinfo: Optional[str] = None) -> Optional[str]:
    """A one-line hint when a run trains in float32 on a CPU that computes bfloat16 natively; for MORE, a
    warning when it trains in autocast instead (docs/methods/more.md#precision), and no hint to do so."""
    if cfg.more.enabled:
        if not cfg.train.amp:
            return None
        return (f"warning: more.enabled with train.amp: a {cfg.train.amp_dtype} forward pass rounds the logits by more "
                "than MORE's low-rank part moves them once it is small (measured in bfloat16: 0.27 % against 0.05 %), "
                "so L_MORE is computed from rounding; train MORE in float32 (train.amp=false; "
                "docs/methods/more.md#precision)")
    native = native_bf16(cpuinfo) if device.type == "cpu" and not cfg.train.amp else None
    if native is None:
        return None
    return (f"hint: this CPU has native bfloat16 ({native}) and the run trains in float32; `longtail train ... --fast` "
            "(train.amp=true train.amp_dtype=bfloat16 train.channels_last=true eval.amp=true) trains ResNet-32 about "
            "2.4x faster and evaluates it about 4x faster (docs/cli.md#speed)")


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


def _log_epoch(out: Path, trackers: Trackers, record: dict, epochs: int, eta: str) -> None:
    append_line(out / "metrics.jsonl", json.dumps(record))
    trackers.log_epoch(record)
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['train_loss']:.4f}", f"lr {record['lr']:.2e}",
             f"{record['images_per_sec']:.0f} img/s"]
    for split in ("val", "test"):
        if split in record:  # the task's headline number: top1, or map
            key, value = next(iter(record[split].items()))
            parts.append(f"{split} {key} {value:.2f}")
    say(" | ".join([*parts, f"ETA {eta}"]))

