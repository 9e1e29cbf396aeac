"""Reader for IDX files (the MNIST / Fashion-MNIST format), gzipped or plain."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from longtail.data.cifar import RawDataset
from longtail.errors import ConfigError

FASHION_MNIST_DIRS = ("fashion-mnist", "FashionMNIST/raw")  # our layout, torchvision's layout
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with `ndim` dimensions; `.gz` files are decompressed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise ConfigError(f"{path}: broken gzip stream (truncated download?): {exc}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"{path}: truncated IDX file ({len(raw)} bytes, the header alone needs {header})")
    if raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise ConfigError(f"{path}: bad IDX magic {raw[:4].hex()}; expected 000008{ndim:02x} "
                          f"(unsigned bytes, {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise ConfigError(f"{path}: {what}: header says {shape} ({expected} bytes), file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()  # writable, owns its memory


def find_idx(folder: Path, name: str) -> Path:
    """`name.gz` if present, else `name`."""
    gz = folder / f"{name}.gz"
    return gz if gz.exists() else folder / name


def fashion_mnist_dir(root: str | Path) -> Path:
    """The first known layout under `root` that holds the training images (else the default one)."""
    for sub in FASHION_MNIST_DIRS:
        if find_idx(Path(root) / sub, FASHION_MNIST_FILES[0]).exists():
            return Path(root) / sub
    return Path(root) / FASHION_MNIST_DIRS[0]


def _split(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise ConfigError(f"{images_path}: expected 28 x 28 images, got {images.shape[1:]}")
    if len(images) != len(labels):
        raise ConfigError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    if labels.size and labels.max() >= 10:
        raise ConfigError(f"{labels_path}: labels must lie in 0..9, found {labels.max()}")
    return images[:, None], labels


def read_fashion_mnist(root: str | Path) -> RawDataset:
    folder = fashion_mnist_dir(root)
    train_images, train_labels = _split(folder, "train")
    test_images, test_labels = _split(folder, "t10k")
    return RawDataset(train_images, train_labels, test_images, test_labels, list(FASHION_MNIST_CLASSES))
