"""MORE's discrepancy on the same training images with BN in eval mode (running statistics, what the
diagnostics log) and with batch statistics (what L_MORE sees in a training step):

    python benchmarks/more_bn_modes.py runs/c10_la_more --batches 8

Loads the run's last training checkpoint (the decomposed model) and, on `--batches` batches of 128
training images drawn by the instance sampler (seed 0, eval transform), prints the mean
||z_full - z_gen||^2 and its prior-weighted mean (L_MORE's form) in both modes. BN running
statistics are left as they were.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from longtail.checkpoint import load_checkpoint
from longtail.config import from_dict, read_yaml
from longtail.engine import setup
from longtail.lowrank import general_only
from longtail.methods.more import bn_stats_frozen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    run = setup(from_dict(read_yaml(args.run / "config.yaml")), args.data_root)
    run.model.load_state_dict(load_checkpoint(args.run / "checkpoint.pt", map_location=run.device)["model"])
    model, split = run.model, run.data.train
    prior = torch.tensor(run.data.class_counts, dtype=torch.float64)
    prior /= prior.sum()
    sums = {"eval": torch.zeros(2, dtype=torch.float64), "batch": torch.zeros(2, dtype=torch.float64)}
    with torch.no_grad():
        for i, (x, y, _) in enumerate(split.batches(128, sampler="instance", seed=0, epoch=0)):
            if i == args.batches:
                break
            x = split.to_input(x, run.device, train=False)
            for mode in sums:
                model.train(mode == "batch")
                with bn_stats_frozen(model):
                    z_full = model(x)
                    with general_only(model):
                        z_gen = model(x)
                d = (z_full - z_gen).pow(2).sum(dim=1).double().cpu()
                sums[mode] += torch.stack([d.mean(), (prior[y] * d).mean()])
    for mode, (mean, weighted) in sums.items():
        print(f"BN {mode:5s}: mean ||z_full - z_gen||^2 {mean / args.batches:.3e}, "
              f"prior-weighted {weighted / args.batches:.3e}")


if __name__ == "__main__":
    main()
