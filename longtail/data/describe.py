"""`longtail data`: what a long-tailed dataset holds (counts, groups, subset identity)."""
from __future__ import annotations

import os

from longtail.checkpoint import atomic_write_text
from longtail.config import DataConfig
from longtail.data import LTData, build_data


def summarize(data: LTData, data_cfg: DataConfig) -> dict:
    """Per-class counts, Many/Medium/Few sizes under the dataset's default thresholds, and the selected
    original train indices with their sha256."""
    many_thr, few_thr = data.default_thresholds
    counts = data.class_counts
    val_counts = data.val.class_counts() if data.val is not None else None
    return {
        "name": data.name,
        "num_classes": data.num_classes,
        "profile": data_cfg.profile,
        "imbalance": data.imbalance,  # under profile none: measured, as imbalance_ratio
        "selection": data_cfg.selection,
        "subset_seed": data_cfg.subset_seed,
        "class_names": data.class_names,
        "class_counts": counts,
        "total": sum(counts),
        "imbalance_ratio": max(counts) / min(counts),
        "thresholds": [many_thr, few_thr],
        "thresholds_rule": data.thresholds_rule,
        "groups": {
            "many": sum(n > many_thr for n in counts),
            "medium": sum(few_thr <= n <= many_thr for n in counts),
            "few": sum(n < few_thr for n in counts),
        },
        "val_counts": val_counts,
        "val_total": sum(val_counts) if val_counts is not None else 0,
        "test_total": len(data.test),
        "indices_sha256": data.indices_sha256,
        "indices": data.indices.tolist(),  # for --indices FILE; long, so not shown in the table
    }


def describe(data_cfg: DataConfig, root: str | os.PathLike | None = None, download: bool = False) -> dict:
    return summarize(build_data(data_cfg, root, download), data_cfg)


def _group(n: int, many_thr: int, few_thr: int) -> str:
    return "many" if n > many_thr else "few" if n < few_thr else "medium"


def format_description(d: dict) -> str:
    """A readable table of `describe`'s result."""
    many_thr, few_thr = d["thresholds"]
    width = max(len("class"), *(len(n) for n in d["class_names"]))
    imbalance = f"natural counts, imbalance {d['imbalance']:.4g} measured" if d["profile"] == "none" else \
        f"imbalance {d['imbalance']:g}"
    lines = [
        f"{d['name']}: {d['num_classes']} classes, profile {d['profile']} ({imbalance}), "
        f"selection {d['selection']} (subset_seed {d['subset_seed']})",
        f"train {d['total']} images (max/min {d['imbalance_ratio']:.1f}), val {d['val_total']}, "
        f"test {d['test_total']}",
        "",
        f"{'id':>4}  {'class':<{width}}  {'train':>6}  {'val':>4}  group",
    ]
    for i, (name, n) in enumerate(zip(d["class_names"], d["class_counts"])):
        val = d["val_counts"][i] if d["val_counts"] is not None else 0
        lines.append(f"{i:>4}  {name:<{width}}  {n:>6}  {val:>4}  {_group(n, many_thr, few_thr)}")
    g = d["groups"]
    lines += [
        "",
        f"many (> {many_thr}): {g['many']} classes   medium ({few_thr}..{many_thr}): {g['medium']}   "
        f"few (< {few_thr}): {g['few']}",
        f"thresholds: {d['thresholds_rule']}",
        f"train indices sha256: {d['indices_sha256']}",
    ]
    return "\n".join(lines)


def write_indices(path: str | os.PathLike, indices) -> None:
    """The selected original indices, one per line, in selection order."""
    atomic_write_text(path, "".join(f"{int(i)}\n" for i in indices))
