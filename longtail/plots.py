"""Evaluation figures: per-class accuracy against class size, confusion matrix, reliability diagram.

Figures are drawn on the Agg canvas without pyplot (no global state, no display needed) and written
atomically, so a crash never leaves a truncated PNG behind.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from longtail.checkpoint import atomic_write_bytes
from longtail.metrics import calibration_bins, expected_calibration_error, group_of_classes

_MAX_TICKED_CLASSES = 100  # beyond this, per-class tick labels overlap into noise
# Grey, darker at both ends: colours stay free for the runs drawn on top.
GROUP_SHADES = {"many": 0.16, "medium": 0.06, "few": 0.16}


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return str(path)


def by_size(class_counts: Sequence[int]) -> list[int]:
    """Class ids from the most to the least training images (ties by id)."""
    return sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))


def class_ticks(ax, order: list[int], class_names: Optional[Sequence[str]] = None, axis: str = "x") -> None:
    """One tick per class in `order`, labelled with its name (its id when names are unknown)."""
    if len(order) > _MAX_TICKED_CLASSES:
        getattr(ax, f"set_{axis}ticks")([])
        return
    labels = [str(class_names[c]) if class_names is not None else str(c) for c in order]
    fontsize = 7 if len(order) <= 40 else 5
    if axis == "y":
        ax.set_yticks(range(len(order)), labels, fontsize=fontsize)
    elif max(map(len, labels)) <= 3:  # ids: upright
        ax.set_xticks(range(len(order)), labels, fontsize=fontsize)
    elif len(order) <= 20:  # names: slanted, each ending under its class
        ax.set_xticks(range(len(order)), labels, fontsize=fontsize, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(len(order)), labels, fontsize=fontsize, rotation=90)


def shade_groups(ax, order: list[int], class_counts: Sequence[int], thresholds: Sequence[int],
                 named: bool = True) -> None:
    """Shade the Many / Medium / Few spans of a class axis sorted by size, each named above the axes
    unless `named` is false (a lower panel of a figure that names them once)."""
    many, medium, few = group_of_classes(class_counts, thresholds)
    position = {c: i for i, c in enumerate(order)}
    for (name, alpha), ids in zip(GROUP_SHADES.items(), (many, medium, few)):
        if not ids:
            continue
        span = [position[c] for c in ids]  # contiguous: the order is by size, the groups are size ranges
        ax.axvspan(min(span) - 0.5, max(span) + 0.5, color="grey", alpha=alpha, lw=0)
        if named:
            ax.text((min(span) + max(span)) / 2, 1.0, f"{name.capitalize()} ({len(ids)})",
                    transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)


def plot_per_class_accuracy(
    runs: Mapping[str, Sequence[Optional[float]]],
    class_counts: Sequence[int],
    path: str | Path,
    thresholds: Optional[Sequence[int]] = None,
    class_names: Optional[Sequence[str]] = None,
) -> str:
    """Per-class accuracy (%) of one or more runs ({label: per-class accuracies}) as bars side by side, classes
    sorted by training count, with the counts on a log axis; with `thresholds` the Many / Medium / Few
    spans are shaded. A class a run has no accuracy for (absent from the split) is left blank."""
    order = by_size(class_counts)
    fig = new_figure(max(6.0, min(16.0, 0.12 * len(order) * max(1, len(runs)))), 4.5)
    ax = fig.add_subplot()
    width = 0.85 / len(runs)
    for k, (label, per_class) in enumerate(runs.items()):
        acc = [math.nan if per_class[c] is None else per_class[c] for c in order]
        offset = (k - (len(runs) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(order))], acc, width=width, label=label,
               color=f"C{k}" if len(runs) > 1 else "tab:blue")
    if thresholds is not None:
        shade_groups(ax, order, class_counts, thresholds)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_xlabel("class (most training images first)")
    class_ticks(ax, order, class_names)
    counts_ax = ax.twinx()
    counts_ax.plot(range(len(order)), [class_counts[c] for c in order], color="black", marker=".", lw=1,
                   label="training images")
    counts_ax.set_yscale("log")
    counts_ax.set_ylabel("training images (log)")
    if len(runs) > 1:
        fig.legend(loc="outside lower center", ncols=min(len(runs), 3), fontsize=8)
    fig.suptitle("Per-class accuracy against class size", fontsize=11)
    return save_figure(fig, path)


def plot_confusion(
    logits_or_preds: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    path: str | Path,
    class_counts: Optional[Sequence[int]] = None,
    class_names: Optional[Sequence[str]] = None,
) -> str:
    """Row-normalised confusion matrix (rows: true class), classes ordered from most to least frequent
    and named by `class_names` when given.

    Frequency is the training count when `class_counts` is given, else the count in `targets`.
    """
    preds = logits_or_preds.detach().cpu()
    if preds.ndim == 2:
        preds = preds.argmax(dim=1)
    targets = targets.detach().cpu().to(torch.int64)
    cells = torch.bincount(targets * num_classes + preds.to(torch.int64), minlength=num_classes**2)
    matrix = cells.view(num_classes, num_classes).to(torch.float64)
    matrix = matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    freq = list(class_counts) if class_counts is not None else torch.bincount(targets, minlength=num_classes).tolist()
    order = by_size(freq)
    matrix = matrix[order][:, order]

    side = max(4.5, min(12.0, 0.12 * num_classes + 3))
    fig = new_figure(side + 1, side)
    ax = fig.add_subplot()
    image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    if num_classes <= 10:
        for i in range(num_classes):
            for j in range(num_classes):
                value = float(matrix[i, j])
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.5 else "black")
    class_ticks(ax, order, class_names, "x")
    class_ticks(ax, order, class_names, "y")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (most frequent first)")
    ax.set_title("Confusion matrix (row-normalised)")
    return save_figure(fig, path)


def plot_reliability(logits: torch.Tensor, targets: torch.Tensor, path: str | Path, bins: int = 15,
                     title: str = "Reliability diagram") -> str:
    """Reliability diagram: accuracy per confidence bin, the gap to the diagonal, and the bin shares."""
    conf, acc, counts = calibration_bins(logits, targets, bins)
    ece = expected_calibration_error(logits, targets, bins)
    width = 1.0 / bins
    centres = [(i + 0.5) * width for i in range(bins)]
    filled = counts > 0

    fig = new_figure(5.0, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.bar(centres, torch.where(filled, acc, 0).tolist(), width=width, color="tab:blue",
            edgecolor="black", lw=0.5, label="accuracy")
    top.bar(centres, torch.where(filled, conf - acc, 0).tolist(), bottom=acc.tolist(), width=width,
            color="tab:red", alpha=0.35, edgecolor="tab:red", hatch="//", lw=0.5, label="gap to confidence")
    top.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title} (ECE {ece:.2f} %, {bins} bins)")
    bottom.bar(centres, (counts / counts.sum()).tolist(), width=width, color="gray", edgecolor="black", lw=0.5)
    bottom.set_xlabel("confidence (max softmax)")
    bottom.set_ylabel("share of samples")
    return save_figure(fig, path)


def plot_ap_vs_frequency(per_class_ap: Sequence[Optional[float]], class_counts: Sequence[int], path: str | Path) -> str:
    """Multi-label: each class's AP (percent) against its number of training images (log scale); classes
    with no positive test sample (AP undefined) are left out."""
    points = [(n, ap) for n, ap in zip(class_counts, per_class_ap) if ap is not None]
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    ax.scatter([max(n, 1) for n, _ in points], [ap for _, ap in points], s=16)
    ax.set_xscale("log")
    ax.set_xlabel("training images with the label")
    ax.set_ylabel("AP (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"AP by class frequency ({len(points)} classes)")
    return save_figure(fig, path)
