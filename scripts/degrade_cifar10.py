"""Write a copy of a CIFAR-10 root whose every image went through JPEG once more: a dose-response check.

    python scripts/degrade_cifar10.py SRC_ROOT DST_ROOT [--quality 50] [--shift 1]

Why: a CIFAR-10 rebuilt from a lossy copy (JPEG at quality 75, 4:2:0 chroma) trains models a few points
below published numbers, and the originals may not be at hand to compare with. Training the same recipe on
a copy degraded once more, by about as much again, measures what such a degradation costs: if accuracy falls
by the gap, the copy can explain it; if it barely moves, it cannot.

Each image is shifted `--shift` pixels down and right (edge pixels repeated), so the 8 x 8 JPEG blocks no
longer line up with those of an earlier encoding (an aligned re-encode at a similar quality changes little),
encoded at `--quality` with 4:2:0 chroma, decoded, and shifted back. Labels, order, batch split, class names
and file names stay as they are. Prints the mean absolute change per pixel (in 1/255) over all 60,000 images.
DST_ROOT/cifar-10-batches-py must not exist yet; it appears whole or not at all.
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from longtail.data.cifar import CIFAR10_DIR
from longtail.data.safe_pickle import load_pickle

BATCHES = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]


def reencode(images: np.ndarray, quality: int, shift: int) -> np.ndarray:
    """uint8 N x 3072 rows (CIFAR's R, G, B planes) -> the same after one shifted JPEG round trip."""
    out = np.empty_like(images)
    for i, row in enumerate(images):
        hwc = row.reshape(3, 32, 32).transpose(1, 2, 0)
        shifted = np.pad(hwc, ((shift, 0), (shift, 0), (0, 0)), mode="edge")
        buffer = io.BytesIO()
        Image.fromarray(shifted).save(buffer, format="JPEG", quality=quality, subsampling=2)
        decoded = np.asarray(Image.open(buffer).convert("RGB"))[shift:, shift:]
        out[i] = decoded.transpose(2, 0, 1).reshape(-1)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help=f"a data root holding {CIFAR10_DIR}/")
    parser.add_argument("dst", type=Path, help=f"the data root to write {CIFAR10_DIR}/ into")
    parser.add_argument("--quality", type=int, default=50, help="JPEG quality, 1-95 (default 50)")
    parser.add_argument("--shift", type=int, default=1, help="pixels to shift before encoding, 0-7 (default 1)")
    args = parser.parse_args(argv)
    source, target = args.src / CIFAR10_DIR, args.dst / CIFAR10_DIR
    problems = []
    if not all((source / name).is_file() for name in BATCHES + ["batches.meta"]):
        problems.append(f"{source} does not hold the CIFAR-10 batches (data_batch_1..5, test_batch, batches.meta)")
    if target.exists():
        problems.append(f"{target} exists already; remove it or choose another DST_ROOT")
    if not 1 <= args.quality <= 95:
        problems.append(f"--quality must lie in 1..95, got {args.quality}")
    if not 0 <= args.shift <= 7:
        problems.append(f"--shift must lie in 0..7, got {args.shift}")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    args.dst.mkdir(parents=True, exist_ok=True)
    total, count = 0, 0
    with tempfile.TemporaryDirectory(dir=args.dst) as staging:
        staged = Path(staging) / CIFAR10_DIR
        staged.mkdir()
        shutil.copy2(source / "batches.meta", staged / "batches.meta")
        for name in BATCHES:
            record = load_pickle(source / name)
            before = record["data"]  # load_pickle decodes Python 2 keys as latin-1 str, so always "data"
            record["data"] = reencode(before, args.quality, args.shift)
            total += int(np.abs(record["data"].astype(np.int16) - before).sum())
            count += before.size
            with open(staged / name, "wb") as f:
                pickle.dump(record, f, protocol=2)
        os.replace(staged, target)
    print(f"wrote {target}: mean absolute change {total / count:.2f}/255 per pixel "
          f"(JPEG quality {args.quality}, 4:2:0, shift {args.shift})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
