"""Post-hoc logit adjustment (EWB, Hasegawa & Sato ICLR 2024), applied after training with no retraining.

multiplicative: z'_k = z_k / pi_k ** tau;  additive: z'_k = z_k - tau * log pi_k  (pi: training prior).
Both are per-class affine maps of the logits, so on a linear or fixed-ETF head they fold into the
weight and bias: the exported model has a plain linear head and costs nothing extra at inference.
tau is given, or searched on the validation split's balanced accuracy with its logits computed once.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from longtail.checkpoint import atomic_write_json, new_directory, replace_directory, run_lock
from longtail.config import Config, save_config
from longtail.errors import ConfigError
from longtail.inference import collect_logits, evaluate
from longtail.methods import training_folds
from longtail.metrics import format_table
from longtail.models.heads import ETFHead, LinearHead
from longtail.priors import class_prior
from longtail.progress import track
from longtail.rundir import export_model, folded_temperature, load_run, model_file
from longtail.runtime import select_device
from longtail.task import task_of

KINDS = ("multiplicative", "additive")
_SHOWN = ("top1", "balanced", "many", "medium", "few", "ece", "nll")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"posthoc.kind: {kind!r} cannot be applied; choose one of: {', '.join(KINDS)}")


def adjust_logits(logits: torch.Tensor, prior: torch.Tensor, kind: str, tau: float) -> torch.Tensor:
    """The adjusted logits z / pi ** tau (multiplicative) or z - tau log pi (additive)."""
    _check_kind(kind)
    prior = prior.to(logits.device, logits.dtype)
    if kind == "multiplicative":
        return logits / prior.pow(tau)
    return logits - tau * prior.log()


def tau_grid(grid: Sequence[float]) -> list[float]:
    """[start, stop, step] -> start, start + step, ..., stop (inclusive)."""
    start, stop, step = grid
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(n)]


def balanced_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean per-class accuracy (%) over the classes present in `targets`."""
    correct = logits.argmax(dim=1).eq(targets).double()
    seen = torch.bincount(targets, minlength=logits.shape[1]).double()
    hits = torch.bincount(targets, weights=correct, minlength=logits.shape[1])
    present = seen > 0
    return float((hits[present] / seen[present]).mean()) * 100.0


def search_tau(
    val_logits: torch.Tensor, val_targets: torch.Tensor, prior: torch.Tensor, kind: str, grid: Sequence[float]
) -> tuple[float, list[list[float]]]:
    """The tau of `grid` with the best validation balanced accuracy (the smallest on ties), and the
    curve [[tau, balanced accuracy %], ...]."""
    logits = val_logits.detach().to("cpu", torch.float64)
    targets = val_targets.detach().to("cpu", torch.int64)
    # rounded so that float noise cannot make a larger tau win a tie
    curve = [[tau, round(balanced_accuracy(adjust_logits(logits, prior, kind, tau), targets), 9)]
             for tau in track(tau_grid(grid), "posthoc: search tau", "tau")]
    best = max(curve, key=lambda point: point[1])  # max keeps the first maximum: the smallest tau
    return best[0], curve


def linear_head(weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor) -> LinearHead:
    """A plain `LinearHead` holding `weight` (K x d) and `bias`, on `like`'s device and dtype."""
    head = LinearHead(weight.shape[1], weight.shape[0], bias=bias is not None).to(like.device, like.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head


def linear_parts(head: nn.Module, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a head whose logits are exactly features @ weight.T + bias; others are refused."""
    if not isinstance(head, (nn.Linear, ETFHead)):
        raise ConfigError(
            f"{what}: the model's head is a {type(head).__name__}, whose logits are not an affine map of the "
            "features, so the adjustment cannot be folded into it; only linear and etf heads take it "
            "(model.head: linear or etf)"
        )
    return head.weight.detach(), None if head.bias is None else head.bias.detach()


def fold_into_head(head: nn.Module, prior: torch.Tensor, kind: str, tau: float) -> LinearHead:
    """A `LinearHead` whose logits equal `adjust_logits(head(f), prior, kind, tau)`."""
    _check_kind(kind)
    weight, bias = linear_parts(head, "posthoc.kind")
    w, p = weight.double(), prior.double().to(weight.device)
    b = None if bias is None else bias.double()
    if kind == "multiplicative":
        scale = p.pow(-tau)
        w = w * scale[:, None]
        b = None if b is None else b * scale
    else:
        shift = -tau * p.log()
        b = shift if b is None else b + shift
    return linear_head(w, b, weight)


def apply_posthoc(model: nn.Module, cfg: Config, data: Any, device: torch.device) -> tuple[nn.Module, dict]:
    """Fold `cfg.posthoc` into `model.head` (tau searched on `data.val` when null); returns the model and
    the record for results.json: kind, tau, searched, and the search curve."""
    kind, tau = cfg.posthoc.kind, cfg.posthoc.tau
    _check_kind(kind)
    linear_parts(model.head, "posthoc.kind")  # refuse before spending time on the search
    prior = class_prior(data.class_counts)
    record: dict = {"kind": kind, "tau": tau, "searched": tau is None}
    if tau is None:
        if data.val is None:
            raise ConfigError(
                "posthoc.tau: null means searching tau on the validation split, but this run has none; set "
                "data.val_per_class (EWB uses 20) or give posthoc.tau (EWB: 1.6 CIFAR-10-LT, 0.65 CIFAR-100-LT)"
            )
        logits, targets = collect_logits(model, data.val, device, cfg.eval.batch_size, cfg.eval.tta,
                                         "posthoc: val logits")
        tau, curve = search_tau(logits, targets, prior, kind, cfg.posthoc.grid)
        record.update(tau=tau, curve=curve)
    model.head = fold_into_head(model.head, prior, kind, tau)
    return model, record


def run_posthoc(run_dir: str, kind: str | None = None, tau: float | None = None, data_root: str | None = None,
                overwrite: bool = False) -> dict:
    """`longtail posthoc RUN_DIR`: adjust a finished run's exported model into RUN_DIR/posthoc-<kind>/.

    That directory is a run directory of its own (config.yaml, model.pt, model.yaml, results.json), so
    `longtail eval` and `longtail report` work on it; the original run is left untouched. Its files are
    written together into a new directory that replaces the old one in one step: a reader sees the old
    result or the new one, never a mix. An existing result is replaced only with `overwrite`.
    """
    kind = kind or "multiplicative"
    _check_kind(kind)
    directory = model_file(run_dir).parent
    out = directory / f"posthoc-{kind}"
    with run_lock(directory):
        if out.exists() and not overwrite:
            raise ConfigError(f"{out} already holds a post-hoc result; pass --overwrite to replace it")
        # The old result's own lock too: nothing may read or write it while it is replaced.
        with run_lock(out) if out.exists() else contextlib.nullcontext():
            return _adjust_run(run_dir, kind, tau, data_root, out)


def _adjust_run(run_dir: str, kind: str, tau: float | None, data_root: str | None, out: Path) -> dict:
    run = load_run(run_dir, data_root)
    if run.results is not None and run.results.get("posthoc"):
        done = run.results["posthoc"]
        raise ConfigError(
            f"{run.run_dir}: its model.pt already has post-hoc adjustment ({done['kind']}, tau {done['tau']}) "
            "folded in; adjusting again would compound it. Apply posthoc to a run trained with posthoc.kind: none"
        )
    if folded_temperature(run.spec) is not None:
        raise ConfigError(
            f"{run.run_dir}: its model.pt has a temperature folded in (posthoc.calibrate), fitted to the logits before "
            "any adjustment; calibration comes after the adjustment. Train with posthoc.kind and posthoc.calibrate "
            "both set, or apply posthoc to a run trained with posthoc.calibrate: none"
        )
    if tau is None and run.data.val is None:
        raise ConfigError(f"{run.run_dir} has no validation split to search tau on; give it with --tau T")
    cfg = run.cfg
    cfg.posthoc.kind, cfg.posthoc.tau = kind, tau
    task_of(run.data).check(cfg)  # refuses a multi-label run: its sigmoids have no softmax prior to adjust
    device = select_device(cfg.train.device)
    model = run.model.to(device)
    split = run.data.val if cfg.eval.split == "val" else run.data.test
    before = evaluate(model, split, device, cfg, run.data, f"evaluate {cfg.eval.split} (before)")
    model, record = apply_posthoc(model, cfg, run.data, device)
    record["before"] = {k: before[k] for k in _SHOWN}
    metrics = evaluate(model, split, device, cfg, run.data, f"evaluate {cfg.eval.split} (adjusted)")
    results = {**(run.results or {}), **metrics, "posthoc": record, "derived_from": str(run.run_dir),
               "config": cfg.to_dict()}
    # A model.yaml older than its `folds` key: rebuilt from the config (such runs had no calibration).
    folds = run.spec["folds"] if "folds" in run.spec else training_folds(cfg, (run.results or {}).get("method_record") or {})
    new = new_directory(out)
    save_config(cfg, new / "config.yaml")
    export_model(model, cfg, run.data, new, [*folds, {"kind": "logit_adjustment", "form": record["kind"],
                                                     "tau": record["tau"]}])
    atomic_write_json(new / "results.json", results)
    replace_directory(out)
    print(format_table([("before", before), (f"{record['kind']}, tau {record['tau']:g}", metrics)]))
    print(f"wrote {out}")
    return results
