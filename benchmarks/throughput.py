"""Training and evaluation images/s of the tool against the bare model step, measured side by side.

    python benchmarks/throughput.py [--epochs-equivalent 1] [--repeats 2] [k=v ...]

Real CIFAR-10-LT (IF 100) from $LONGTAIL_DATA with ResNet-32 by default. "tool" is the engine's
`train_one_epoch` (sampler, on-device augmentation, method hook, scheduler, logging) and `collect_logits`;
"bare" is forward/backward/step (or forward) on tensors already in memory and normalised. Runs alternate,
so machine noise hits both; the overhead is the ratio of the medians. Target: under 5 % on CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from longtail.config import load_config
from longtail.engine import build_optimizer, collect_logits, lr_factor, setup, train_one_epoch


def bare_train(model, method, optimizer, xs, ys) -> float:
    model.train()
    start = time.perf_counter()
    for x, y in zip(xs, ys):
        loss = method.base_loss(model(x), y, 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return sum(len(y) for y in ys) / (time.perf_counter() - start)


@torch.no_grad()
def bare_eval(model, xs) -> float:
    model.eval()
    start = time.perf_counter()
    for x in xs:
        model(x)
    return sum(len(x) for x in xs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).parents[1] / "configs/cifar10_lt/ce.yaml"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, ["train.epochs=1", "train.log_every=1000000", *args.overrides])
    run = setup(cfg)
    model, method, device, data = run.model, run.method, run.device, run.data
    optimizer = build_optimizer(cfg, method.param_groups(model))
    steps = run.info.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    # The bare step sees the same number of batches of the same size, already normalised on the device.
    batches = list(data.train.batches(cfg.data.batch_size, sampler="instance", seed=0, epoch=0))
    xs = [data.train.to_input(x, device, train=False, generator=None) for x, _, _ in batches]
    ys = [y.to(device) for _, y, _ in batches]
    eval_batches = list(data.test.batches(cfg.eval.batch_size, sampler=None, seed=0, epoch=0))
    eval_xs = [data.test.to_input(x, device, train=False, generator=None) for x, _, _ in eval_batches]

    rates: dict[str, list[float]] = {"tool train": [], "bare train": [], "tool eval": [], "bare eval": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            stats = train_one_epoch(model, method, data.train, optimizer, scheduler, scaler, 0, cfg, device, None,
                                    Path(tmp) / "checkpoint.pt")
            rates["tool train"].append(stats["images_per_sec"])
            rates["bare train"].append(bare_train(model, method, optimizer, xs, ys))
            start = time.perf_counter()
            collect_logits(model, data.test, device, cfg.eval.batch_size)
            rates["tool eval"].append(len(data.test) / (time.perf_counter() - start))
            rates["bare eval"].append(bare_eval(model, eval_xs))
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rates.items()), flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{cfg.model.name} on {data.name} ({len(data.train)} train / {len(data.test)} test images), "
          f"batch {cfg.data.batch_size}, device {device}, torch threads {torch.get_num_threads()}")
    print("| phase | tool img/s | bare img/s | overhead |")
    print("|---|---|---|---|")
    for phase in ("train", "eval"):
        tool, bare = med[f"tool {phase}"], med[f"bare {phase}"]
        print(f"| {phase} | {tool:.0f} | {bare:.0f} | {100 * (bare / tool - 1):+.1f} % |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
