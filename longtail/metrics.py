"""Evaluation metrics for long-tailed recognition (docs/protocol.md#evaluation).

Everything is computed in float64 on the CPU from the full set of per-sample logits, so numbers are
exact and do not depend on batch size or on how many processes evaluated. Accuracies and ECE are
in percent; NLL is in nats.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from longtail import distributed
from longtail.errors import ConfigError


# Where 1000 / 200 is the protocol (EWB's): at 100 / 20 Fashion-MNIST-LT would have no Few class.
TEN_CLASS_PROTOCOL = ("cifar10_lt", "fashion_mnist_lt")


def default_thresholds(dataset: str) -> tuple[int, int]:
    """(many, few): > 1000 / < 200 for CIFAR-10-LT and Fashion-MNIST-LT, else the general > 100 / < 20."""
    return (1000, 200) if dataset in TEN_CLASS_PROTOCOL else (100, 20)


def group_of_classes(
    class_counts: Sequence[int], thresholds: Sequence[int]
) -> tuple[list[int], list[int], list[int]]:
    """Class ids with > many, few..many (inclusive) and < few training images."""
    many_thr, few_thr = thresholds
    many = [c for c, n in enumerate(class_counts) if n > many_thr]
    few = [c for c, n in enumerate(class_counts) if n < few_thr]
    medium = [c for c, n in enumerate(class_counts) if few_thr <= n <= many_thr]
    return many, medium, few


def calibration_bins(
    logits: torch.Tensor, targets: torch.Tensor, bins: int = 15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin (mean confidence, accuracy, sample count) over `bins` equal-width bins (lo, hi] of max-softmax.

    Empty bins hold 0 confidence and accuracy. Float64.
    """
    probs = torch.softmax(logits.detach().to("cpu", torch.float64), dim=1)
    conf, pred = probs.max(dim=1)
    correct = pred.eq(targets.detach().cpu()).to(torch.float64)
    inner = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    which = torch.bucketize(conf, inner, right=False)  # bin i holds (i/bins, (i+1)/bins]
    counts = torch.bincount(which, minlength=bins).to(torch.float64)
    denom = counts.clamp(min=1)
    conf_mean = torch.bincount(which, weights=conf, minlength=bins) / denom
    acc = torch.bincount(which, weights=correct, minlength=bins) / denom
    return conf_mean, acc, counts


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """ECE in percent: sum over bins of (bin share of samples) * |accuracy - mean confidence|."""
    conf_mean, acc, counts = calibration_bins(logits, targets, bins)
    return float((counts / counts.sum() * (acc - conf_mean).abs()).sum()) * 100.0


def _mean_or_none(values: torch.Tensor, present: torch.Tensor, ids: list[int]) -> Optional[float]:
    keep = [c for c in ids if present[c]]
    return float(values[keep].mean()) if keep else None


def summarize(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_counts: Sequence[int],
    thresholds: Sequence[int],
    ece_bins: int = 15,
) -> dict:
    """The metrics of one evaluated split; per-class and group means count only classes present in it."""
    num_classes = len(class_counts)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ConfigError(
            f"the model outputs {tuple(logits.shape[1:])} logits per sample but the dataset has "
            f"{num_classes} classes; evaluate a model trained on this dataset"
        )
    if logits.shape[0] == 0:
        raise ValueError("summarize: no samples to evaluate")
    logits = logits.detach().to("cpu", torch.float64)
    targets = targets.detach().to("cpu", torch.int64)
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"summarize: targets must lie in [0, {num_classes}), got {targets.min()}..{targets.max()}")
    correct = logits.argmax(dim=1).eq(targets).to(torch.float64)

    seen = torch.bincount(targets, minlength=num_classes).to(torch.float64)
    hits = torch.bincount(targets, weights=correct, minlength=num_classes)
    present = seen > 0
    per_class = hits / seen.clamp(min=1) * 100.0

    many, medium, few = group_of_classes(class_counts, thresholds)
    return {
        "top1": float(correct.mean()) * 100.0,
        "balanced": float(per_class[present].mean()),
        "many": _mean_or_none(per_class, present, many),
        "medium": _mean_or_none(per_class, present, medium),
        "few": _mean_or_none(per_class, present, few),
        "ece": expected_calibration_error(logits, targets, ece_bins),
        "nll": float(F.cross_entropy(logits, targets)),
        "per_class": [float(a) if p else None for a, p in zip(per_class, present)],
        "class_counts": [int(n) for n in class_counts],
        "thresholds": [int(t) for t in thresholds],
        "num_samples": int(targets.numel()),
    }


# ----------------------------------------------------------------------------- multi-label


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> Optional[float]:
    """Non-interpolated AP of one class, scikit-learn's `average_precision_score`: sum over the distinct
    score thresholds, from the highest, of (R_t - R_{t-1}) P_t; tied scores form one threshold. None when
    the class has no positive sample (AP is undefined)."""
    scores, positives = scores.to(torch.float64), positives.to(torch.float64)
    total = positives.sum()
    if total == 0:
        return None
    order = torch.argsort(scores, descending=True, stable=True)
    s, tp = scores[order], torch.cumsum(positives[order], 0)
    last = torch.ones_like(s, dtype=torch.bool)  # the last position of each run of tied scores
    last[:-1] = s[1:] != s[:-1]
    tp = tp[last]
    seen = torch.arange(1, len(s) + 1, dtype=torch.float64)[last]
    recall_gain = torch.diff(tp, prepend=tp.new_zeros(1)) / total
    return float((recall_gain * tp / seen).sum())


def f1_scores(predicted: torch.Tensor, positives: torch.Tensor) -> tuple[float, float]:
    """(micro, macro) F1 in percent; a class with no positive and no predicted label has F1 0 (scikit-learn's
    zero_division default)."""
    p, y = predicted.to(torch.float64), positives.to(torch.float64)
    tp, fp, fn = (p * y).sum(0), (p * (1 - y)).sum(0), ((1 - p) * y).sum(0)
    per_class = 2 * tp / (2 * tp + fp + fn).clamp(min=1e-300)
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1e-300)
    return float(micro) * 100.0, float(per_class.mean()) * 100.0


def summarize_multilabel(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_counts: Sequence[int],
    groups: tuple[list[int], list[int], list[int]],
    f1_threshold: float = 0.5,
) -> dict:
    """mAP (percent) over the classes with a positive test sample, per class and by head / medium / tail
    `groups` (class ids), and micro / macro F1 with a label predicted where sigmoid(logit) > f1_threshold."""
    num_classes = len(class_counts)
    if logits.ndim != 2 or logits.shape[1] != num_classes or targets.shape != logits.shape:
        raise ConfigError(f"the model outputs {tuple(logits.shape[1:])} logits per sample for targets of shape "
                          f"{tuple(targets.shape[1:])}, and the dataset has {num_classes} classes; evaluate a model "
                          "trained on this dataset")
    if logits.shape[0] == 0:
        raise ValueError("summarize_multilabel: no samples to evaluate")
    logits = logits.detach().to("cpu", torch.float64)
    y = targets.detach().cpu() > 0
    ap = [average_precision(logits[:, k], y[:, k]) for k in range(num_classes)]

    def mean_ap(ids: Sequence[int]) -> Optional[float]:
        kept = [ap[k] for k in ids if ap[k] is not None]
        return sum(kept) / len(kept) * 100.0 if kept else None

    # On the logit, as DB-Loss's evaluation (logit > 0 at 0.5): a sigmoid rounds logits near the cut to it.
    micro, macro = f1_scores(logits > math.log(f1_threshold / (1 - f1_threshold)), y)
    head, medium, tail = groups
    return {
        "map": mean_ap(range(num_classes)),
        "map_head": mean_ap(head),
        "map_medium": mean_ap(medium),
        "map_tail": mean_ap(tail),
        "micro_f1": micro,
        "macro_f1": macro,
        "per_class_ap": [None if a is None else a * 100.0 for a in ap],
        "class_counts": [int(n) for n in class_counts],
        "groups": {"head": list(head), "medium": list(medium), "tail": list(tail)},
        "f1_threshold": f1_threshold,
        "num_samples": int(logits.shape[0]),
    }


def gather_unique(
    logits: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's rows gathered, one row per dataset index, sorted by index.

    Distributed samplers pad the last rounds with repeated samples; counting those twice would
    skew every metric, so rows are keyed on the dataset index rather than merely concatenated.
    """
    if distributed.world_size() > 1:
        logits, targets, idx = (distributed.all_gather_rows(t) for t in (logits, targets, idx))
    order = torch.argsort(idx, stable=True)
    sorted_idx = idx[order]
    first = torch.ones_like(sorted_idx, dtype=torch.bool)
    first[1:] = sorted_idx[1:] != sorted_idx[:-1]
    keep = order[first]
    return logits[keep], targets[keep], idx[keep]


def flip_tta(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Horizontal-flip test-time augmentation: mean of the logits of x and of x mirrored (as in WB's code)."""
    return (logits_fn(x) + logits_fn(x.flip(3))) / 2


def tta_logits(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str) -> torch.Tensor:
    """`eval.tta`: none; flip (`flip_tta`); lift_crops: x is N x 5 x C x S x S, LIFT's five crops of each image,
    and the logits are their mean (LIFT's test averages the model's outputs over the crops, no softmax). The
    crops run one at a time, so memory stays that of one batch."""
    if tta == "flip":
        return flip_tta(logits_fn, x)
    if tta == "lift_crops":
        return torch.stack([logits_fn(x[:, k]) for k in range(x.shape[1])]).mean(0)
    return logits_fn(x)


SINGLE_LABEL_COLUMNS = [("All", "top1"), ("Balanced", "balanced"), ("Many", "many"), ("Medium", "medium"),
                        ("Few", "few"), ("ECE", "ece"), ("NLL", "nll")]


def _cell(key: str, value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if key == "nll" else f"{value:.2f}"


MULTILABEL_COLUMNS = [("mAP", "map"), ("Head", "map_head"), ("Medium", "map_medium"), ("Tail", "map_tail"),
                      ("micro-F1", "micro_f1"), ("macro-F1", "macro_f1")]


def format_table(results: Union[dict, list[tuple[str, dict]]], columns: Optional[list] = None) -> str:
    """A Markdown table of one results dict, or of named rows; accuracies and ECE in percent. `columns`:
    (title, key) pairs, by default the single-label ones (`longtail.task` names each task's)."""
    columns = columns or SINGLE_LABEL_COLUMNS
    rows = [("", results)] if isinstance(results, dict) else list(results)
    named = not isinstance(results, dict)
    header = (["Run"] if named else []) + [title for title, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, res in rows:
        cells = ([name] if named else []) + [_cell(key, res.get(key)) for _, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
