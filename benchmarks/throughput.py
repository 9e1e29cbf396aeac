"""Training and evaluation images/s of the tool against the bare model step, measured side by side.

    python benchmarks/throughput.py [--rounds 8] [--batches 6] [k=v ...]

Real CIFAR-10-LT (IF 100) from $LONGTAIL_DATA with ResNet-32 by default. "tool" is the engine's
`train_one_epoch` (sampler, on-device augmentation, method hook, scheduler, logging) and `collect_logits`;
"bare" is forward/backward/step (or forward) on the same batches already in memory and normalised. The
two alternate in short rounds of a few batches each, so the noise of a shared machine hits both alike;
the overhead is the median of the per-round ratios. Target: under 5 % on CPU.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from longtail.config import load_config
from longtail.engine import build_loop, collect_logits, setup, train_one_epoch


class FirstBatches:
    """The first `n` batches of a split's epoch: a round of the tool's own loops, unchanged otherwise."""

    def __init__(self, split, n: int):
        self.split, self.n = split, n

    def num_batches(self, *args, **kwargs) -> int:
        return self.n

    def batches(self, *args, **kwargs):
        return itertools.islice(self.split.batches(*args, **kwargs), self.n)

    def to_input(self, *args, **kwargs):
        return self.split.to_input(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.split)


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
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="batches per round and side")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, ["train.epochs=1", "train.log_every=1000000", *args.overrides])
    run = setup(cfg)
    model, method, device, data = run.model, run.method, run.device, run.data
    train = FirstBatches(data.train, args.batches)
    test = FirstBatches(data.test, args.batches)

    # The bare step sees the same batches, already normalised on the device.
    batches = list(train.batches(cfg.data.batch_size, sampler="instance", seed=cfg.train.seed, epoch=0))
    xs = [data.train.to_input(x, device, train=False, generator=None) for x, _, _ in batches]
    ys = [y.to(device) for _, y, _ in batches]
    eval_xs = [data.test.to_input(x, device, train=False, generator=None)
               for x, _, _ in test.batches(cfg.eval.batch_size, sampler=None)]
    eval_images = sum(len(x) for x in eval_xs)

    rates: dict[str, list[float]] = {"tool train": [], "bare train": [], "tool eval": [], "bare eval": []}
    with tempfile.TemporaryDirectory() as tmp:
        loop = build_loop(run, Path(tmp))
        for r in range(args.rounds):
            stats = train_one_epoch(loop, train, 0)
            rates["tool train"].append(stats["images_per_sec"])
            rates["bare train"].append(bare_train(model, method, loop.optimizer, xs, ys))
            start = time.perf_counter()
            collect_logits(model, test, device, cfg.eval.batch_size)
            rates["tool eval"].append(eval_images / (time.perf_counter() - start))
            rates["bare eval"].append(bare_eval(model, eval_xs))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in rates.items()), flush=True)

    print(f"\n{cfg.model.name} on {data.name} (batches of {cfg.data.batch_size} from {len(data.train)} train images, "
          f"{cfg.eval.batch_size} from {len(data.test)} test images), {args.rounds} rounds of {args.batches} batches, "
          f"device {device}, torch threads {torch.get_num_threads()}")
    print("| phase | tool img/s (median) | bare img/s (median) | overhead (median of per-round bare/tool - 1) |")
    print("|---|---|---|---|")
    for phase in ("train", "eval"):
        tool, bare = rates[f"tool {phase}"], rates[f"bare {phase}"]
        overhead = statistics.median(b / t - 1 for t, b in zip(tool, bare))
        print(f"| {phase} | {statistics.median(tool):.0f} | {statistics.median(bare):.0f} | {100 * overhead:+.1f} % |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
