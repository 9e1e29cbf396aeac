"""Does evaluating in bfloat16 (`eval.amp`, part of `--fast`) change a finished run's numbers? Each run's exported
model is scored on its test split twice, float32 and bfloat16 autocast with channels-last batches, through the
engine's own scoring (`score_model`, what `fit` records and `longtail eval` reports), and the two are printed side
by side with how many test predictions changed.

    python benchmarks/eval_parity.py RUN_DIR [RUN_DIR ...] [--data-root DIR] [--json FILE]

A measurement, not a test: the differences are what rounding the logits to bfloat16's 8 bits of mantissa does
to the argmax and the calibration of these models on this CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from longtail.engine import load_run, score_model, select_device
from longtail.progress import set_quiet
from longtail.provenance import cpu_model, native_bf16
from longtail.task import task_of

KEYS = ("top1", "many", "medium", "few", "ece")


def parity(run_dir: str, data_root: str | None) -> dict:
    run = load_run(run_dir, data_root)
    if task_of(run.data).multilabel:
        sys.exit(f"{run_dir}: a multi-label run; this script compares single-label accuracies and predictions")
    device = select_device(run.cfg.train.device)
    model = run.model.to(device)
    row: dict = {"run": run_dir}
    predictions = {}
    for name, amp in (("float32", False), ("bfloat16", True)):
        run.cfg.eval.amp, run.cfg.train.amp_dtype, run.cfg.train.channels_last = amp, "bfloat16", amp
        metrics, logits, _ = score_model(model, run.spec, run.cfg, run.data, "test", device)
        row[name] = {k: metrics.get(k) for k in KEYS}
        predictions[name] = logits.argmax(1)
    row["changed_predictions"] = int((predictions["float32"] != predictions["bfloat16"]).sum())
    row["test_images"] = len(predictions["float32"])
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run directories (with model.pt and config.yaml)")
    parser.add_argument("--data-root", help="data folder (default: $LONGTAIL_DATA)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    set_quiet(True)
    rows = [parity(run, args.data_root) for run in args.runs]
    print(f"CPU: {cpu_model()}; native bfloat16: {native_bf16() or 'none (bfloat16 is emulated)'}; "
          f"torch {torch.__version__}; threads {torch.get_num_threads()}\n")
    print("| Run | float32 All / Many / Med / Few, ECE | bfloat16 All / Many / Med / Few, ECE | Δ All | "
          "changed predictions |")
    print("|---|---|---|---|---|")

    def cells(m: dict) -> str:
        groups = " / ".join("—" if m[k] is None else f"{m[k]:.2f}" for k in KEYS[:4])
        return f"{groups}, {m['ece']:.2f}"

    for row in rows:
        delta = row["bfloat16"]["top1"] - row["float32"]["top1"]
        print(f"| {row['run']} | {cells(row['float32'])} | {cells(row['bfloat16'])} | {delta:+.2f} | "
              f"{row['changed_predictions']} of {row['test_images']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    main()
