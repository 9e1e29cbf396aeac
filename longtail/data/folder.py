"""`ImageFolder`-style datasets: `<root>/train/<class>/<image>`, `<root>/test/<class>/...`, optional `val/`.

Class ids are the sorted class-folder names of `train/`; the natural per-class counts are the profile
(`data.profile: none`), or `exp`/`step` subsample them with the same code as CIFAR.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from longtail.config import DataConfig
from longtail.data.core import LTData, register_dataset
from longtail.data.listfile import BadSamples, ImageList, make_splits
from longtail.errors import ConfigError
from longtail.progress import track

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def class_names(folder: Path) -> list[str]:
    """Sorted sub-folder names, hidden ones (`.cache`, `.ipynb_checkpoints`) left out."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(folder: Path, base: Path, classes: list[str], on_bad_sample: str) -> ImageList:
    """Every image file under `folder/<class>/` (sorted), labelled by its class's position in `classes`."""
    ids = {name: i for i, name in enumerate(classes)}
    bad = BadSamples(on_bad_sample, str(folder))
    paths: list[str] = []
    labels: list[int] = []
    for name in track(class_names(folder), f"scan {folder}", "folders"):
        if name not in ids:
            bad(f"{folder / name}: class folder not among the training classes ({len(classes)} folders in train/)")
            continue
        files = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(folder / name).parts))
        paths += [str(p.relative_to(base)) for p in files]
        labels += [ids[name]] * len(files)
    bad.summary()
    return ImageList(paths, np.asarray(labels, dtype=np.int64), np.arange(len(paths), dtype=np.int64),
                     skipped=bad.count)


def build_folder(cfg: DataConfig, root: str | Path) -> LTData:
    """The folder dataset at `root` (data.root): train/ and test/ required, val/ optional."""
    base = Path(root)
    if cfg.class_names is not None:
        raise ConfigError("data.class_names: a folder dataset names its classes by their folders (sorted); the key is "
                          "for list-file datasets (imagenet_lt, places_lt, inat2018), whose lists hold only ids")
    layout = ("data.name=folder reads <data.root>/train/<class>/<image> and <data.root>/test/<class>/<image> "
              "(and optionally val/); point --data-root DIR (or data.root, when training) at such a directory")
    if not (base / "train").is_dir() or not (base / "test").is_dir():
        raise ConfigError(f"{base}: no train/ and test/ folders; {layout}")
    classes = class_names(base / "train")
    if len(classes) < 2:
        raise ConfigError(f"{base / 'train'}: found {len(classes)} class folder(s), need at least 2; {layout}")
    train = scan(base / "train", base, classes, cfg.on_bad_sample)
    counts = np.bincount(train.labels, minlength=len(classes))
    if (counts == 0).any():
        empty = classes[int(np.flatnonzero(counts == 0)[0])]
        raise ConfigError(f"{base / 'train' / empty}: class folder without images ({', '.join(IMAGE_EXTENSIONS)})")
    val: Optional[ImageList] = None
    if (base / "val").is_dir():
        if cfg.val_per_class == 0:
            val = scan(base / "val", base, classes, cfg.on_bad_sample)
        else:
            log.info("folder %s: val/ not used, data.val_per_class=%d holds val out of train", base, cfg.val_per_class)
    test = scan(base / "test", base, classes, cfg.on_bad_sample)
    log.info("folder %s: %d classes, %d train / %s val / %d test images", base, len(classes), len(train.paths),
             len(val.paths) if val is not None else "no", len(test.paths))
    return make_splits("folder", cfg, base, len(classes), train, val, test, classes)


@register_dataset("folder")
def _folder(cfg: DataConfig, root: Path, download: bool) -> LTData:
    return build_folder(cfg, root)
