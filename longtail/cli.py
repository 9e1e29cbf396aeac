"""The `longtail` command: one plain function per subcommand."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable

from longtail.errors import LongtailError
from longtail.progress import set_quiet


def cmd_train(args: argparse.Namespace) -> None:
    from longtail.config import load_config
    from longtail.engine import fit

    cfg = load_config(args.config, args.overrides)
    out = args.out or str(Path("runs") / Path(args.config).parent.name / Path(args.config).stem)
    fit(cfg, out, resume=args.resume, data_root=args.data_root, download=args.download)


def cmd_eval(args: argparse.Namespace) -> None:
    from longtail.engine import evaluate_run
    from longtail.metrics import format_table

    metrics = evaluate_run(args.run, args.split, args.plots, args.data_root, args.download)
    print(format_table([(f"{args.run} ({args.split})", metrics)]))
    for path in metrics.get("figures", []):
        print(f"wrote {path}")


def cmd_data(args: argparse.Namespace) -> None:
    from longtail.config import load_config
    from longtail.data.describe import describe, format_description, write_indices

    # Bare keys (imbalance=50) belong to the data section.
    overrides = [o if "." in o.split("=", 1)[0] else f"data.{o}" for o in args.overrides]
    if args.name_or_config.endswith((".yaml", ".yml")):
        cfg = load_config(args.name_or_config, overrides)
    else:
        cfg = load_config(None, [f"data.name={args.name_or_config}", *overrides])
    info = describe(cfg.data, args.data_root, args.download)
    if args.indices:
        write_indices(args.indices, info["indices"])
    shown = {k: v for k, v in info.items() if k != "indices"}
    print(json.dumps(shown, indent=2) if args.json else format_description(shown))


def cmd_posthoc(args: argparse.Namespace) -> None:
    from longtail.methods.posthoc import run_posthoc

    run_posthoc(args.run, kind=args.kind, tau=args.tau, data_root=args.data_root)


def cmd_analyze(args: argparse.Namespace) -> None:
    from longtail.analysis import analyze_run

    analyze_run(args.run, data_root=args.data_root)


def cmd_report(args: argparse.Namespace) -> None:
    from longtail.report import plot_report, report

    print(report(args.runs))
    if args.plot:
        print(f"wrote {plot_report(args.runs, args.plot)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtail", description="Long-tailed image recognition: train, evaluate, analyse.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, func: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary)
        p.add_argument("--quiet", action="store_true", help="print only the result: no progress, no per-epoch lines")
        p.set_defaults(func=func)
        return p

    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-root", help="dataset directory (default: data.root, $LONGTAIL_DATA, ~/.cache/longtail-data)")
        p.add_argument("--download", action="store_true", help="fetch the official archive when it is missing")

    p = command("train", "train a config; writes a run directory", cmd_train)
    p.add_argument("config", help="YAML config, e.g. configs/cifar10_lt/ce.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 optim.lr=0.05")
    p.add_argument("--out", help="run directory (default: runs/<dataset>/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    data_options(p)

    p = command("eval", "re-evaluate a run's exported model; writes eval-<split>.json", cmd_eval)
    p.add_argument("run", help="run directory or a model.pt inside one")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--plots", action="store_true", help="also draw per-class accuracy, confusion matrix, reliability")
    data_options(p)

    p = command("data", "show a long-tailed subset: per-class counts, groups, index sha256", cmd_data)
    p.add_argument("name_or_config", help="dataset name (cifar10_lt, cifar100_lt, fashion_mnist_lt, ...) or a config")
    p.add_argument("overrides", nargs="*", help="overrides, e.g. imbalance=50 selection=first")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--indices", help="write the selected original train indices to this file, one per line")
    data_options(p)

    p = command("posthoc", "post-hoc logit adjustment of a finished run, folded into its head", cmd_posthoc)
    p.add_argument("run", help="run directory")
    p.add_argument("--kind", choices=["multiplicative", "additive"], default=None)
    p.add_argument("--tau", type=float, default=None, help="fixed tau (default: search on the validation split)")
    p.add_argument("--data-root")

    p = command("analyze", "FDR, cosine similarities, BN gamma, feature and classifier norms", cmd_analyze)
    p.add_argument("run", help="run directory")
    p.add_argument("--data-root")

    p = command("report", "Markdown table of runs; seeds grouped into mean ± std", cmd_report)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--plot", metavar="FILE", help="also draw the per-class accuracy of every row against class "
                   "size into FILE (a .png; runs on one dataset)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options too (`train CONFIG --out DIR train.epochs=5`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    set_quiet(args.quiet)
    try:
        args.func(args)
    except LongtailError as exc:
        print(f"longtail {args.command}: {'stopped' if getattr(exc, 'exit_code', 2) == 143 else 'error'}: {exc}",
              file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        print(f"longtail {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
