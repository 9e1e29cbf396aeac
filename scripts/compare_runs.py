"""Train the same tiny runs with the code of two checkouts and compare them bit for bit.

    python scripts/compare_runs.py OLD_CHECKOUT NEW_CHECKOUT [--threads 1]

A refactor must not change what a run computes: on one machine, with the same thread count, each run's
model.pt tensors and metrics.jsonl (timings aside) and results.json (timings, environment and the paths
that name the checkout aside) must be identical. Each checkout trains in its own process with
PYTHONPATH=<checkout>, on tiny fake Fashion-MNIST written by this checkout's tests/fake_data.py.
Exit 0 when every run is identical, 1 otherwise (the differences are printed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]
TINY = ["data.name=fashion_mnist_lt", "data.imbalance=5", "data.batch_size=16", "model.name=mlp", "model.width=32",
        "train.epochs=3", "optim.lr=0.05", "eval.batch_size=64", "train.log_every=2"]
VAL = ["data.val_per_class=2"]
# name -> overrides; `{run:NAME}` is the directory of an earlier run (second stages start from its model.pt).
RUNS = {
    "erm": [*TINY, "data.augment=crop_flip", "schedule.name=cosine", "train.checkpoint_every=5"],
    "more_la_posthoc": [*TINY, *VAL, "loss.name=la", "more.enabled=true", "train.track_every=1",
                        "posthoc.kind=additive", "posthoc.calibrate=temperature", "eval.select=best_val",
                        "data.mixup_alpha=0.2"],
    "ewb": [*TINY, "method.name=ewb", "model.head=etf", "optim.weight_decay=5e-3"],
    # DRW switching mid-run under gradient accumulation, and the re-weighting samplers
    "ldam_drw_sqrt": [*TINY, "loss.name=ldam", "loss.drw_start=0.5", "model.head=cosine", "data.sampler=sqrt",
                      "train.accum_steps=2"],
    "focal_drw_balanced": [*TINY, "loss.name=focal", "loss.drw_start=2", "data.sampler=class_balanced"],
    "wb_stage2": [*TINY, "method.name=wb_stage2", "method.init_from={run:erm}/model.pt", "train.epochs=2"],
    "crt": [*TINY, "method.name=crt", "method.init_from={run:erm}/model.pt", "train.epochs=2"],
    "lws": [*TINY, "method.name=lws", "method.init_from={run:erm}/model.pt", "train.epochs=2"],
    "tau_norm": [*TINY, "method.name=tau_norm", "method.tau_norm_tau=1.0", "method.init_from={run:erm}/model.pt"],
}
TIMINGS = {"images_per_sec", "epoch_seconds"}
RESULTS_ASIDE = {"environment", "segments"}
TRAIN = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from longtail.config import load_config
from longtail.engine import fit
fit(load_config(None, sys.argv[4:]), sys.argv[2], data_root=sys.argv[3])
"""


def train(checkout: Path, out: Path, root: Path, overrides: list[str], threads: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": str(threads), "LONGTAIL_QUIET": "1"}
    done = subprocess.run([sys.executable, "-c", TRAIN, str(threads), str(out), str(root), *overrides], env=env,
                          cwd=checkout, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: training {out.name} failed:\n{done.stderr[-3000:]}")


def differences(a: Path, b: Path) -> list[str]:
    found = []
    ta, tb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    if ta.keys() != tb.keys():
        found.append(f"model.pt keys differ: {sorted(set(ta) ^ set(tb))}")
    found += [f"model.pt[{k}] differs" for k in ta.keys() & tb.keys()
              if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not torch.equal(ta[k], tb[k])]
    records = [[{k: v for k, v in json.loads(line).items() if k not in TIMINGS}  # none when nothing trains
                for line in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists()
               else [] for run in (a, b)]
    found += [f"metrics.jsonl epoch {ra.get('epoch')}: {ra} != {rb}"
              for ra, rb in zip(*records) if ra != rb]
    if len(records[0]) != len(records[1]):
        found.append(f"metrics.jsonl has {len(records[0])} vs {len(records[1])} records")
    results = [{k: v for k, v in json.loads((run / "results.json").read_text()).items() if k not in RESULTS_ASIDE}
               for run in (a, b)]
    for key in results[0].keys() | results[1].keys():
        if key == "config":  # method.init_from names the checkout's own run directory
            continue
        if results[0].get(key) != results[1].get(key):
            found.append(f"results.json[{key}]: {results[0].get(key)!r} != {results[1].get(key)!r}")
    ya, yb = ((run / "model.yaml").read_text() for run in (a, b))
    if ya != yb:
        found.append("model.yaml differs")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE / "tests"))
    from fake_data import write_fashion_mnist

    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_fashion_mnist(root, train_per_class=40, test_per_class=10)
        for name, overrides in RUNS.items():
            dirs = {}
            for side, checkout in (("old", args.old), ("new", args.new)):
                dirs[side] = Path(tmp) / side / name
                resolved = [o.replace("{run:", str(Path(tmp) / side) + "/{").format(**{n: n for n in RUNS})
                            for o in overrides]
                train(checkout.resolve(), dirs[side], root, resolved, args.threads)
            found = differences(dirs["old"], dirs["new"])
            failed |= bool(found)
            print(f"{name}: " + ("identical" if not found else "DIFFERENT\n  " + "\n  ".join(found[:20])))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
