"""The task kind — single-label (class ids) or multi-label (multi-hot targets) — and everything it decides.

A dataset states its kind (`LTData.task`); `task_of(data)` gives the `Task` that picks the losses,
samplers, metrics, logged and selected numbers, results table, and MORE's per-sample weights and
discrepancy. This is the one place the two kinds differ: the engine and the methods call the task, and
`check` refuses, before any work, every option that only makes sense for the other kind
(docs/multilabel.md lists them with the reasons).

Mixup / CutMix apply to both kinds: a mixed batch's loss is lam L(t_a) + (1 - lam) L(t_b) (`longtail.mixing`),
which for multi-hot targets is BCE on the mixed multi-hot targets lam t_a + (1 - lam) t_b (BCE is linear in
its target) and the same convex combination for the other multi-label losses; MORE's weights mix alike.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from longtail.config import Config
from longtail.errors import ConfigError
from longtail.losses import MULTILABEL_NAMES, NAMES, MultiLabelLoss, build_loss
from longtail.metrics import (MULTILABEL_COLUMNS, SINGLE_LABEL_COLUMNS, group_of_classes, summarize,
                              summarize_multilabel)

log = logging.getLogger(__name__)

SINGLE_LABEL, MULTI_LABEL = "single_label", "multi_label"

# Multi-label refusals: (what, why). Each is checked in `Task.check`.
_SOFTMAX = "it adjusts a softmax over mutually exclusive classes, and multi-label outputs are independent sigmoids"
# Also refused for multi-label data: `longtail analyze` (FDR, class means, by class id), in `refuse_analysis`.
MULTILABEL_REFUSED_METHODS = {
    "ewb": "its fixed simplex-ETF head and logit adjustment are built for a softmax over exclusive classes",
    "wb_stage2": "its stage 2 retrains the classifier with class-balanced CE and a class-id sampler",
    "crt": "it retrains the classifier with the class-id class-balanced sampler",
    "lws": "it learns per-class logit scales against a softmax loss",
    "tau_norm": "tau-normalisation rescales classifier norms to fix a softmax's bias to head classes",
}


def more_weights_single(targets: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """pi_y per sample."""
    return prior[targets]


def more_weights_multi(targets: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """The mean prior of each sample's positive labels; a sample with none takes the smallest prior (docs/multilabel.md, MORE with multi-label data)."""
    positives = (targets > 0).to(prior.dtype)
    count = positives.sum(dim=1)
    mean_prior = (positives @ prior) / count.clamp(min=1)
    return torch.where(count > 0, mean_prior, prior.min())


def discrepancy_single(z_full: torch.Tensor, z_gen: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample ||z_full - z_gen||^2 (`l2`) or KL(softmax(z_full) || softmax(z_gen)) (`kl`), shape (N,)."""
    if kind == "l2":
        return (z_full - z_gen).pow(2).sum(dim=1)
    log_full, log_gen = F.log_softmax(z_full, dim=1), F.log_softmax(z_gen, dim=1)
    return (log_full.exp() * (log_full - log_gen)).sum(dim=1)


def discrepancy_multi(z_full: torch.Tensor, z_gen: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample ||z_full - z_gen||^2 (`l2`), or (`kl`) the sum over classes of the Bernoulli KLs
    KL(Bern(sigmoid(z_full_k)) || Bern(sigmoid(z_gen_k))): each class is its own binary prediction."""
    if kind == "l2":
        return (z_full - z_gen).pow(2).sum(dim=1)
    p = torch.sigmoid(z_full)
    kl = p * (F.logsigmoid(z_full) - F.logsigmoid(z_gen)) + (1 - p) * (F.logsigmoid(-z_full) - F.logsigmoid(-z_gen))
    return kl.sum(dim=1)


def multilabel_groups(data: Any, cfg: Config) -> tuple[list[int], list[int], list[int]]:
    """Head / medium / tail class ids: `eval.thresholds` when set, else the dataset's published split
    (VOC-MLT, COCO-MLT, the mosaic benchmark), else its training-image thresholds."""
    if cfg.eval.thresholds is None and data.class_groups is not None:
        return data.class_groups
    thresholds = cfg.eval.thresholds if cfg.eval.thresholds is not None else data.default_thresholds
    return group_of_classes(data.class_counts, thresholds)


@dataclass(frozen=True)
class Task:
    name: str
    losses: tuple[str, ...]
    samplers: tuple[str, ...]
    epoch_keys: tuple[str, ...]  # the per-epoch numbers in metrics.jsonl
    select_key: str  # what eval.select best_val / best_test maximises
    columns: list  # (title, key) of the results table
    more_weights: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    discrepancy: Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]

    @property
    def multilabel(self) -> bool:
        return self.name == MULTI_LABEL

    def check(self, cfg: Config) -> None:
        """Refuse, naming the key and the reason, every option that does not apply to this task."""
        other = "multi-label" if not self.multilabel else "single-label (class-id)"
        kind = "multi-label" if self.multilabel else "single-label"
        if cfg.loss.name not in self.losses:
            why = f" ({_SOFTMAX})" if self.multilabel else " (it is defined on multi-hot targets)"
            raise ConfigError(f"loss.name: {cfg.loss.name} is a {other} loss{why}; this dataset is {kind}: "
                              f"choose one of {', '.join(self.losses)}")
        if cfg.data.sampler not in self.samplers:
            hint = "class_aware samples by positive labels" if self.multilabel else "class_balanced"
            raise ConfigError(f"data.sampler: {cfg.data.sampler} does not apply to this {kind} dataset; choose one of "
                              f"{', '.join(self.samplers)} ({hint})")
        if not self.multilabel:
            return
        if cfg.method.name in MULTILABEL_REFUSED_METHODS:
            raise ConfigError(f"method.name: {cfg.method.name} does not apply to multi-label data: "
                              f"{MULTILABEL_REFUSED_METHODS[cfg.method.name]}; use erm (with MORE if wanted)")
        refusals = {
            "model.head": (cfg.model.head == "etf", "etf: a simplex ETF spreads exclusive classes apart; use linear"),
            "posthoc.kind": (cfg.posthoc.kind != "none", f"post-hoc logit adjustment: {_SOFTMAX}; use none"),
            "posthoc.calibrate": (cfg.posthoc.calibrate != "none",
                                  "temperature scaling is fitted by the softmax NLL of one class per sample; use none"),
            "loss.drw_start": (cfg.loss.drw_start is not None,
                               "deferred re-weighting weights samples by their one class; use cb_bce or dbl"),
            "train.track_every": (cfg.train.track_every > 0 and not cfg.more.enabled,
                                  "the Fisher discriminant ratio and class means need one class per sample; use 0 "
                                  "(with more.enabled it logs MORE's diagnostics alone)"),
        }
        for key, (refused, why) in refusals.items():
            if refused:
                raise ConfigError(f"{key}: not for multi-label data — {why}")
        if cfg.loss.name in ("dbl", "db_focal") and cfg.data.sampler != "class_aware":
            log.warning("loss.name=%s: its re-balanced weighting corrects for class-aware sampling, which DB-Loss "
                        "trains with; data.sampler=%s is used as asked (set data.sampler: class_aware)",
                        cfg.loss.name, cfg.data.sampler)

    def build_loss(self, cfg: Config, data: Any) -> Callable:
        if self.multilabel:
            return MultiLabelLoss(cfg.loss, data.class_counts, len(data.train))
        return build_loss(cfg.loss, data.class_counts, cfg.train.epochs)

    def summarize(self, logits: torch.Tensor, targets: torch.Tensor, data: Any, cfg: Config) -> dict:
        if self.multilabel:
            return summarize_multilabel(logits, targets, data.class_counts, multilabel_groups(data, cfg),
                                        cfg.eval.f1_threshold)
        thresholds = cfg.eval.thresholds if cfg.eval.thresholds is not None else data.default_thresholds
        return summarize(logits, targets, data.class_counts, tuple(thresholds), cfg.eval.ece_bins)

    def epoch_record(self, metrics: dict) -> dict:
        return {k: metrics[k] for k in self.epoch_keys}

    def figures(self, metrics: dict, logits: torch.Tensor, targets: torch.Tensor, data: Any, cfg: Config,
                folder: Path, split: str, temperature: Optional[float] = None) -> list[str]:
        """`longtail eval --plots`: per-class accuracy, confusion and reliability (before and after a folded
        temperature, when there is one); multi-label: AP by frequency."""
        from longtail import plots

        if self.multilabel:
            return [plots.plot_ap_vs_frequency(metrics["per_class_ap"], data.class_counts,
                                               folder / f"ap_vs_frequency-{split}.png")]
        bins = cfg.eval.ece_bins
        counts, names = data.class_counts, data.class_names
        figures = [
            plots.plot_per_class_accuracy({split: metrics["per_class"]}, counts, folder / f"per_class-{split}.png",
                                          metrics["thresholds"], names),
            plots.plot_confusion(logits, targets, data.num_classes, folder / f"confusion-{split}.png", counts, names),
        ]
        if temperature is not None:  # the logits before calibration are the exported ones times T
            figures.append(plots.plot_reliability(logits * temperature, targets,
                                                  folder / f"reliability-uncalibrated-{split}.png", bins,
                                                  title="Before temperature scaling"))
        figures.append(plots.plot_reliability(
            logits, targets, folder / f"reliability-{split}.png", bins,
            title=f"Temperature-scaled, T = {temperature:.3g}" if temperature is not None else "Reliability diagram"))
        return figures


SINGLE = Task(SINGLE_LABEL, NAMES, ("instance", "class_balanced", "sqrt"),
              ("top1", "balanced", "many", "medium", "few", "ece", "nll"), "balanced", SINGLE_LABEL_COLUMNS,
              more_weights_single, discrepancy_single)
MULTI = Task(MULTI_LABEL, MULTILABEL_NAMES, ("instance", "class_aware"),
             ("map", "map_head", "map_medium", "map_tail", "micro_f1", "macro_f1"), "map", MULTILABEL_COLUMNS,
             more_weights_multi, discrepancy_multi)
TASKS = {SINGLE_LABEL: SINGLE, MULTI_LABEL: MULTI}


def get_task(name: Optional[str]) -> Task:
    """The task of this name (None, as in results written before tasks existed: single-label)."""
    if name is None:
        return SINGLE
    if name not in TASKS:
        raise ConfigError(f"task {name!r} is unknown; known: {', '.join(TASKS)}")
    return TASKS[name]


def task_of(data: Any) -> Task:
    return get_task(getattr(data, "task", SINGLE_LABEL))


def refuse_analysis(data: Any, run_dir: Any) -> None:
    """`longtail analyze` groups features by a sample's one class (FDR, class means, cosines)."""
    if task_of(data).multilabel:
        raise ConfigError(f"longtail analyze: {run_dir} is a multi-label run, and the analysis (Fisher discriminant "
                          "ratio, class-mean cosines) needs one class per sample; use longtail eval --plots for AP "
                          "against class frequency")
