"""`longtail data`: what a long-tailed dataset holds (counts, groups, subset identity)."""
from __future__ import annotations

import os

from longtail.checkpoint import atomic_write_text
from longtail.config import DataConfig
from longtail.data import LTData, build_data
from longtail.metrics import group_of_classes


def summarize(data: LTData, data_cfg: DataConfig) -> dict:
    """Per-class counts, Many/Medium/Few sizes under the dataset's default thresholds, and the selected
    original train indices with their sha256."""
    many_thr, few_thr = data.default_thresholds
    counts = data.class_counts
    val_counts = data.val.class_counts() if data.val is not None else None
    # A published head / medium / tail split (multi-label benchmarks) wins over the thresholds.
    groups = data.class_groups or group_of_classes(counts, data.default_thresholds)
    group_names = [""] * len(counts)
    names = ("head", "medium", "tail") if data.task == "multi_label" else ("many", "medium", "few")
    for name, ids in zip(names, groups):
        for k in ids:
            group_names[k] = name
    return {
        "name": data.name,
        "task": data.task,
        "num_classes": data.num_classes,
        "profile": data_cfg.profile,
        "imbalance": data.imbalance,  # under profile none: measured, as imbalance_ratio
        "selection": data_cfg.selection,
        "subset_seed": data_cfg.subset_seed,
        "class_names": data.class_names,
        "class_counts": counts,
        "total": sum(counts),
        "train_images": len(data.train),
        "published_groups": data.class_groups is not None,
        "imbalance_ratio": max(counts) / max(min(counts), 1),
        "thresholds": [many_thr, few_thr],
        "thresholds_rule": data.thresholds_rule,
        "groups": {"many": len(groups[0]), "medium": len(groups[1]), "few": len(groups[2])},
        "group_of_class": group_names,
        "test_counts": data.test.class_counts(),
        "val_counts": val_counts,
        "val_total": sum(val_counts) if val_counts is not None else 0,
        "test_total": len(data.test),
        "indices_sha256": data.indices_sha256,
        "indices": data.indices.tolist(),  # for --indices FILE; long, so not shown in the table
    }


def describe(data_cfg: DataConfig, root: str | os.PathLike | None = None, download: bool = False) -> dict:
    return summarize(build_data(data_cfg, root, download), data_cfg)


def format_description(d: dict) -> str:
    """A readable table of `describe`'s result."""
    many_thr, few_thr = d["thresholds"]
    width = max(len("class"), *(len(n) for n in d["class_names"]))
    imbalance = f"natural counts, imbalance {d['imbalance']:.4g} measured" if d["profile"] == "none" else \
        f"imbalance {d['imbalance']:g}"
    multilabel = d["task"] == "multi_label"
    train = f"{d['train_images']} images carrying {d['total']} labels" if multilabel else f"{d['total']} images"
    lines = [
        f"{d['name']}: {d['num_classes']} classes{' (multi-label)' if multilabel else ''}, profile {d['profile']} "
        f"({imbalance}), selection {d['selection']} (subset_seed {d['subset_seed']})",
        f"train {train} (max/min {d['imbalance_ratio']:.1f}), val {d['val_total']}, test {d['test_total']}",
        "",
        f"{'id':>4}  {'class':<{width}}  {'train':>6}  {'val':>4}  {'test':>6}  group",
    ]
    for i, (name, n) in enumerate(zip(d["class_names"], d["class_counts"])):
        val = d["val_counts"][i] if d["val_counts"] is not None else 0
        lines.append(f"{i:>4}  {name:<{width}}  {n:>6}  {val:>4}  {d['test_counts'][i]:>6}  {d['group_of_class'][i]}")
    g = d["groups"]
    sizes = f"many (> {many_thr}): {g['many']} classes   medium ({few_thr}..{many_thr}): {g['medium']}   " \
        f"few (< {few_thr}): {g['few']}"
    if d["published_groups"]:
        sizes = f"head: {g['many']} classes   medium: {g['medium']}   tail: {g['few']} (published split)"
    lines += [
        "",
        sizes,
        f"thresholds: {d['thresholds_rule']}",
        f"train indices sha256: {d['indices_sha256']}",
    ]
    return "\n".join(lines)


def write_indices(path: str | os.PathLike, indices) -> None:
    """The selected original indices, one per line, in selection order."""
    atomic_write_text(path, "".join(f"{int(i)}\n" for i in indices))
