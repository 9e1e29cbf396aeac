"""`longtail data NAME --check`: decode every image file a dataset's splits read, once, before training does.

Training decodes an image when a batch first needs it, so a corrupt or truncated file would otherwise stop a
run (or, with `data.on_bad_sample: skip`, be skipped) hours into an epoch. In-memory datasets (CIFAR,
Fashion-MNIST and their mosaics) have no image files: their arrays are read whole, and their shapes checked,
while the dataset loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from longtail.data.core import LTData
from longtail.data.image_transforms import decode_image
from longtail.data.listfile import FileSplit
from longtail.progress import Progress

BATCH = 64  # files per worker task


class Decode(torch.utils.data.Dataset):
    """Decodes file i as training would; gives None, or the message saying why it cannot be read."""

    def __init__(self, files: list[tuple[Path, str]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Optional[str]:
        path, where = self.files[i]
        try:
            decode_image(path)
        except Exception as exc:  # Pillow raises OSError, ValueError, DecompressionBombError, ...
            return f"{where}cannot read image {path}: {exc}"
        return None


def image_files(data: LTData) -> dict[str, list[tuple[Path, str]]]:
    """Per split that reads image files: (path, `file:line: ` or ``), each file once over all splits."""
    seen: set[Path] = set()
    files: dict[str, list[tuple[Path, str]]] = {}
    for name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        if not isinstance(split, FileSplit):
            continue
        files[name] = []
        for i, relative in enumerate(split.items.paths):
            path = split.base / relative
            if path not in seen:
                seen.add(path)
                files[name].append((path, split.items.where(i)))
    return files


def check_images(data: LTData, num_workers: int = 0) -> dict:
    """{"opened": {split: files}, "unreadable": [message, ...]}, or for an in-memory dataset
    {"opened": {}, "unreadable": [], "note": why there is nothing to open}."""
    files = image_files(data)
    if not files:
        return {"opened": {}, "unreadable": [], "note": f"{data.name} holds its images as arrays, read whole and "
                "shape-checked when it loads: there are no image files to open"}
    every = [f for split in files.values() for f in split]
    groups = [list(range(start, min(start + BATCH, len(every)))) for start in range(0, len(every), BATCH)]
    loader = DataLoader(Decode(every), batch_sampler=groups, num_workers=num_workers, collate_fn=list)
    unreadable = []
    with Progress(len(every), "check images", "img") as progress:
        for group, messages in zip(groups, loader):
            unreadable += [m for m in messages if m is not None]
            progress.update(len(group))
    return {"opened": {name: len(split) for name, split in files.items()}, "unreadable": unreadable}


def format_check(result: dict) -> str:
    if "note" in result:
        return f"check: {result['note']}"
    opened = sum(result["opened"].values())
    splits = ", ".join(f"{name} {n}" for name, n in result["opened"].items())
    if not result["unreadable"]:
        return f"check: opened {opened} image files ({splits}): every one is readable"
    return "\n".join([f"check: {len(result['unreadable'])} of {opened} image files ({splits}) cannot be read:",
                      *(f"  {message}" for message in result["unreadable"])])
