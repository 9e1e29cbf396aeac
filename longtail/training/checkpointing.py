"""All of the resume policy: what checkpoint.pt and best.pt hold, loading them back into a `Loop`, which
config keys may change on --resume, and how a run directory is made consistent after a kill.
(`longtail.checkpoint` only writes and reads files atomically.)

Layer: training. Imports the foundation, the building blocks and `training.state`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from longtail import distributed as dist
from longtail.checkpoint import atomic_torch_save, atomic_write_text, load_checkpoint, read_jsonl
from longtail.config import Config, flatten, flatten_saved, read_yaml, save_config
from longtail.errors import ConfigError
from longtail.runtime import restore_rng, rng_state
from longtail.training.optim import lr_factor
from longtail.training.state import Loop


# Keys that may differ between a run and its resumption without changing what is computed.
RESUME_FREE_KEYS = {"data.root", "data.num_workers", "data.on_device", "train.device", "train.log_every",
                    "train.checkpoint_every", "train.find_unused_parameters", "train.loggers"}


# Keys whose null `setup` resolves to the dataset's values (and saves resolved).
RESOLVED_KEYS = {"data.mean", "data.std", "data.resize_to"}


def save_checkpoint(loop: Loop, epochs_done: int, partial: Optional[dict] = None) -> None:
    """checkpoint.pt (rank 0), then best.pt when this checkpoint made it: a kill between the two leaves a
    checkpoint whose `best` names its own epoch, and resuming rewrites best.pt from it (`restore_best`)."""
    rank_states = dist.all_gather_object(partial.pop("rank")) if partial is not None else None
    if dist.is_main():
        state = {
            "model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict(), "scaler": loop.scaler.state_dict(), "epoch": epochs_done - 1,
            "best": loop.best, "rng": rng_state(), "config": loop.cfg.to_dict(), "segments": loop.segments,
        }
        if partial is not None:
            state["partial"] = {**partial, "world": dist.world_size(), "ranks": rank_states}
        atomic_torch_save(state, loop.out / "checkpoint.pt")
        if partial is None and loop.best["epoch"] == epochs_done:
            atomic_torch_save({"model": loop.model.state_dict(), "epoch": epochs_done, "metric": loop.best["metric"]},
                              loop.out / "best.pt")
    dist.barrier()


def resume_loop(loop: Loop, state: dict, path: Path) -> tuple[int, Optional[dict]]:
    """Load a checkpoint into `loop`; returns the epoch to continue with and the mid-epoch position, if any."""
    cfg, steps, partial = loop.cfg, loop.steps_per_epoch, state.get("partial")
    if partial is not None and partial["world"] != dist.world_size():
        raise ConfigError(f"--resume: {path} was written in the middle of epoch {partial['epoch'] + 1} by "
                          f"{partial['world']} processes, and this run has {dist.world_size()}: a mid-epoch "
                          f"position is a position in each process's share of the epoch. Resume with "
                          f"{partial['world']} processes (checkpoints written at epoch ends resume with any number)")
    saved = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
    built = [len(g["params"]) for g in loop.optimizer.param_groups]
    if saved != built:  # torch would raise, or hand one group's momenta to another's parameters
        raise ConfigError(f"--resume: the optimiser in {path} holds parameter groups of {saved} parameters, and this "
                          f"version of longtail builds {built} from the same config: the groups changed (with "
                          "more.lowrank_lr, now finetune.lr_lowrank, and finetune.lr_head the head's low-rank part "
                          "took lr_head); finish the run with the version that started it or start a new --out "
                          "directory")
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
        restore_rng(state["rng"])
        return state["epoch"] + 1, None
    mine = partial["ranks"][dist.rank()]
    buffers = dict(loop.model.named_buffers())
    for name, value in mine["bn"].items():  # each rank's own BN statistics: they are averaged at epoch ends
        buffers[name].copy_(value)
    restore_rng(mine["rng"])
    return partial["epoch"], partial


def config_differences(saved: dict, cfg: Config) -> list[str]:
    """Keys where a saved config.yaml and `cfg` differ in what they compute (`RESUME_FREE_KEYS` aside; a
    null that `setup` resolves matches the resolved value saved)."""
    old, new = flatten_saved(saved), flatten(cfg.to_dict())
    return sorted(k for k in set(old) | set(new) if k not in RESUME_FREE_KEYS and old.get(k) != new.get(k)
                  and not (k in RESOLVED_KEYS and new.get(k) is None))


def shown_differences(saved: dict, cfg: Config, differ: list[str]) -> str:
    old, new = flatten_saved(saved), flatten(cfg.to_dict())
    more = f", and {len(differ) - 5} more" if len(differ) > 5 else ""
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:5]) + more


def free_directory(out: Path) -> Path:
    """`out-2`, `out-3`, ...: the first that does not exist, for a second run of a recipe beside the first."""
    n = 2
    while Path(f"{out}-{n}").exists():
        n += 1
    return Path(f"{out}-{n}")


def check_resumable(saved: dict, cfg: Config, path: Path) -> None:
    differ = config_differences(saved, cfg)
    if differ:
        raise ConfigError(f"--resume: the config differs from the one saved in {path} "
                          f"({shown_differences(saved, cfg, differ)}); resume with the same config (only "
                          f"{', '.join(sorted(RESUME_FREE_KEYS))} may differ), or train this one beside it with "
                          f"--out {free_directory(path.parent)} and no --resume")


def occupied(out: Path, cfg: Config) -> ConfigError:
    """The refusal of a new run in a directory that holds one: --resume only when that run is of this config,
    else a free directory to pass as --out."""
    beside = f"--out {free_directory(out)}"
    try:
        saved = read_yaml(out / "config.yaml")
        differ = config_differences(saved, cfg)
    except ConfigError:  # no config.yaml, or one this version cannot read: not a run to continue
        return ConfigError(f"--out {out} already holds a run; pass {beside} (a free directory) to train this one")
    if not differ:
        return ConfigError(f"--out {out} already holds a run of this config; pass --resume to continue it (or show "
                           f"its results if it finished), or {beside} for a second run")
    return ConfigError(f"--out {out} already holds a run of another config ({shown_differences(saved, cfg, differ)}); "
                       f"pass {beside} (a free directory) to train this one beside it")


def check_new_run_directory(out: Path, cfg: Config) -> None:
    """A run without a checkpoint starts in a new or empty directory, or in one where a run of this config was
    stopped before its first checkpoint: never over files of the user's, which `start_fresh` would replace."""
    if not out.is_dir():
        return
    config = out / "config.yaml"
    if config.exists():
        text = config.read_text(errors="replace")
        saved = read_yaml(config)
        # A config longtail saved is a plain dump of every section: no comments, no `base:`.
        if "base" in saved or any(line.lstrip().startswith("#") for line in text.splitlines()):
            raise ConfigError(f"--out {out} holds a config.yaml written by hand (it has comments or a base: key), "
                              f"which a run would overwrite with its own; give --out a directory of its own, "
                              f"e.g. {out / 'run'}")
        differ = config_differences(saved, cfg)
        if differ:
            raise ConfigError(f"--out {out} holds the config.yaml of another config that never reached a checkpoint "
                              f"({shown_differences(saved, cfg, differ)}); remove that directory, or pass "
                              f"--out {free_directory(out)}")
        return
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ConfigError(f"--out {out} is not empty and holds no run ({shown}); a run writes config.yaml, "
                          f"metrics.jsonl and more there: give a new or empty directory, e.g. {out / 'run'}")


def start_fresh(cfg: Config, out: Path) -> None:
    """A new run directory, or one whose run was killed before its first checkpoint: that attempt's
    epoch records, best.pt, TensorBoard events, CSV rows and tracker runs (trackers.json) belong to a branch
    nothing continues."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / "metrics.jsonl", out / "best.pt", *out.glob("events.out.tfevents.*"), out / "metrics.csv",
                  out / "summary.csv", out / "trackers.json"]:
        stale.unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")


def restore_best(out: Path, state: dict, device: torch.device) -> None:
    """best.pt is written after the checkpoint that records it; a kill between the two leaves a checkpoint
    whose best epoch is its own, and its weights are the best ones."""
    epochs_done = state["epoch"] + 1
    if "partial" in state or state["best"].get("epoch") != epochs_done:
        return
    path = out / "best.pt"
    if not path.exists() or load_checkpoint(path, map_location=device).get("epoch") != epochs_done:
        atomic_torch_save({"model": state["model"], "epoch": epochs_done, "metric": state["best"]["metric"]}, path)


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Keep the records of the epochs the checkpoint holds: later ones (a run killed between the epoch's
    record and its checkpoint) and a torn last line (killed mid-write) are dropped."""
    if not path.exists():
        return
    kept = [record for record in read_jsonl(path) if record["epoch"] <= epochs_done]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))

