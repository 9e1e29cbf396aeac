"""The `longtail` command: one plain function per subcommand."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

import longtail
from longtail.errors import ArgumentError, ConfigError, LongtailError
from longtail.progress import set_quiet


RECIPE = "a YAML config file or a shipped recipe's name (longtail configs lists them), e.g. cifar10_lt/ce"
SETTINGS = ("Every setting is a section.key: `longtail config RECIPE` prints a recipe's, `--diff` what it changes; "
            "docs/config.md lists them all with their defaults and allowed values.")

# bfloat16 autocast (float32's range: no loss scaling) with NHWC convolutions, for training and evaluation: the
# fastest setting that keeps float32's accuracy on a CPU with native bfloat16 (AMX, AVX512-BF16) and on a recent
# GPU (docs/cli.md#speed).
FAST = ["train.amp=true", "train.amp_dtype=bfloat16", "train.channels_last=true", "eval.amp=true"]


def finite(text: str) -> float:
    """argparse type: a finite number (float() also takes nan and inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def non_negative(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def given(text: str) -> str:
    """argparse type: a non-empty value; an empty path or list would silently mean the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a value, got an empty string")
    return text


def refuse_to_replace(path: str | None, flag: str, overwrite: bool) -> None:
    """A file the user names as output replaces an existing one only when asked to (before anything is written)."""
    if path and Path(path).exists() and not Path(path).is_dir() and not overwrite:
        raise ConfigError(f"{flag} {path} already exists; pass --overwrite to replace it, or name another file")


def cmd_train(args: argparse.Namespace) -> None:
    from longtail.config import find_recipe, load_config
    from longtail.methods import check_config
    from longtail.training.fit import fit

    # --fast comes first so an explicit override still wins; the saved config.yaml names each key it set.
    cfg = load_config(args.config, [*(FAST if args.fast else []), *args.overrides])
    check_config(cfg)  # the method's own rules too, before --download-weights fetches anything
    recipe = find_recipe(args.config)  # a shipped recipe's name gives the same runs/<dataset>/<config> as its file
    out = args.out or str(Path("runs") / recipe.parent.name / recipe.stem)
    if args.download_weights and cfg.model.pretrained is not None:
        from longtail.models.hf import HF_MODELS, download_weights

        if cfg.model.name in HF_MODELS:  # into the hub cache, where model.pretrained then resolves offline
            download_weights(cfg.model.pretrained)
    fit(cfg, out, resume=args.resume, data_root=args.data_root, download=args.download)


def cmd_configs(args: argparse.Namespace) -> None:
    from longtail.config.recipes import list_recipes, recipes_dir

    found = list_recipes(args.pattern)
    if not found:
        raise LongtailError(f"configs: no recipe matches {args.pattern!r} (in {recipes_dir()})")
    width = max(len(name) for name, _ in found)
    for name, description in found:
        print(f"{name:<{width}}  {description}")


def cmd_config(args: argparse.Namespace) -> None:
    import yaml

    from longtail.config import Config, load_config
    from longtail.methods import check_config

    cfg = load_config(args.config, args.overrides)
    check_config(cfg)  # refused here as `train` would refuse it
    resolved = cfg.to_dict()
    if args.diff:
        defaults = Config().to_dict()
        resolved = {section: changed for section, values in resolved.items()
                    if (changed := {k: v for k, v in values.items() if v != defaults[section][k]})}
    print(yaml.safe_dump(resolved, sort_keys=False), end="")


def cmd_models(args: argparse.Namespace) -> None:
    import typing

    from longtail.config import ModelConfig
    from longtail.models import MODELS, CosineHead, ETFHead, LinearHead

    def one_line(obj: object) -> str:
        return " ".join((obj.__doc__ or "").split())

    print("backbones (model.name):")
    width = max(len(name) for name in MODELS)
    for name in sorted(MODELS):
        print(f"  {name:<{width}}  {one_line(MODELS[name])}")
    print("  or your own: model.name=package.module:factory (docs/extending.md)")
    print("heads (model.head):")
    heads = {"linear": LinearHead, "cosine": CosineHead, "etf": ETFHead}
    for name in typing.get_args(typing.get_type_hints(ModelConfig)["head"]):
        print(f"  {name:<{width}}  {one_line(heads[name])}")


def cmd_eval(args: argparse.Namespace) -> None:
    from longtail.rundir import evaluate_run
    from longtail.metrics import format_table
    from longtail.task import get_task

    metrics = evaluate_run(args.run, args.split, args.plots, args.data_root, args.download)
    print(format_table([(f"{args.run} ({args.split})", metrics)], get_task(metrics["task"]).columns))
    for path in metrics.get("figures", []):
        print(f"wrote {path}")


def cmd_data(args: argparse.Namespace) -> None:
    from longtail.config import load_config
    from longtail.data import build_data
    from longtail.data.check import check_images, format_check
    from longtail.data.describe import format_description, summarize, write_indices

    # Bare keys (imbalance=50) belong to the data section.
    overrides = [o if "." in o.split("=", 1)[0] else f"data.{o}" for o in args.overrides]
    if args.name_or_config.endswith((".yaml", ".yml")):
        cfg = load_config(args.name_or_config, overrides)
    else:
        cfg = load_config(None, [f"data.name={args.name_or_config}", *overrides])
    refuse_to_replace(args.indices, "--indices", args.overwrite)
    data = build_data(cfg.data, args.data_root, args.download)
    info = summarize(data, cfg.data)
    if args.indices:
        write_indices(args.indices, info["indices"])
    shown = {k: v for k, v in info.items() if k != "indices"}
    check = check_images(data, cfg.data.num_workers) if args.check else None
    if args.json:
        print(json.dumps({**shown, **({"check": check} if check else {})}, indent=2))
    else:
        print(format_description(shown) + (f"\n\n{format_check(check)}" if check else ""))
    if check and check["unreadable"]:
        raise ConfigError(f"{len(check['unreadable'])} image file(s) cannot be read (listed above): replace or remove "
                          "them (from the split file, for a list-file dataset), or set data.on_bad_sample=skip to have "
                          "training skip them")


def cmd_posthoc(args: argparse.Namespace) -> None:
    from longtail.methods.posthoc import run_posthoc

    run_posthoc(args.run, kind=args.kind, tau=args.tau, data_root=args.data_root, overwrite=args.overwrite)


def cmd_analyze(args: argparse.Namespace) -> None:
    from longtail.analysis import analyze_run

    analyze_run(args.run, data_root=args.data_root)


def cmd_predict(args: argparse.Namespace) -> None:
    from longtail.predict import Predictor, format_prediction, image_paths

    paths = image_paths(args.inputs)
    try:
        predictor = Predictor(args.model, args.prior, args.threshold)
        records = predictor.predict(paths, args.topk, skip_bad=True)
    except ArgumentError as exc:  # the Predictor names its Python arguments; here they are flags
        raise exc.as_flag() from None
    if not args.skip_bad:  # every image read (once) before any prediction is printed: no partial output taken as whole
        records = list(records)
        bad = [record["error"] for record in records if "error" in record]
        if bad:
            more = f" (and {len(bad) - 1} more of the {len(paths)} images)" if len(bad) > 1 else ""
            raise ConfigError(f"{bad[0]}{more}; nothing was predicted: pass --skip-bad to predict the other images "
                              "and list the unreadable ones on stderr")
    print(predictor.note, file=sys.stderr)  # on stderr, so that stdout holds only the predictions
    skipped = 0
    for record in records:
        if "error" in record:
            skipped += 1
            print(f"skipped: {record['error']}", file=sys.stderr)
        else:
            print(json.dumps(record) if args.json else format_prediction(record))
    if skipped:
        print(f"--skip-bad: skipped {skipped} of {len(paths)} images", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    from longtail.export import export

    print(f"wrote {export(args.run, args.format, overwrite=args.overwrite)}")


def cmd_report(args: argparse.Namespace) -> None:
    from longtail.report import plot_report, report, report_csv

    refuse_to_replace(args.html, "--html", args.overwrite)
    refuse_to_replace(args.plot, "--plot", args.overwrite)
    if args.html:
        from longtail.checkpoint import atomic_write_text
        from longtail.report_html import report_html

        atomic_write_text(args.html, report_html(args.runs, baseline=args.baseline))
    if args.csv:
        sys.stdout.write(report_csv(args.runs, baseline=args.baseline))
    else:
        print(report(args.runs, baseline=args.baseline, show_env=args.show_env))
    if args.html:
        print(f"wrote {args.html}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot_report(args.runs, args.plot)}", file=sys.stderr if args.csv else sys.stdout)


def slurm_options(args: argparse.Namespace) -> dict | None:
    if not args.slurm:
        return None
    return {"partition": args.partition, "time": args.time, "gpus": args.gpus, "cpus": args.cpus}


def cmd_sweep(args: argparse.Namespace) -> None:
    from longtail.sweep import parse_grid, parse_seeds, sweep

    seeds = parse_seeds(args.seeds) if args.seeds is not None else None  # '' is refused, not read as no --seeds
    sweep(args.config, args.overrides, parse_grid(args.grid), seeds, args.out, jobs=args.jobs,
          slurm=slurm_options(args), data_root=args.data_root, download=args.download, baseline=args.baseline)


def cmd_reproduce(args: argparse.Namespace) -> None:
    from longtail.reproduce import list_tables, reproduce, show_recorded
    from longtail.sweep import parse_seeds

    if args.list:
        if args.table:
            raise ConfigError(f"--list lists every table; leave out the table name ({args.table}), or --list")
        print(list_tables())
        return
    if not args.table:
        raise LongtailError("reproduce: name a TABLE (longtail reproduce --list shows them)")
    if args.from_dir:
        ignored = [flag for flag, value in (("--out", args.out), ("--seeds", args.seeds)) if value is not None]
        if ignored:
            raise ConfigError(f"--from shows runs that exist and runs nothing, so {' and '.join(ignored)} would do "
                              "nothing; leave them out, or --from")
        show_recorded(args.table, args.from_dir)
        return
    reproduce(args.table, budget=args.budget, out=args.out, jobs=args.jobs, slurm=slurm_options(args),
              data_root=args.data_root, download=args.download,
              seeds=parse_seeds(args.seeds) if args.seeds is not None else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtail", description="Long-tailed image recognition: train, evaluate, analyse.")
    parser.add_argument("--version", action="version", version=f"longtail {longtail.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, func: Callable[[argparse.Namespace], None],
                epilog: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, epilog=epilog)
        p.add_argument("--quiet", action="store_true", help="print only the result: no progress, no per-epoch lines")
        p.set_defaults(func=func)
        return p

    def data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-root", type=given,
                       help="dataset directory (default: data.root, $LONGTAIL_DATA, ~/.cache/longtail-data)")
        p.add_argument("--download", action="store_true", help="fetch the official archive when it is missing")

    p = command("train", "train a config; writes a run directory", cmd_train, epilog=SETTINGS)
    p.add_argument("config", help=RECIPE)
    p.add_argument("overrides", nargs="*", default=[],
                   help="dotted overrides without dashes, e.g. train.epochs=5 optim.lr=0.05")
    p.add_argument("--out", type=given, help="run directory (default: runs/<dataset>/<config name>, the folder the "
                   "two-stage recipes' method.init_from names)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    p.add_argument("--fast", action="store_true", help="train and evaluate in bfloat16 autocast with channels_last (" +
                   " ".join(FAST) + "): about 2.4x faster training on a CPU with AMX (docs/cli.md#speed)")
    p.add_argument("--download-weights", action="store_true",
                   help="hf_clip / hf_vit: fetch model.pretrained (a hub id) into the Hugging Face cache first")
    data_options(p)

    p = command("configs", "list the shipped recipes, with what each trains", cmd_configs)
    p.add_argument("pattern", nargs="?", help="a word or glob the name must match, e.g. cifar10_lt or '*/ldam*'")

    p = command("config", "print a recipe's resolved settings as YAML (a dry run: nothing trains)", cmd_config,
                epilog=SETTINGS)
    p.add_argument("config", nargs="?", help=RECIPE + " (default: the defaults alone)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.epochs=5")
    p.add_argument("--diff", action="store_true", help="only the settings that differ from the defaults")

    p = command("models", "list the backbones (model.name) and heads (model.head)", cmd_models)

    p = command("eval", "re-evaluate a run's exported model; writes eval-<split>.json", cmd_eval)
    p.add_argument("run", help="run directory or a model.pt inside one")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--plots", action="store_true", help="also draw per-class accuracy, confusion matrix, reliability")
    data_options(p)

    p = command("predict", "top-k class names with probabilities for image files, from an exported model", cmd_predict)
    p.add_argument("model", help="run directory or a model.pt beside its model.yaml")
    p.add_argument("inputs", nargs="+", help="image files, folders of images, list files (.txt, one path per line)")
    p.add_argument("--topk", type=int, default=None, help="classes shown per image (default 5, or every class of a "
                   "model with fewer)")
    p.add_argument("--prior", default=None,
                   help="deployment class prior: uniform (default), train, or a file of one probability or count per "
                        "line in class-id order (single-label models)")
    p.add_argument("--threshold", type=finite, default=None,
                   help="multi-label models: the sigmoid score from which a class is predicted (default 0.5)")
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of text")
    p.add_argument("--skip-bad", action="store_true", help="an image that cannot be read (or is not the model's "
                   "size) is named on stderr and skipped, the others predicted (default: refused before any is)")

    p = command("export", "write a run's exported model as safetensors, ONNX or a torch.export program", cmd_export)
    p.add_argument("run", help="run directory or a model.pt beside its model.yaml")
    p.add_argument("--format", required=True, choices=["safetensors", "onnx", "torch_export"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing file of that format")

    p = command("data", "show a long-tailed subset: per-class counts, groups, index sha256", cmd_data)
    p.add_argument("name_or_config", help="dataset name (cifar10_lt, cifar100_lt, fashion_mnist_lt, ...) or a config")
    p.add_argument("overrides", nargs="*", default=[], help="overrides, e.g. imbalance=50 selection=first")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--indices", type=given, help="write the selected original train indices to this file, one per "
                   "line")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --indices file")
    p.add_argument("--check", action="store_true", help="also decode every image file of the splits once and list "
                   "the unreadable ones (exit 2 when there are any); data.num_workers=N decodes in N processes")
    data_options(p)

    p = command("posthoc", "post-hoc logit adjustment of a finished run, folded into its head", cmd_posthoc)
    p.add_argument("run", help="run directory")
    p.add_argument("--kind", choices=["multiplicative", "additive"], default=None)
    p.add_argument("--tau", type=non_negative, default=None,
                   help="fixed tau, >= 0 (default: search on the validation split)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing posthoc-<kind>/ result")
    p.add_argument("--data-root", type=given)

    p = command("analyze", "FDR, cosine similarities, BN gamma, feature and classifier norms", cmd_analyze)
    p.add_argument("run", help="run directory")
    p.add_argument("--data-root", type=given)

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--jobs", type=int, default=1, help="runs at a time on this machine; the cores (and GPUs) "
                       "are split between them")
        p.add_argument("--slurm", action="store_true", help="submit the runs as a SLURM job array (submitit)")
        p.add_argument("--partition", help="--slurm: the partition")
        p.add_argument("--time", type=int, default=60, help="--slurm: time limit per job, minutes (default 60)")
        p.add_argument("--gpus", type=int, default=0, help="--slurm: GPUs per job, one process each (default 0)")
        p.add_argument("--cpus", type=int, default=4, help="--slurm: CPU cores per process (default 4)")

    p = command("report", "Markdown table of runs; seeds grouped into mean ± std", cmd_report)
    p.add_argument("runs", nargs="+", metavar="DIR", help="run directories, or folders of them (a sweep's --out): "
                   "every finished run beneath, as tensorboard --logdir finds them")
    p.add_argument("--baseline", help="a run directory or sweep point name (loss.name=ce): paired differences "
                   "against its row over shared seeds")
    p.add_argument("--csv", action="store_true", help="print CSV instead of Markdown")
    p.add_argument("--html", metavar="FILE", type=given, help="also write a self-contained HTML page with per-class "
                   "plots")
    p.add_argument("--show-env", action="store_true", help="add commit, torch version, device, world size")
    p.add_argument("--plot", metavar="FILE", type=given, help="also draw the per-class accuracy of every row against "
                   "class size into FILE (a .png; runs on one dataset)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --html or --plot file")

    p = command("sweep", "a config over a grid of settings and seeds, one run directory each", cmd_sweep)
    p.add_argument("config", help="YAML config")
    p.add_argument("overrides", nargs="*", default=[], help="overrides for every run, e.g. train.epochs=50")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2,...]",
                   help="a key and its values as a YAML flow list; repeat for a product of grids")
    p.add_argument("--seeds", help="train.seed values, e.g. 0,1,2 (default: the config's seed)")
    p.add_argument("--out", type=given, required=True, help="the sweep directory: one run directory per point inside")
    p.add_argument("--baseline", help="the report's baseline: a point name without its seed, e.g. loss.name=ce")
    run_options(p)
    data_options(p)

    p = command("reproduce", "run a paper table (configs/tables/) and show it beside the paper's numbers", cmd_reproduce)
    p.add_argument("table", nargs="?", help="a table name (longtail reproduce --list) or a table YAML file")
    p.add_argument("--list", action="store_true", help="list the tables")
    p.add_argument("--budget", choices=["smoke", "short", "full"], default="full",
                   help="full: the configs as they are; short: a tenth of the epochs; smoke: 1 epoch of a tiny model")
    p.add_argument("--seeds", help="train.seed values (default: the table's)")
    p.add_argument("--out", type=given, help="directory of the runs (default: runs/reproduce/<table>-<budget>)")
    p.add_argument("--from", dest="from_dir", metavar="DIR", type=given,
                   help="run nothing: show the finished runs under DIR (e.g. docs/evidence) beside the paper's numbers")
    run_options(p)
    data_options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options too (`train CONFIG --out DIR train.epochs=5`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        dashed = [item for item in extra if item.startswith("-") and "." in item.split("=", 1)[0]]
        if dashed:
            parser.error(f"unrecognized arguments: {' '.join(extra)}; overrides take no dashes: write "
                         f"{dashed[0].lstrip('-')}")
        if not hasattr(args, "overrides") or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    set_quiet(args.quiet)
    try:
        args.func(args)
    except LongtailError as exc:
        print(f"longtail {args.command}: {'stopped' if getattr(exc, 'exit_code', 2) in (130, 143) else 'error'}: {exc}",
              file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        print(f"longtail {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # `python -m longtail.cli` as well as `python -m longtail`
    sys.exit(main())
