"""Throughput of the list-file pipeline (Pillow decode + train transforms in DataLoader workers) against
resnet50 forward+backward on this machine: which one limits training speed?

    python benchmarks/loader.py [--images 256] [--image-size 224] [--workers 0 1 2] [--model-batch 8] [--threads N]

Writes a temporary folder of JPEGs (ImageNet-like sizes: ~500 x 375, quality 90) and a split file,
times one training pass over it per worker count, then times resnet50 steps at the same resolution.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from longtail.config import DataConfig, ModelConfig
from longtail.data.listfile import Benchmark, build_listfile
from longtail.models import build_model


def write_jpegs(base: Path, count: int, num_classes: int, seed: int = 0) -> None:
    """Smooth colour fields plus noise (natural-image-like JPEG sizes), with the usual range of shapes."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        w, h = int(rng.integers(400, 640)), int(rng.integers(300, 480))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        field = np.stack([np.sin(xx / rng.uniform(20, 80) + c) * np.cos(yy / rng.uniform(20, 80)) for c in range(3)], -1)
        pixels = np.clip(127 + 100 * field + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        rel = f"train/c{i % num_classes}/{i:05d}.JPEG"
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(base / rel, quality=90)
        lines.append(f"{rel} {i % num_classes}\n")
    (base / "train.txt").write_text("".join(lines))
    (base / "test.txt").write_text("".join(lines[:num_classes]))


def pipeline_rate(root: Path, count: int, num_classes: int, image_size: int, batch: int, workers: int) -> float:
    """Images/s of one training pass (decode, random-resized crop, flip, jitter, normalise, collate)."""
    bench = Benchmark("bench", "bench", num_classes, {"train": ("train.txt", count), "test": ("test.txt", num_classes)})
    cfg = DataConfig(name="bench", profile="none", image_size=image_size, num_workers=workers)
    split = build_listfile(cfg, root, bench).train
    start = time.perf_counter()
    seen = sum(len(y) for _, y, _ in split.batches(batch, sampler="instance", seed=0, epoch=0))
    return seen / (time.perf_counter() - start)


def model_rate(image_size: int, batch: int, steps: int, device: torch.device) -> float:
    """Images/s of resnet50 forward + backward + SGD step on random input (one warm-up step not timed)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet50"), 1000, 3, image_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    for step in range(steps + 1):
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32, help="loader batch size")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model-batch", type=int, default=8)
    parser.add_argument("--model-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"machine: {os.cpu_count()} CPU cores (load average {load}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads, cuda {'yes' if torch.cuda.is_available() else 'no'}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_jpegs(root / "bench", args.images, args.classes)
        size_mb = sum(p.stat().st_size for p in (root / "bench").rglob("*.JPEG")) / 2**20
        print(f"wrote {args.images} JPEGs ({size_mb / args.images * 1024:.0f} KiB each on average) "
              f"in {time.perf_counter() - start:.1f}s")
        rates = {}
        for workers in args.workers:
            rates[workers] = pipeline_rate(root, args.images, args.classes, args.image_size, args.batch, workers)
            print(f"pipeline  num_workers={workers}: {rates[workers]:7.1f} images/s "
                  f"(decode + train transforms at {args.image_size}px, batch {args.batch})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_rate(args.image_size, args.model_batch, args.model_steps, device)
    print(f"resnet50  forward+backward: {model:7.1f} images/s (batch {args.model_batch}, {args.image_size}px, {device})")
    best_workers = max(rates, key=rates.get)
    best = rates[best_workers]
    if best >= model:
        verdict = (f"the model is the bottleneck: the pipeline ({best:.0f} images/s with num_workers={best_workers}) "
                   f"outpaces resnet50 ({model:.0f} images/s)")
    else:
        verdict = (f"the pipeline is the bottleneck: {best:.0f} images/s at best (num_workers={best_workers}) "
                   f"vs resnet50 {model:.0f} images/s")
    print(verdict)
    print("note: workers and the model share the same CPU cores here, so running both at once is slower than either")


if __name__ == "__main__":
    main()
