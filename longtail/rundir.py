"""The run directory's format: the exported model (model.pt + model.yaml) written, and read back to
evaluate it (`longtail eval`), predict with it or analyse it.

Layer: run services. Imports the foundation, the building blocks and `inference`.
"""
from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import torch
import yaml
from torch import nn

from longtail.calibration import calibration_record, fit_temperature
from longtail.checkpoint import (atomic_torch_save, atomic_write_json, atomic_write_text, load_checkpoint,
                                 make_directory, read_json, remove_stale_temporaries, run_lock)
from longtail.config import Config, from_dict, read_yaml
from longtail.data import LTData, build_data
from longtail.data.image_transforms import LIFT_EXPAND, eval_resize
from longtail.data.splits import InMemorySplit
from longtail.errors import ConfigError
from longtail.finetune import adapter_spec
from longtail.inference import collect_logits, eval_precision
from longtail.models import load_exported, model_spec, scale_head
from longtail.priors import logit_prior, logit_prior_vector
from longtail.runtime import select_device
from longtail.task import task_of


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


def calibrate(model: nn.Module, cfg: Config, data: LTData, device: torch.device, prior: str) -> float:
    """Fit the temperature on the validation split (NLL under the logits' prior) and fold 1 / T into the head."""
    logits, targets = collect_logits(model, data.val, device, cfg.eval.batch_size, cfg.eval.tta)
    temperature = fit_temperature(logits, targets, logit_prior_vector(prior, data.class_counts))
    scale_head(model.head, 1.0 / temperature)
    return temperature


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
    state = load_checkpoint(model_pt, kind="model file")
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
    logits, targets = collect_logits(model, split, device, cfg.eval.batch_size, cfg.eval.tta, f"evaluate {split_name}",
                                     **eval_precision(cfg))
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
        make_directory(fig)
        remove_stale_temporaries(fig)  # of a killed `eval --plots` or `analyze`
        metrics["figures"] = [str(f) for f in task.figures(metrics, logits, targets, run.data, run.cfg, fig, split_name,
                                                           temperature)]
    atomic_write_json(run.run_dir / f"eval-{split_name}.json", metrics)
    return metrics

