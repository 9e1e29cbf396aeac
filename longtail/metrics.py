"""Evaluation metrics for long-tailed recognition (SPEC §1.3).

Everything is computed in float64 on the CPU from the full set of per-sample logits, so numbers are
exact and do not depend on batch size or on how many processes evaluated. Accuracies and ECE are
in percent; NLL is in nats.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from longtail import distributed
from longtail.errors import ConfigError


def default_thresholds(num_classes: int) -> tuple[int, int]:
    """(many, few): > 1000 / < 200 for 10-class datasets (100/20 leaves them no Few class), else > 100 / < 20."""
    return (1000, 200) if num_classes <= 10 else (100, 20)


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


_COLUMNS = [("All", "top1"), ("Balanced", "balanced"), ("Many", "many"), ("Medium", "medium"),
            ("Few", "few"), ("ECE", "ece"), ("NLL", "nll")]


def _cell(key: str, value: Optional[float]) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if key == "nll" else f"{value:.2f}"


def format_table(results: Union[dict, list[tuple[str, dict]]]) -> str:
    """A Markdown table of one results dict, or of named rows; accuracies and ECE in percent."""
    rows = [("", results)] if isinstance(results, dict) else list(results)
    named = not isinstance(results, dict)
    header = (["Run"] if named else []) + [title for title, _ in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, res in rows:
        cells = ([name] if named else []) + [_cell(key, res.get(key)) for _, key in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
