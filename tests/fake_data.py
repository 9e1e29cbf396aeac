"""Tiny fake datasets written in the exact on-disk formats of the real ones.

- CIFAR-10 / CIFAR-100: Python 2 protocol-2 pickles, as the official archives ship them (str keys,
  `numpy.core.multiarray._reconstruct` arrays, label lists), emitted opcode by opcode.
- Fashion-MNIST: big-endian IDX files, gzipped or plain.

Every image carries its position in its file split in its first three bytes (little-endian), so a test
can tell which original images a subset picked: `decode_index(images)`. The remaining pixels are a
class-dependent brightness plus noise (learnable by a tiny model), or zeros with `noise=False` (fast).
Training labels come in a seeded shuffled order, as in the real files.
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np


@dataclass
class Fake:
    path: Path  # the dataset directory, e.g. ROOT/cifar-10-batches-py
    train_labels: np.ndarray
    test_labels: np.ndarray


def decode_index(images) -> np.ndarray:
    """The original file position stored in each image's first three bytes (N x C x H x W uint8)."""
    flat = np.asarray(images).reshape(len(images), -1)[:, :3].astype(np.int64)
    return flat[:, 0] | flat[:, 1] << 8 | flat[:, 2] << 16


def _labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    return labels


def _pixels(labels: np.ndarray, row_bytes: int, num_classes: int, noise: bool, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    if noise:
        data = rng.integers(0, 96, size=(n, row_bytes), dtype=np.uint8)
        data += (labels * (160 // max(num_classes - 1, 1))).astype(np.uint8)[:, None]
    else:
        data = np.zeros((n, row_bytes), dtype=np.uint8)
    index = np.arange(n)
    for b in range(3):
        data[:, b] = (index >> (8 * b)) & 255
    return data


# --- Python 2 pickle emitter (protocol 2, the opcodes cPickle wrote for the CIFAR archives) ---

def _p_str(value: str | bytes) -> bytes:
    raw = value.encode("latin1") if isinstance(value, str) else value
    head = b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<i", len(raw))
    return head + raw


def _p_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    return b"J" + struct.pack("<i", value)


def _p_list(items: list) -> bytes:
    out = [b"]"]
    for start in range(0, len(items), 1000):  # cPickle batches APPENDS by 1000
        out += [b"("] + [_p_scalar(x) for x in items[start:start + 1000]] + [b"e"]
    return b"".join(out)


def _p_scalar(value) -> bytes:
    return _p_int(int(value)) if isinstance(value, (int, np.integer)) else _p_str(value)


def _p_array(array: np.ndarray) -> Iterator[bytes]:
    shape = b"(" + b"".join(_p_int(n) for n in array.shape) + b"t"
    dtype = (b"cnumpy\ndtype\n(" + _p_str("u1") + _p_int(0) + _p_int(1) + b"tR("
             + _p_int(3) + _p_str("|") + b"NNN" + _p_int(-1) + _p_int(-1) + _p_int(0) + b"tb")
    yield (b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n" + _p_int(0) + b"\x85"
           + _p_str("b") + b"tR(" + _p_int(1) + shape + dtype + b"\x89")
    yield b"T" + struct.pack("<i", array.nbytes)
    yield array.tobytes()
    yield b"tb"


def _write_py2_pickle(path: Path, entries: dict) -> None:
    with open(path, "wb") as f:
        f.write(b"\x80\x02}(")
        for key, value in entries.items():
            f.write(_p_str(key))
            if isinstance(value, np.ndarray):
                for chunk in _p_array(value):
                    f.write(chunk)
            elif isinstance(value, list):
                f.write(_p_list(value))
            else:
                f.write(_p_scalar(value))
        f.write(b"u.")


# --- writers ---

def write_cifar10(root: str | Path, train_per_class: int = 20, test_per_class: int = 4,
                  seed: int = 0, noise: bool = True) -> Fake:
    """ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    rng = np.random.default_rng(seed)
    out = Path(root) / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train = _labels(10, train_per_class, rng)
    test = _labels(10, test_per_class, rng)
    data = _pixels(train, 3072, 10, noise, rng)
    for k, part in enumerate(np.array_split(np.arange(len(train)), 5), start=1):
        _write_py2_pickle(out / f"data_batch_{k}", {
            "batch_label": f"training batch {k} of 5",
            "labels": train[part].tolist(),
            "data": data[part],
            "filenames": [f"img_{i:06d}.png" for i in part],
        })
    _write_py2_pickle(out / "test_batch", {
        "batch_label": "testing batch 1 of 1",
        "labels": test.tolist(),
        "data": _pixels(test, 3072, 10, noise, rng),
        "filenames": [f"test_{i:06d}.png" for i in range(len(test))],
    })
    _write_py2_pickle(out / "batches.meta", {"num_cases_per_batch": len(train) // 5, "label_names": names,
                                             "num_vis": 3072})
    return Fake(out, train, test)


def write_cifar100(root: str | Path, train_per_class: int = 20, test_per_class: int = 2,
                   seed: int = 0, noise: bool = True) -> Fake:
    """ROOT/cifar-100-python/{train, test, meta} with fine (100) and coarse (20) labels."""
    rng = np.random.default_rng(seed)
    out = Path(root) / "cifar-100-python"
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": _labels(100, train_per_class, rng), "test": _labels(100, test_per_class, rng)}
    for name, labels in splits.items():
        _write_py2_pickle(out / name, {
            "filenames": [f"{name}_{i:06d}.png" for i in range(len(labels))],
            "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": _pixels(labels, 3072, 100, noise, rng),
        })
    _write_py2_pickle(out / "meta", {"fine_label_names": [f"fine_{i}" for i in range(100)],
                                     "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    return Fake(out, splits["train"], splits["test"])


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """An IDX file of unsigned bytes: magic 0x0000 08 NDIM, big-endian dims, then the data."""
    payload = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload, compresslevel=1)
    path.write_bytes(payload)


def write_fashion_mnist(root: str | Path, train_per_class: int = 20, test_per_class: int = 4,
                        seed: int = 0, gz: bool = True, noise: bool = True) -> Fake:
    """ROOT/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""
    rng = np.random.default_rng(seed)
    out = Path(root) / "fashion-mnist"
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": _labels(10, train_per_class, rng), "t10k": _labels(10, test_per_class, rng)}
    for prefix, labels in splits.items():
        images = _pixels(labels, 784, 10, noise, rng).reshape(-1, 28, 28)
        write_idx(out / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(out / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), gz)
    return Fake(out, splits["train"], splits["t10k"])
