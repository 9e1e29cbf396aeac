"""Does a bfloat16 forward pass resolve MORE's low-rank part? On a finished MORE run's last checkpoint:

    python benchmarks/more_precision.py runs/fm_la_more --images 3000

Loads the decomposed model (checkpoint.pt) and, on the first `--images` test images (eval mode and
transform), computes the full logits z and the general-only logits z_gen once in float32 and once under
bfloat16 autocast, then prints the low-rank part's share of the logits ||z - z_gen|| / ||z|| (float32), the
rounding of the logits ||z_bf16 - z_fp32|| / ||z_fp32||, and how wrong the bfloat16 difference z - z_gen,
what L_MORE is made of, is: ||d_bf16 - d_fp32|| / ||d_fp32||.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from longtail.checkpoint import load_checkpoint
from longtail.config import from_dict, read_yaml
from longtail.engine import setup
from longtail.lowrank import general_only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    run = setup(from_dict(read_yaml(args.run / "config.yaml")), args.data_root)
    run.model.load_state_dict(load_checkpoint(args.run / "checkpoint.pt", map_location=run.device)["model"])
    model, split = run.model.eval(), run.data.test
    logits = {key: [] for key in ("full32", "gen32", "full16", "gen16")}
    seen = 0
    with torch.no_grad():
        for x, _, _ in split.batches(500, sampler=None):
            if seen >= args.images:
                break
            x = split.to_input(x, run.device, train=False)
            seen += len(x)
            for tag, amp in (("32", False), ("16", True)):
                with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=amp):
                    logits["full" + tag].append(model(x).float().cpu())
                    with general_only(model):
                        logits["gen" + tag].append(model(x).float().cpu())
    z = {key: torch.cat(value) for key, value in logits.items()}
    d32, d16 = z["full32"] - z["gen32"], z["full16"] - z["gen16"]
    print(f"{seen} test images of {args.run}")
    print(f"low-rank share of the logits ||z - z_gen|| / ||z||, float32: {d32.norm() / z['full32'].norm():.2e}")
    print(f"bfloat16 rounding of the logits ||z_bf16 - z_fp32|| / ||z_fp32||: "
          f"{(z['full16'] - z['full32']).norm() / z['full32'].norm():.2e}")
    print(f"bfloat16 error of z - z_gen ||d_bf16 - d_fp32|| / ||d_fp32||: {(d16 - d32).norm() / d32.norm():.2f}")


if __name__ == "__main__":
    main()
