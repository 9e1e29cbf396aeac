"""Experiment trackers (`train.loggers`): where a run's curves, its settings and its final metrics go besides
metrics.jsonl: TensorBoard, a CSV file, MLflow, Weights & Biases.

Each tracker is a small class with the same four calls: `log` (the training values at an optimiser step),
`log_epoch` (an epoch's record), `log_final` (the final metrics, beside the flattened config it was built
with) and `close`. `open_trackers` builds all of them on rank 0 before the first training step, so a missing
package or an unusable store stops the run before anything trains. A resumed run continues the MLflow and W&B
runs it started (their ids are kept in the run directory's trackers.json).

Layer: training. Imports the foundation, `distributed` and `training.stopping`.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from longtail import distributed as dist
from longtail.checkpoint import atomic_write_json, atomic_write_text, read_json
from longtail.config import Config, flatten
from longtail.errors import ConfigError
from longtail.progress import mode as progress_mode
from longtail.training.stopping import Preempted

EXTRAS = ("mlflow", "wandb")  # the trackers that need a package: each the name of its longtail extra too


def missing(name: str, exc: Optional[ImportError] = None) -> ConfigError:
    return ConfigError(f"train.loggers: {name} needs the {name} package{f' ({exc})' if exc else ''}: "
                       f"pip install 'longtail[{name}]'")


def check_installed(cfg: Config) -> None:
    """Before a run loads anything: every tracker's package can be imported."""
    for name in cfg.train.loggers:
        if name in EXTRAS and importlib.util.find_spec(name) is None:
            raise missing(name)


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as `section.key: value`, each value a number, a bool or a string (null and lists spelled out
    as JSON), the form every tracker takes as a run's parameters."""
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in flatten(cfg.to_dict()).items()}


def curves(record: dict) -> dict[str, float]:
    """An epoch record's values plotted against the epoch: val/<metric>, test/<metric>, track/<statistic>,
    MORE's diagnostics (more/discrepancy/<group>, more/ratio/<layer>)."""
    values = {}
    for split in ("val", "test"):
        values.update({f"{split}/{k}": v for k, v in record.get(split, {}).items() if v is not None})
    values.update({f"track/{k}": v for k, v in record.get("track", {}).items() if isinstance(v, (int, float))})
    values.update({f"more/discrepancy/{g}": v for g, v in record.get("more_discrepancy", {}).items() if v is not None})
    values.update({f"more/ratio/{layer}": v for layer, v in record.get("more_layer_ratio", {}).items()})
    return values


class Tracker:
    """What every tracker takes; `state` is what a resumed run needs to continue it (kept in trackers.json),
    `where` names the run it logs into, where that is not just the run directory (MLflow's, W&B's)."""

    state: Optional[dict] = None
    where = ""

    @staticmethod
    def store() -> str:
        """Where the tracker writes, named in the error when it cannot start ("": the run directory)."""
        return ""

    def log(self, values: dict[str, float], step: int) -> None:
        pass

    def log_epoch(self, record: dict) -> None:
        pass

    def log_final(self, metrics: dict[str, float]) -> None:
        pass

    def close(self, status: str) -> None:  # FINISHED, KILLED (a stop signal, Ctrl-C) or FAILED
        pass


class TensorBoard(Tracker):
    """Event files in the run directory; at the end the hparams summary (the flattened config and the final
    metrics), so TensorBoard's HPARAMS tab filters and compares runs by setting."""

    def __init__(self, out: Path, config: dict, saved: Optional[dict], epochs_done: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.config = SummaryWriter(str(out)), config

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_epoch(self, record: dict) -> None:
        self.log(curves(record), record["epoch"])

    def log_final(self, metrics: dict[str, float]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for summary in hparams(self.config, metrics):  # into this run's own event file, not a new sub-run
            self.writer.file_writer.add_summary(summary)
        self.log(metrics, 0)  # the values the hparams table shows for its metrics

    def close(self, status: str) -> None:
        self.writer.close()


class CSV(Tracker):
    """metrics.csv: one row per epoch, the record of metrics.jsonl flattened (`test/top1`, ...); rows of epochs a
    resumed run replays are replaced, not repeated. summary.csv at the end: one row of the final metrics and the
    flattened config."""

    def __init__(self, out: Path, config: dict, saved: Optional[dict], epochs_done: int):
        self.path, self.out, self.config = out / "metrics.csv", out, config
        self.rows = []
        if self.path.exists():  # a resumed run: the epochs its checkpoint holds
            self.rows = [row for row in csv.DictReader(io.StringIO(self.path.read_text()))
                         if int(row["epoch"]) <= epochs_done]

    def log_epoch(self, record: dict) -> None:
        self.rows.append(flatten(record, sep="/"))  # {"test": {"top1": 30.0}} -> {"test/top1": 30.0}
        write_csv(self.path, self.rows)

    def log_final(self, metrics: dict[str, float]) -> None:
        write_csv(self.out / "summary.csv", [{**metrics, **self.config}])


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))  # first seen first: a new column joins at the end
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


class MLflow(Tracker):
    """A run in the tracking store $MLFLOW_TRACKING_URI names (MLflow's default otherwise: sqlite:///mlflow.db in
    the working directory), in the experiment $MLFLOW_EXPERIMENT_NAME (default `longtail`); the config as its
    parameters, logged once when the run is created."""

    def __init__(self, out: Path, config: dict, saved: Optional[dict], epochs_done: int):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        if saved is not None:
            try:
                self.client.get_run(saved["run_id"])
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise ConfigError(f"train.loggers: mlflow: the run {saved['run_id']} that {out / 'trackers.json'} "
                                  f"continues is not in the tracking store {self.client.tracking_uri}; set "
                                  f"MLFLOW_TRACKING_URI={saved['tracking_uri']} as when the run started") from None
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "longtail")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=out.name,
                                                 tags={"longtail.run_dir": str(out.resolve())}).info.run_id
            params = [Param(key, str(value)) for key, value in config.items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.state = {"run_id": self.run_id, "tracking_uri": self.client.tracking_uri}
        self.where = f"mlflow run {self.run_id} in {self.client.tracking_uri}"

    @staticmethod
    def store() -> str:
        from mlflow import get_tracking_uri

        return f" (tracking store {get_tracking_uri()})"

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def log_epoch(self, record: dict) -> None:
        self.log(curves(record), record["epoch"])

    def log_final(self, metrics: dict[str, float]) -> None:
        self.log(metrics, 0)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class WandB(Tracker):
    """A Weights & Biases run, offline unless $WANDB_MODE says otherwise (`wandb sync` uploads it later), its files
    in the run directory's wandb/ unless $WANDB_DIR is set, in the project $WANDB_PROJECT (default `longtail`).
    The training values are plotted against `step` (optimiser steps), the epoch values against `epoch`."""

    def __init__(self, out: Path, config: dict, saved: Optional[dict], epochs_done: int):
        import wandb

        if "WANDB_MODE" not in os.environ:  # for the whole process: W&B's own usage reports follow its mode too
            wandb.setup(wandb.Settings(mode="offline"))
        defaults = {"dir": str(out), "project": "longtail"}
        chosen = {key: value for key, value in defaults.items() if f"WANDB_{key.upper()}" not in os.environ}
        self.run = wandb.init(name=out.name, config=config, allow_val_change=True, id=saved and saved["id"],
                              resume="allow" if saved else None, **chosen,
                              settings=wandb.Settings(silent=True) if progress_mode() == "off" else None)
        for prefix, axis in (("train", "step"), ("val", "epoch"), ("test", "epoch"), ("track", "epoch"),
                             ("more", "epoch")):
            self.run.define_metric(f"{prefix}/*", step_metric=axis)
        self.state = {"id": self.run.id}
        self.where = f"wandb {self.run.settings.mode} run {self.run.id} in {self.run.settings.sync_dir}"

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step})

    def log_epoch(self, record: dict) -> None:
        self.run.log({**curves(record), "epoch": record["epoch"]})

    def log_final(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


TRACKERS = {"tensorboard": TensorBoard, "csv": CSV, "mlflow": MLflow, "wandb": WandB}


class Trackers:
    """The run's trackers, called as one (none on ranks other than 0); as a context manager, closed with the
    run's outcome."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def where(self) -> str:
        """The MLflow and W&B runs logged into, for the status line that lets the user find them."""
        return "; ".join(tracker.where for tracker in self.trackers if tracker.where)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step)

    def log_epoch(self, record: dict) -> None:
        for tracker in self.trackers:
            tracker.log_epoch(record)

    def log_final(self, metrics: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_final(metrics)

    def close(self, status: str) -> None:
        for tracker in self.trackers:
            tracker.close(status)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        killed = kind is not None and issubclass(kind, (Preempted, KeyboardInterrupt))
        self.close("FINISHED" if kind is None else "KILLED" if killed else "FAILED")


def open_trackers(cfg: Config, out: Path, epochs_done: int) -> Trackers:
    """`train.loggers`' trackers of the run in `out` (on rank 0; the others get none), `epochs_done` epochs into
    it. One that cannot start is the same ConfigError on every rank, so no rank trains on alone."""
    opened, problem = [], None
    if dist.is_main():
        try:
            opened = start_trackers(cfg, out, epochs_done)
        except ConfigError as exc:
            problem = str(exc)
    problem = dist.all_gather_object(problem)[0]
    if problem is not None:
        raise ConfigError(problem)
    return Trackers(opened)


def start_trackers(cfg: Config, out: Path, epochs_done: int) -> list[Tracker]:
    """Start each tracker in turn; when one cannot, close those started and say why in one line."""
    saved = read_json(out / "trackers.json") if (out / "trackers.json").exists() else {}
    config, opened = flat_config(cfg), []
    for name in cfg.train.loggers:
        try:
            opened.append(TRACKERS[name](out, config, saved.get(name), epochs_done))
        except Exception as exc:
            Trackers(opened).close("FAILED")
            if isinstance(exc, ConfigError):
                raise
            if isinstance(exc, ImportError):
                raise missing(name, exc) from None
            first_line = (str(exc).strip().splitlines() or [""])[0]  # the store's own error: unwritable, unreachable
            raise ConfigError(f"train.loggers: {name} could not start{TRACKERS[name].store()}: "
                              f"{type(exc).__name__}: {first_line}") from None
    states = {name: tracker.state for name, tracker in zip(cfg.train.loggers, opened) if tracker.state}
    if states:
        atomic_write_json(out / "trackers.json", {**saved, **states})
    return opened
