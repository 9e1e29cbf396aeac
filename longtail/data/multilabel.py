"""Multi-label datasets: labels are N x C multi-hot rows, `LTData.task = "multi_label"` (docs/multilabel.md).

- `multilabel_list`: your own lists, `relative/path label,label,...` per line or a CSV with `path` and
  `labels` columns, class names from `data.class_names`;
- `voc_mlt`, `coco_mlt`: DB-Loss's VOC-MLT and COCO-MLT (Wu et al., ECCV 2020) from the original
  VOC / COCO annotations and DB-Loss's image-id lists and head / medium / tail class split.
The CIFAR-10 / Fashion-MNIST mosaics are in `longtail.data.mosaic`.

Bad lines, unknown labels and missing images raise a ConfigError naming file and line, or are skipped
and counted with `data.on_bad_sample: skip`. An image with no label is an all-negative sample (counted
in the log), or an error with `data.on_unlabelled: error`.
"""
from __future__ import annotations

import csv
import json
import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from longtail.config import DataConfig
from longtail.data.core import LTData, indices_sha256, normalisation_stats, register_dataset
from longtail.data.image_transforms import IMAGENET_MEAN, IMAGENET_STD
from longtail.data.policies import ImagePolicy
from longtail.data.listfile import (BadSamples, FileSplit, ImageList, PathRemap, check_size, missing_files,
                                    refuse_duplicates)
from longtail.data.safe_pickle import load_pickle
from longtail.errors import ConfigError

log = logging.getLogger(__name__)

# DB-Loss's convention for data without a published split: head >= 100 training images, tail < 20
# (the engine's groups are Many > many, Few < few: so many = 99, few = 20).
THRESHOLDS = (99, 20)
THRESHOLDS_RULE = "DB-Loss convention: head >= 100, medium 20..99, tail < 20 training images"

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
VOC_MLT_SIZES = {"train": 1142, "test": 4952}
COCO_MLT_SIZES = {"train": 1909, "test": 5000}


# ----------------------------------------------------------------------------- building blocks


def multi_hot(label_sets: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    out = np.zeros((len(label_sets), num_classes), dtype=np.uint8)
    for i, labels in enumerate(label_sets):
        out[i, list(labels)] = 1
    return out


def count_unlabelled(items: ImageList, what: str, on_unlabelled: str) -> int:
    """All-negative samples: counted in the log, or (`data.on_unlabelled: error`) the first one is an error."""
    empty = np.flatnonzero(items.labels.sum(axis=1) == 0)
    if len(empty) and on_unlabelled == "error":
        raise ConfigError(f"{items.where(empty[0])}{items.paths[empty[0]]} has no label ({len(empty)} such images in "
                          f"{what}); set data.on_unlabelled: keep to use them as all-negative samples")
    if len(empty):
        log.info("%s: %d of %d images have no label and are kept as all-negative samples", what, len(empty),
                 len(items.paths))
    return len(empty)


def drop_missing(items: ImageList, base: Path, bad: BadSamples) -> ImageList:
    missing = missing_files(base, items.paths, f"check images of {Path(items.list_file).name}")
    for i in missing:
        bad(f"{items.where(i)}image {base / items.paths[i]} does not exist ({len(missing)} of the {len(items.paths)} "
            "listed images are missing)")
    return items.subset(np.setdiff1d(np.arange(len(items.paths)), missing)) if missing else items


def read_class_names(path: Path) -> list[str]:
    """One class name per line, in class-id order; blank lines are ignored, duplicates are errors."""
    if not path.is_file():
        raise ConfigError(f"data.class_names: {path} does not exist (one class name per line, in class-id order)")
    names = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name in names:
            raise ConfigError(f"{path}:{lineno}: class name {name!r} already given on an earlier line")
        names.append(name)
    if not names:
        raise ConfigError(f"data.class_names: {path} lists no class")
    return names


def _rows(path: Path) -> list[tuple[int, Optional[str], Optional[str], Optional[str]]]:
    """(line number, path, labels field or None, problem) per non-blank line of a text or CSV list."""
    rows = []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if path.suffix.lower() != ".csv":
            for lineno, line in enumerate(f, start=1):
                text = line.strip()
                if text:
                    parts = text.rsplit(maxsplit=1)  # labels are the last field; a path may hold spaces only in CSV
                    rows.append((lineno, parts[0], parts[1] if len(parts) == 2 else None, None))
            return rows
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["path", "labels"]:
            raise ConfigError(f"{path}:1: a CSV list starts with the header 'path,labels', got {header}")
        for row in reader:
            lineno = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != 2 or not row[0].strip():
                rows.append((lineno, None, None, f"expected two columns 'path,labels', got {row}"))
            else:
                rows.append((lineno, row[0].strip(), row[1].strip() or None, None))
    return rows


def read_multilabel_list(path: Path, base: Path, class_names: list[str], remap: Optional[PathRemap] = None,
                         on_bad_sample: str = "error") -> ImageList:
    """A multi-label list: `relative/path name,name,...` per line (just the path: no label), or a CSV with a
    `path,labels` header; every image must exist under `base` and every name be in `class_names`."""
    if not path.is_file():
        raise ConfigError(f"split file {path} does not exist")
    index = {name: k for k, name in enumerate(class_names)}
    bad = BadSamples(on_bad_sample, str(path))
    paths, label_sets, origin = [], [], []
    for lineno, image, field, problem in _rows(path):
        where = f"{path}:{lineno}"
        if problem is not None:
            bad(f"{where}: {problem}")
            continue
        names = [] if field is None else [n.strip() for n in field.split(",")]
        if any(not n for n in names):
            bad(f"{where}: an empty label in {field!r} (expected 'relative/path label,label,...')")
            continue
        unknown = [n for n in names if n not in index]
        if unknown:
            bad(f"{where}: label {unknown[0]!r} is not one of the {len(class_names)} classes of data.class_names")
            continue
        paths.append(remap(image) if remap is not None else image)
        label_sets.append(sorted({index[n] for n in names}))
        origin.append(lineno - 1)
    items = ImageList(paths, multi_hot(label_sets, len(class_names)), np.asarray(origin, dtype=np.int64), str(path))
    items = drop_missing(items, base, bad)
    bad.summary()
    items.skipped = bad.count
    return items


def read_class_split(path: Path, num_classes: int) -> tuple[list[int], list[int], list[int]]:
    """DB-Loss's class_split.pkl: {'head': ids, 'middle': ids, 'tail': ids} (sets of 0-based class ids), read
    with the restricted unpickler; the three must partition the classes."""
    split = load_pickle(path)
    if not isinstance(split, dict) or not {"head", "middle", "tail"} <= set(split):
        found = sorted(split) if isinstance(split, dict) else type(split).__name__
        raise ConfigError(f"{path}: expected a dict with keys 'head', 'middle', 'tail' (DB-Loss's class_split.pkl), "
                          f"found {found}")
    groups = tuple(sorted(int(k) for k in split[key]) for key in ("head", "middle", "tail"))
    every = sorted(k for g in groups for k in g)
    if every != list(range(num_classes)):
        raise ConfigError(f"{path}: head, middle and tail must together hold each of the {num_classes} class ids "
                          f"0..{num_classes - 1} exactly once; they hold {len(every)} ids")
    return groups


def read_id_list(path: Path) -> list[str]:
    """Image ids, one per line (DB-Loss's img_id.txt; its COCO `img_id.pkl` is such a text file too, which
    its code reads with mmcv.list_from_file), or a pickled list of ids."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: DB-Loss's image-id list (see docs/multilabel.md for the files)")
    raw = path.read_bytes()
    if raw[:1] == b"\x80":  # a pickle (protocol >= 2)
        ids = load_pickle(path)
        if not isinstance(ids, (list, tuple, np.ndarray)):
            raise ConfigError(f"{path}: expected a pickled list of image ids, found {type(ids).__name__}")
        return [str(int(i)) if isinstance(i, (int, np.integer)) else str(i) for i in ids]
    return [line.strip() for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()]


def file_data(name: str, cfg: DataConfig, base: Path, class_names: list[str], train: ImageList,
              val: Optional[ImageList], test: ImageList, class_groups=None) -> LTData:
    """Wrap multi-label image lists as splits; the training counts are the images carrying each label."""
    if cfg.profile != "none":
        raise ConfigError(f"data.profile: {name} is multi-label and keeps its own label frequencies (a profile "
                          "subsamples by class id); set data.profile: none")
    if cfg.val_per_class > 0:
        raise ConfigError(f"data.val_per_class: {name} is multi-label, where a per-class hold-out is not defined; "
                          "give a val list (data.val_list) or set data.val_per_class: 0")
    if len(train.paths) == 0:
        raise ConfigError(f"{name}: the training split has no usable images")
    if cfg.image_size < 8:
        raise ConfigError(f"data.image_size: must be >= 8 pixels, got {cfg.image_size}")
    for split_name, items in (("train", train), ("val", val), ("test", test)):
        if items is not None:
            count_unlabelled(items, f"{name} {split_name}", cfg.on_unlabelled)
            if split_name != "train":
                refuse_duplicates(items, f"{name} {split_name}")
    positives = train.labels.sum(axis=0)
    if not positives.any():
        where = f" ({train.list_file})" if train.list_file else ""
        raise ConfigError(f"{name}: no training image has any label{where}; a multi-label training list gives each "
                          "image's labels after its path "
                          "(`relative/path label,label,...`)")
    unseen = [class_names[k] for k in np.flatnonzero(positives == 0)]
    if unseen:
        log.warning("%s: %d of %d classes have no positive training image, so nothing teaches them: %s", name,
                    len(unseen), len(class_names), ", ".join(unseen))
    mean = normalisation_stats(cfg.mean, IMAGENET_MEAN, "data.mean")
    std = normalisation_stats(cfg.std, IMAGENET_STD, "data.std")
    num_classes = len(class_names)

    def split(items: ImageList) -> FileSplit:
        return FileSplit(base, items, num_classes, cfg.image_size, mean, std, cfg.augment, cfg.num_workers,
                         cfg.on_bad_sample, ImagePolicy.from_config(cfg))

    train_split = split(train)
    counts = train_split.class_counts()
    return LTData(
        name=name, num_classes=num_classes, class_counts=counts, train=train_split,
        val=split(val) if val is not None else None, test=split(test), mean=mean, std=std, in_channels=3,
        image_size=cfg.image_size, default_thresholds=THRESHOLDS, indices=train_split.indices,
        indices_sha256=indices_sha256(train_split.indices), val_indices=None, class_names=list(class_names),
        imbalance=max(counts) / max(min(counts), 1), thresholds_rule=THRESHOLDS_RULE if class_groups is None
        else f"{name}: the published head / medium / tail class split", task="multi_label", class_groups=class_groups,
    )


def _in(base: Path, given: Optional[str]) -> Optional[Path]:
    if given is None:
        return None
    path = Path(given).expanduser()
    return path if path.is_absolute() else base / path


@register_dataset("multilabel_list")
def _multilabel_list(cfg: DataConfig, root: Path, download: bool) -> LTData:
    for key in ("train_list", "test_list", "class_names"):
        if getattr(cfg, key) is None:
            raise ConfigError(f"data.{key}: multilabel_list needs data.train_list, data.test_list and data.class_names "
                              "(files, relative to the data root or absolute)")
    names = read_class_names(_in(root, cfg.class_names))
    remap = PathRemap(cfg.path_remap)
    lists = {key: read_multilabel_list(_in(root, getattr(cfg, key)), root, names, remap, cfg.on_bad_sample)
             for key in ("train_list", "val_list", "test_list") if getattr(cfg, key) is not None}
    return file_data("multilabel_list", cfg, root, names, lists["train_list"], lists.get("val_list"),
                     lists["test_list"])


# ----------------------------------------------------------------------------- VOC-MLT


def read_voc(ids: list[str], year_dir: Path, id_file: Path, bad: BadSamples) -> ImageList:
    """`JPEGImages/<id>.jpg` labelled with every object class of `Annotations/<id>.xml`; objects marked
    difficult count as positives, as DB-Loss's reader (which ignores the flag) has it."""
    index = {name: k for k, name in enumerate(VOC_CLASSES)}
    paths, label_sets, origin = [], [], []
    for line, image_id in enumerate(ids):
        xml = year_dir / "Annotations" / f"{image_id}.xml"
        where = f"{id_file}:{line + 1}"
        try:
            objects = ET.parse(xml).getroot().findall("object")
        except (OSError, ET.ParseError) as exc:
            bad(f"{where}: cannot read the annotation {xml}: {exc}")
            continue
        names = [(obj.findtext("name") or "").strip() for obj in objects]
        unknown = [n for n in names if n not in index]
        if unknown:
            bad(f"{where}: {xml} has an object of class {unknown[0]!r}, not one of the 20 VOC classes")
            continue
        paths.append(f"JPEGImages/{image_id}.jpg")
        label_sets.append(sorted({index[n] for n in names}))
        origin.append(line)
    items = ImageList(paths, multi_hot(label_sets, len(VOC_CLASSES)), np.asarray(origin, dtype=np.int64), str(id_file))
    return drop_missing(items, year_dir, bad)


@register_dataset("voc_mlt")
def _voc_mlt(cfg: DataConfig, root: Path, download: bool) -> LTData:
    """<root>/VOCdevkit/{VOC2012, VOC2007, longtail2012/{img_id.txt, class_split.pkl}}."""
    devkit = root / "VOCdevkit"
    train_ids = _in(devkit, cfg.train_list) or devkit / "longtail2012" / "img_id.txt"
    test_ids = _in(devkit, cfg.test_list) or devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt"
    groups = read_class_split(devkit / "longtail2012" / "class_split.pkl", len(VOC_CLASSES))
    splits = {}
    for split, ids_file, year in (("train", train_ids, "VOC2012"), ("test", test_ids, "VOC2007")):
        bad = BadSamples(cfg.on_bad_sample, str(ids_file))
        ids = read_id_list(ids_file)
        check_size(ids_file, len(ids), VOC_MLT_SIZES[split], "voc_mlt", split)
        items = read_voc(ids, devkit / year, ids_file, bad)
        bad.summary()
        # Paths relative to the devkit, so one split base serves both years.
        splits[split] = ImageList([f"{year}/{p}" for p in items.paths], items.labels, items.origin, items.list_file)
    return file_data("voc_mlt", cfg, devkit, list(VOC_CLASSES), splits["train"], None, splits["test"], groups)


# ----------------------------------------------------------------------------- COCO-MLT


def read_coco(instances: Path, image_dir: str, keep: Optional[list[str]], id_file: Optional[Path],
              bad: BadSamples) -> tuple[ImageList, list[str]]:
    """Images of an `instances_*.json` (those of `keep`, in its order, else all in file order), each labelled
    with the categories of its annotations as DB-Loss's reader takes them: a box with area <= 0, width < 1 or
    height < 1 is skipped, crowd boxes count; classes are the categories by id. An image or annotation entry
    without the keys read here is an error naming it."""
    if not instances.is_file():
        raise ConfigError(f"{instances} does not exist: COCO 2017's annotations (see docs/multilabel.md)")
    try:
        record = json.loads(instances.read_text())
        categories = sorted(record["categories"], key=lambda c: c["id"])
        images, annotations = record["images"], record["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{instances}: not a COCO instances file (images, annotations, categories): {exc}") from None
    column = {c["id"]: k for k, c in enumerate(categories)}
    files = {}
    for n, img in enumerate(images):
        _check_entry(img, ("id", "file_name"), f"{instances}: images[{n}]")
        files[img["id"]] = img["file_name"]
    labels: dict[int, set] = {i: set() for i in files}
    for n, ann in enumerate(annotations):
        where = f"{instances}: annotations[{n}] (id {ann.get('id') if isinstance(ann, dict) else None})"
        _check_entry(ann, ("image_id", "category_id", "bbox", "area"), where)
        if ann["category_id"] not in column:
            raise ConfigError(f"{where}: category_id {ann['category_id']!r} is not one of the file's categories")
        try:
            _, _, w, h = ann["bbox"]
            degenerate = ann["area"] <= 0 or w < 1 or h < 1
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: bbox {ann['bbox']!r} / area {ann['area']!r}: expected [x, y, width, height] "
                              "and a number") from None
        if ann["image_id"] in labels and not degenerate:
            labels[ann["image_id"]].add(column[ann["category_id"]])
    order = [img["id"] for img in images] if keep is None else []
    if keep is not None:
        for line, image_id in enumerate(keep):
            if not image_id.isdigit() or int(image_id) not in files:
                bad(f"{id_file}:{line + 1}: image id {image_id!r} is not an image of {instances}")
                order.append(None)
                continue
            order.append(int(image_id))
    kept = [(line, i) for line, i in enumerate(order) if i is not None]
    items = ImageList([f"{image_dir}/{files[i]}" for _, i in kept], multi_hot([sorted(labels[i]) for _, i in kept],
                      len(categories)), np.asarray([line for line, _ in kept], dtype=np.int64),
                      str(id_file) if id_file is not None else "")
    return items, [c["name"] for c in categories]


def _check_entry(entry: object, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in entry] if isinstance(entry, dict) else list(keys)
    if missing:
        raise ConfigError(f"{where} has no {missing[0]!r}: a COCO instances file's entries need {', '.join(keys)}")


@register_dataset("coco_mlt")
def _coco_mlt(cfg: DataConfig, root: Path, download: bool) -> LTData:
    """<root>/coco/{annotations/instances_{train,val}2017.json, train2017/, val2017/, longtail2017/{img_id.pkl,
    class_split.pkl}}."""
    base = root / "coco"
    id_file = _in(base, cfg.train_list) or base / "longtail2017" / "img_id.pkl"
    bad = BadSamples(cfg.on_bad_sample, str(id_file))
    ids = read_id_list(id_file)
    check_size(id_file, len(ids), COCO_MLT_SIZES["train"], "coco_mlt", "train")
    train, names = read_coco(base / "annotations" / "instances_train2017.json", "train2017", ids, id_file, bad)
    train = drop_missing(train, base, bad)
    bad.summary()
    test_bad = BadSamples(cfg.on_bad_sample, "val2017")
    test, test_names = read_coco(base / "annotations" / "instances_val2017.json", "val2017", None, None, test_bad)
    if test_names != names:
        raise ConfigError(f"{base / 'annotations'}: instances_train2017.json and instances_val2017.json list different "
                          "categories")
    check_size(base / "annotations" / "instances_val2017.json", len(test.paths), COCO_MLT_SIZES["test"], "coco_mlt",
               "test")
    test = drop_missing(test, base, test_bad)
    test_bad.summary()
    groups = read_class_split(base / "longtail2017" / "class_split.pkl", len(names))
    return file_data("coco_mlt", cfg, base, names, train, None, test, groups)
