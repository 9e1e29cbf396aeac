"""List-file datasets (ImageNet-LT, Places-LT, iNaturalist 2018) and the split that decodes image files.

A split file has one `relative/path label` per line; paths are relative to the dataset directory
`<data root>/<dir>` (e.g. `$LONGTAIL_DATA/ImageNet_LT`), after the `data.path_remap` prefix rewrite (a
remapped path may be absolute). Broken lines, missing or unreadable images and out-of-range labels
raise a ConfigError naming file and line, or with `data.on_bad_sample: skip` are skipped with a logged
warning and count. Images are decoded with Pillow in DataLoader workers (`data.num_workers`).
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from longtail.config import DataConfig
from longtail.data.core import LTData, default_thresholds_rule, indices_sha256, recorded_imbalance, register_dataset
from longtail.metrics import default_thresholds
from longtail.data.image_transforms import IMAGENET_MEAN, IMAGENET_STD, ImageTransform, decode_image, sample_generator
from longtail.data.policies import ImagePolicy
from longtail.data.profiles import lt_subset
from longtail.data.splits import Batch, LabelledSplit
from longtail.errors import ConfigError
from longtail.progress import track

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    """A published list-file benchmark: where its files live and how many lines each has."""

    name: str
    dirname: str  # under the data root
    num_classes: int
    lists: dict[str, tuple[str, int]]  # split -> (default file name, published number of lines)


BENCHMARKS = {
    "imagenet_lt": Benchmark("imagenet_lt", "ImageNet_LT", 1000, {
        "train": ("ImageNet_LT_train.txt", 115_846),
        "val": ("ImageNet_LT_val.txt", 20_000),
        "test": ("ImageNet_LT_test.txt", 50_000),
    }),
    "places_lt": Benchmark("places_lt", "Places_LT", 365, {
        "train": ("Places_LT_train.txt", 62_500),
        "val": ("Places_LT_val.txt", 7_300),
        "test": ("Places_LT_test.txt", 36_500),
    }),
    # iNaturalist 2018 has no separate test set: its official val split is the test split everyone reports.
    "inat2018": Benchmark("inat2018", "iNaturalist18", 8142, {
        "train": ("iNaturalist18_train.txt", 437_513),
        "test": ("iNaturalist18_val.txt", 24_426),
    }),
}


@dataclass
class ImageList:
    """Image files with labels and, for messages, the split file and line each came from."""

    paths: list[str]  # relative to the dataset directory, or absolute
    labels: np.ndarray  # int64 class ids, or N x C multi-hot rows (longtail.data.multilabel)
    origin: np.ndarray  # int64 original index: 0-based line in `list_file`, or position in a folder scan
    list_file: str = ""  # empty for folder datasets
    skipped: int = 0

    def where(self, i: int) -> str:
        """`file:line: ` for messages about sample i (nothing for folder datasets)."""
        return f"{self.list_file}:{self.origin[i] + 1}: " if self.list_file else ""

    def subset(self, positions: np.ndarray) -> "ImageList":
        return ImageList([self.paths[i] for i in positions], self.labels[positions], self.origin[positions],
                         self.list_file)


def refuse_duplicates(items: ImageList, split: str) -> None:
    """An evaluation split scores each image once: an image listed twice is an error naming it and both lines."""
    first: dict[str, int] = {}
    for i, path in enumerate(items.paths):
        if path in first:
            j = first[path]
            lines = f"lines {items.origin[j] + 1} and {items.origin[i] + 1} of {items.list_file}" if items.list_file \
                else f"entries {j + 1} and {i + 1}"
            raise ConfigError(f"{split} split: image {path} is listed twice ({lines}); an evaluation split scores "
                              "each image once, so remove the repeated line")
        first[path] = i


class BadSamples:
    """Bad samples: the first raises in `error` mode; `skip` mode counts them and logs the first few."""

    shown = 10

    def __init__(self, mode: str, what: str):
        self.mode, self.what, self.count = mode, what, 0

    def __call__(self, message: str) -> None:
        if self.mode == "error":
            raise ConfigError(f"{message} (set data.on_bad_sample: skip to skip such samples with a warning)")
        self.count += 1
        if self.count <= self.shown:
            log.warning("skipped: %s%s", message, " (further ones are counted, not shown)" if self.count == self.shown else "")

    def summary(self) -> None:
        if self.count:
            log.warning("data.on_bad_sample=skip: skipped %d bad sample(s) in %s", self.count, self.what)


class PathRemap:
    """`data.path_remap`: replace the longest matching prefix ({old_prefix: new_prefix}).

    Looks up each distinct prefix length once per path, so a remap with an entry per class folder
    (365 for Places-LT) stays fast on long lists.
    """

    def __init__(self, remap: Optional[dict[str, str]]):
        if remap and any(not old for old in remap):
            raise ConfigError("data.path_remap: an empty old prefix would match every path; "
                              "give {old_prefix: new_prefix}")
        self.remap = dict(remap or {})
        self.lengths = sorted({len(old) for old in self.remap}, reverse=True)

    def __call__(self, path: str) -> str:
        for n in self.lengths:
            new = self.remap.get(path[:n])
            if new is not None:
                return new + path[n:]
        return path


def missing_files(base: Path, paths: Sequence[str], desc: str) -> list[int]:
    """Positions of `paths` (relative to `base`, or absolute) that are not files.

    Lists each parent directory once instead of a stat per file: one call per class folder on
    ImageNet or iNaturalist, which matters on network file systems. `desc` names the pass in its progress.
    """
    by_dir: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for i, p in enumerate(paths):
        folder, name = os.path.split(os.path.join(base, p))
        by_dir[folder].append((i, name))
    missing = []
    for folder, members in track(by_dir.items(), desc, "folders"):
        try:
            present = {e.name for e in os.scandir(folder) if e.is_file()}
        except OSError:
            present = set()
        missing += [i for i, name in members if name not in present]
    return sorted(missing)


def read_list(list_path: Path, base: Path, num_classes: int, remap: Optional[PathRemap] = None,
              on_bad_sample: str = "error") -> ImageList:
    """Parse a split file; every sample's image must exist under `base` and its label lie in 0..C-1."""
    if not list_path.is_file():
        raise ConfigError(f"split file {list_path} does not exist (see docs/large_datasets.md for where to get it)")
    bad = BadSamples(on_bad_sample, str(list_path))
    paths, labels, origin = [], [], []
    with open(list_path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()  # read at once (fast), so that parsing can show progress against the total
    for lineno, line in enumerate(track(lines, f"read {list_path.name}", "lines"), start=1):
        text = line.strip()
        if not text:
            continue
        where = f"{list_path}:{lineno}"
        parts = text.rsplit(maxsplit=1)  # the label is the last field; a path may contain spaces
        if len(parts) != 2:
            bad(f"{where}: expected 'relative/path label', got {text!r}")
            continue
        try:
            label = int(parts[1])
        except ValueError:
            bad(f"{where}: the label {parts[1]!r} is not an integer (expected 'relative/path label')")
            continue
        if not 0 <= label < num_classes:
            bad(f"{where}: label {label} is outside 0..{num_classes - 1}")
            continue
        paths.append(remap(parts[0]) if remap is not None else parts[0])
        labels.append(label)
        origin.append(lineno - 1)
    items = ImageList(paths, np.asarray(labels, dtype=np.int64), np.asarray(origin, dtype=np.int64), str(list_path))
    missing = missing_files(base, paths, f"check images of {list_path.name}")
    for i in missing:
        bad(f"{items.where(i)}image {base / paths[i]} does not exist ({len(missing)} of the {len(paths)} listed "
            "images are missing; data.path_remap rewrites path prefixes)")
    if missing:
        items = items.subset(np.setdiff1d(np.arange(len(paths)), missing))
    bad.summary()
    items.skipped = bad.count
    return items


def read_class_names(path: Path, num_classes: int) -> list[str]:
    """`data.class_names`: one name per line, in class-id order (blank lines ignored; names may repeat,
    as ImageNet's do)."""
    if not path.is_file():
        raise ConfigError(f"data.class_names: {path} does not exist; give a file with one class name per line, "
                          "in class-id order")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ConfigError(f"data.class_names: {path} lists {len(names)} names, but the dataset has {num_classes} "
                          "classes; give one name per line, in class-id order")
    return names


def check_size(list_path: Path, found: int, expected: int, name: str, split: str) -> bool:
    """Warn (not fail) when a split file's line count differs from the published one; True if it matches.

    Not an error: subsets and re-made lists are legitimate (debugging on a fraction, a re-generated
    iNaturalist list), but results on them are not comparable to published numbers, so it is logged.
    """
    if found != expected:
        log.warning("%s: %d lines, but the published %s %s split has %d; results will not be comparable "
                    "to published numbers", list_path, found, name, split, expected)
    return found == expected


class _Reader(torch.utils.data.Dataset):
    """Decodes and transforms one sample; errors come back as messages so the main process reports them."""

    def __init__(self, base: Path, items: ImageList, transform: ImageTransform, seed: int, epoch: int):
        self.base, self.items, self.transform, self.seed, self.epoch = base, items, transform, seed, epoch

    def __len__(self) -> int:
        return len(self.items.paths)

    def __getitem__(self, pos: int) -> tuple[Optional[torch.Tensor], Any, int, Optional[str]]:
        # Per-image ops gain nothing from intra-op threads, and with num_workers=0 they run in the
        # training process, where a multi-threaded resize stalls ~50x on a busy machine.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._load(pos)
        finally:
            torch.set_num_threads(threads)

    def _load(self, pos: int) -> tuple[Optional[torch.Tensor], Any, int, Optional[str]]:
        path = self.base / self.items.paths[pos]
        label = self.items.labels[pos]  # a class id, or a multi-hot row
        try:
            image = decode_image(path)
        except Exception as exc:  # Pillow raises OSError, ValueError, DecompressionBombError, ...
            return None, label, pos, f"{self.items.where(pos)}cannot read image {path}: {exc}"
        generator = sample_generator(self.seed, self.epoch, pos) if self.transform.random else None
        return self.transform(image, generator), label, pos, None


def _collate(samples: list) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, list[str]]:
    good = [s for s in samples if s[3] is None]
    x = torch.stack([s[0] for s in good]) if good else None
    y = torch.as_tensor(np.asarray([s[1] for s in good]), dtype=torch.int64)
    idx = torch.tensor([s[2] for s in good], dtype=torch.int64)
    return x, y, idx, [s[3] for s in samples if s[3] is not None]


class FileSplit(LabelledSplit):
    """A split of image files decoded in DataLoader workers; same interface as `InMemorySplit`.

    `batches(sampler=None)` is an evaluation pass: file order, test transform. With a sampler it is a
    training pass with the `augment` transform. Batches hold already normalised float images.
    """

    def __init__(self, base: Path, items: ImageList, num_classes: int, image_size: int, mean: Sequence[float],
                 std: Sequence[float], augment: str, num_workers: int, on_bad_sample: str,
                 policy: ImagePolicy = ImagePolicy()):
        self.base, self.items = base, items
        self.labels = torch.as_tensor(items.labels, dtype=torch.int64)
        self.indices = torch.as_tensor(items.origin, dtype=torch.int64)  # lines of the split file (0-based)
        self.num_classes = num_classes
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.train_transform = ImageTransform(image_size, self.mean, self.std, augment, policy=policy)
        self.eval_transform = ImageTransform(image_size, self.mean, self.std, "none")
        self.crops_transform = ImageTransform(image_size, self.mean, self.std, "none", tta="lift_crops")
        self.num_workers = num_workers
        self.on_bad_sample = on_bad_sample

    def batches(self, batch_size: int, *, sampler: Optional[str] = "instance", seed: int = 0, epoch: int = 0,
                rank: int = 0, world: int = 1, drop_last: bool = False, start: int = 0,
                tta: str = "none") -> Iterator[Batch]:
        """(float images, labels, positions in this split) on the CPU; bad samples per `on_bad_sample`. An
        evaluation pass with `tta: lift_crops` gives each image's five crops (N x 5 x 3 x S x S)."""
        positions = self.batch_positions(batch_size, sampler, seed, epoch, rank, world, drop_last, start)
        groups = [p.tolist() for p in positions]
        if sampler is not None:
            transform = self.train_transform
        else:
            transform = self.crops_transform if tta == "lift_crops" else self.eval_transform
        loader = DataLoader(_Reader(self.base, self.items, transform, seed, epoch), batch_sampler=groups,
                            num_workers=self.num_workers, collate_fn=_collate,
                            pin_memory=torch.cuda.is_available())
        bad = BadSamples(self.on_bad_sample, f"this pass over {len(self)} images")
        for group, (x, y, idx, errors) in zip(groups, loader):
            for message in errors:
                bad(message)
            # With several processes every rank must take the same training steps (the engine skips a batch
            # of one image, for BatchNorm, on all ranks alike); a batch emptied here would desynchronise them.
            if world > 1 and sampler is not None and len(y) < min(2, len(group)):
                raise ConfigError(
                    f"data.on_bad_sample=skip: a training batch of rank {rank} kept {len(y)} of {len(group)} images "
                    f"after skipping unreadable ones, so the {world} processes would take different numbers of "
                    "steps; remove the unreadable images named above from the split file (or folder)")
            if x is not None:
                yield x, y, idx
        bad.summary()

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The image decoded with the evaluation transform (resized, normalised float: what `batches(sampler=None)`
        gives; the training transform runs in `batches` with a sampler) and its label; an unreadable image is a
        ConfigError naming it."""
        image, _, _, error = _Reader(self.base, self.items, self.eval_transform, 0, 0)[pos]
        if error is not None:
            raise ConfigError(error)
        return image, self.labels[pos]

    def to_input(self, x: torch.Tensor, device: torch.device | str, train: bool,
                 generator: torch.Generator | None = None, tta: str = "none") -> torch.Tensor:
        """The batch is already transformed in the workers (the crops too); only move it."""
        return x.to(device, non_blocking=True)


def make_splits(name: str, cfg: DataConfig, base: Path, num_classes: int, train: ImageList,
                val: Optional[ImageList], test: ImageList, class_names: Optional[list[str]] = None) -> LTData:
    """Apply the LT profile to `train` (`profile: none` keeps its counts) and wrap everything as splits."""
    if cfg.image_size < 8:
        raise ConfigError(f"data.image_size: must be >= 8 pixels, got {cfg.image_size}")
    if len(train.paths) == 0:
        raise ConfigError(f"{name}: the training split has no usable images")
    if cfg.val_per_class > 0 and val is not None:
        raise ConfigError(f"{name}: data.val_per_class={cfg.val_per_class} holds a val split out of train, but a val "
                          "list is also given (data.val_list); choose one")
    mean = tuple(cfg.mean) if cfg.mean is not None else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg.std is not None else IMAGENET_STD
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"data.mean / data.std: need 3 values (RGB), got {len(mean)} / {len(std)}")
    for split, items in (("val", val), ("test", test)):
        if items is not None:
            refuse_duplicates(items, f"{name} {split}")
    empty = np.flatnonzero(np.bincount(train.labels, minlength=num_classes) == 0)
    if len(empty):
        raise ConfigError(f"{name}: {len(empty)} of {num_classes} classes have no training image "
                          f"(first: class {empty[0]}{' in ' + train.list_file if train.list_file else ''})")
    subset = lt_subset(train.labels, num_classes, cfg)
    if cfg.profile != "none":
        log.info("%s: data.profile=%s subsamples the training images to %d of %d", name, cfg.profile,
                 len(subset.train), len(train.paths))

    def split(items: ImageList) -> FileSplit:
        return FileSplit(base, items, num_classes, cfg.image_size, mean, std, cfg.augment, cfg.num_workers,
                         cfg.on_bad_sample, ImagePolicy.from_config(cfg))

    train_split = split(train.subset(subset.train))
    if cfg.val_per_class > 0:
        val = train.subset(subset.val)
    val_split = split(val) if val is not None else None
    test_split = split(test)
    return LTData(
        name=name, num_classes=num_classes, class_counts=train_split.class_counts(), train=train_split,
        val=val_split, test=test_split, mean=mean, std=std, in_channels=3, image_size=cfg.image_size,
        default_thresholds=default_thresholds(name), indices=train_split.indices,
        indices_sha256=indices_sha256(train_split.indices), val_indices=val_split.indices if val_split is not None else None,
        class_names=class_names or [str(c) for c in range(num_classes)],
        imbalance=recorded_imbalance(cfg, train_split.class_counts()),
        thresholds_rule=default_thresholds_rule(name, num_classes),
    )


def build_listfile(cfg: DataConfig, root: str | Path, benchmark: Benchmark) -> LTData:
    """Read a benchmark's split files from `<root>/<dirname>` (or the paths in data.train_list/...)."""
    remap = PathRemap(cfg.path_remap)
    base = Path(root) / benchmark.dirname
    given = {"train": cfg.train_list, "val": cfg.val_list, "test": cfg.test_list}
    if given["val"] is not None and "val" not in benchmark.lists:
        raise ConfigError(f"data.val_list: {benchmark.name} has no published val split; use data.val_per_class "
                          "to hold one out of train, or leave data.val_list null")
    read: dict[str, Optional[ImageList]] = {}
    for split, (default_name, expected) in benchmark.lists.items():
        path = Path(given[split]) if given[split] is not None else Path(default_name)
        path = path if path.is_absolute() else base / path
        optional_val = split == "val" and (given["val"] is None and (cfg.val_per_class > 0 or not path.is_file()))
        if optional_val:  # the default val list is used when present, and never with val_per_class
            if cfg.val_per_class == 0:
                log.info("%s: no val split (%s not found)", benchmark.name, path)
            read[split] = None
            continue
        items = read_list(path, base, benchmark.num_classes, remap, cfg.on_bad_sample)
        check_size(path, len(items.paths) + items.skipped, expected, benchmark.name, split)
        read[split] = items
    names = None
    if cfg.class_names is not None:
        path = Path(cfg.class_names)
        names = read_class_names(path if path.is_absolute() else base / path, benchmark.num_classes)
    return make_splits(benchmark.name, cfg, base, benchmark.num_classes, read["train"], read.get("val"),
                       read["test"], names)


@register_dataset("imagenet_lt")
def _imagenet_lt(cfg: DataConfig, root: Path, download: bool) -> LTData:
    return build_listfile(cfg, root, BENCHMARKS["imagenet_lt"])


@register_dataset("places_lt")
def _places_lt(cfg: DataConfig, root: Path, download: bool) -> LTData:
    return build_listfile(cfg, root, BENCHMARKS["places_lt"])


@register_dataset("inat2018")
def _inat2018(cfg: DataConfig, root: Path, download: bool) -> LTData:
    return build_listfile(cfg, root, BENCHMARKS["inat2018"])
