"""`longtail reproduce TABLE`: a paper's table, run through the sweep machinery, beside its numbers.

A table is a YAML file under configs/tables/: `title`, `seeds`, and `rows`, each with an `id`, a
`config` (relative to configs/), `overrides`, optionally `init_from` (the id of the row whose run of
the same seed a two-stage row starts from), and `paper`: the published numbers (`all`, `many`,
`medium`, `few`; null where the source gives none), the `metric` as the paper states it (accuracy
or error, in %; rendered as accuracy, an error as 100 - error, marked so), the `source` (paper, table, column, and where the number was taken from) and the
paper's `selection` rule. A row whose number is not known says so (`all: null`); no number is filled in.

Budgets: `full` runs the configs as they are; `short` trains a tenth of the epochs (at least 1) and
says so in the rendered table; `smoke` checks the pipeline in seconds: one seed, one epoch, the
BN-MLP (width 128, so an ETF head fits 100 classes) instead of the CNN, no augmentation, no pretrained
weights. Only `full` numbers are comparable to the paper's.

`--from DIR` (`recorded`) runs nothing: it shows the finished runs under DIR (directories holding
config.yaml and results.json, with metrics.jsonl) beside the paper's numbers, matched to the rows by
what they trained (`MATCH_KEYS`), not by folder name, so runs made with other speed or path settings
still count.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


from longtail.config import flatten, flatten_saved, load_config, read_yaml
from longtail.config.recipes import recipes_dir
from longtail.errors import ConfigError
from longtail.methods import check_config
from longtail.sweep import Point, raise_failures, run_points

BUDGETS = ("smoke", "short", "full")
SMOKE = ["train.epochs=1", "model.name=mlp", "model.width=128", "model.pretrained=null", "data.augment=none",
         "eval.batch_size=512"]
GROUPS = (("all", "top1"), ("many", "many"), ("medium", "medium"), ("few", "few"))
# What a recorded run must share with a row to count as one of its seeds: what was trained, on what, for how
# long. Precision, speed, logging and path keys are left out on purpose (they do not change the recipe).
MATCH_KEYS = ("data.name", "data.imbalance", "loss.name", "method.name", "model.name", "train.epochs",
              "optim.weight_decay", "more.enabled")


def tables_dir() -> Path:
    """The shipped tables: configs/tables of the checkout, or their copy in an installed wheel."""
    return recipes_dir() / "tables"


def list_tables() -> str:
    lines = []
    for path in sorted(tables_dir().glob("*.yaml")):
        table = read_yaml(path)
        known = sum((row.get("paper") or {}).get("all") is not None for row in table.get("rows", []))
        lines.append(f"{path.stem:<20} {len(table.get('rows', []))} rows ({known} with a published number): "
                     f"{table.get('title', '')}")
    return "\n".join(lines) or f"no tables in {tables_dir()}"


@dataclass
class Row:
    id: str
    config: Path
    overrides: list[str]
    init_from: Optional[str]
    paper: dict

    @property
    def label(self) -> str:
        return self.paper.get("label", self.id)


def load_table(name_or_path: str) -> tuple[Path, dict, list[Row]]:
    path = Path(name_or_path)
    if not path.suffix:
        path = tables_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"no table {name_or_path!r} ({path} does not exist); `longtail reproduce --list` shows the tables")
    table = read_yaml(path)
    configs = path.resolve().parent.parent  # rows name configs relative to configs/
    rows, ids = [], set()
    for i, raw in enumerate(table.get("rows") or []):
        where = f"{path}: rows[{i}]"
        for key in ("id", "config", "paper"):
            if key not in raw:
                raise ConfigError(f"{where}: missing '{key}'")
        paper = raw["paper"]
        if paper.get("metric") not in ("accuracy", "error"):
            raise ConfigError(f"{where} ({raw['id']}): paper.metric must be accuracy or error, got {paper.get('metric')!r}")
        for key in ("source", "selection"):
            if not paper.get(key):
                raise ConfigError(f"{where} ({raw['id']}): paper.{key} is required (where the number comes from, "
                                  "and which epoch the paper reports)")
        if raw.get("init_from") is not None and raw["init_from"] not in ids:
            raise ConfigError(f"{where} ({raw['id']}): init_from {raw['init_from']!r} must name an earlier row")
        if raw["id"] in ids:
            raise ConfigError(f"{where}: id {raw['id']!r} is used twice")
        ids.add(raw["id"])
        rows.append(Row(raw["id"], configs / raw["config"], list(raw.get("overrides") or []), raw.get("init_from"),
                        paper))
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return path, table, rows


def budget_overrides(row: Row, budget: str) -> list[str]:
    if budget == "full":
        return []
    if budget == "smoke":
        return list(SMOKE)
    epochs = load_config(row.config, row.overrides).train.epochs
    return [f"train.epochs={max(1, round(epochs / 10))}"]


def plan_table(rows: list[Row], seeds: list[int], budget: str, out: Path) -> list[list[Point]]:
    """Points in phases: rows that start from nothing, then rows that start from a run of an earlier phase."""
    phases: list[list[Point]] = []
    phase_of: dict[str, int] = {}
    for row in rows:
        phase = phase_of[row.init_from] + 1 if row.init_from else 0
        phase_of[row.id] = phase
        while len(phases) <= phase:
            phases.append([])
        for seed in seeds:
            overrides = [*row.overrides, *budget_overrides(row, budget), f"train.seed={seed}"]
            if row.init_from:
                overrides.append(f"method.init_from={out / f'{row.init_from},seed={seed}'}")
            check_config(load_config(row.config, overrides))  # a bad row stops the table before anything runs
            phases[phase].append(Point(f"{row.id},seed={seed}", str(row.config), overrides, out / f"{row.id},seed={seed}"))
    return phases


def check_data(points: list[Point], data_root: Optional[str], download: bool) -> None:
    """Load every distinct dataset the unfinished points train on, once, before the first run starts, so a
    row whose data is missing (or, with --download, cannot be fetched) stops the table before the other rows
    spend hours; with --download its archive is fetched here, once, not by several runs at a time."""
    from longtail.data import build_data

    checked: set[str] = set()
    for point in points:
        if (point.out / "results.json").exists():
            continue
        cfg = load_config(point.config, point.overrides)
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True, default=str)
        if key in checked:
            continue
        try:
            build_data(cfg.data, data_root, download)
        except ConfigError as exc:
            raise ConfigError(f"row {point.name.rsplit(',seed=', 1)[0]}: {exc}; nothing was run (every row's data "
                              "is checked before the first run starts)") from None
        checked.add(key)


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _measured(results: list[dict], key: str) -> list[float]:
    """The row's seeds' values of `key` (accuracy, %)."""
    return [r[key] for r in results if r.get(key) is not None]


def paper_accuracy(paper: dict, group: str) -> Optional[float]:
    """The paper's number for `group` (all, many, medium, few) as accuracy: a published error is 100 - error."""
    value = paper.get(group)
    return 100.0 - value if value is not None and paper["metric"] == "error" else value


def render(table: dict, rows: list[Row], results: dict[str, list[dict]], budget: str, epochs: dict[str, int]) -> str:
    """Markdown: per row the paper's accuracy (a published error converted, and marked so) beside the measured
    mean ± std over seeds and the difference."""
    lines = [f"## {table.get('title', '')}", ""]
    if budget != "full":
        lines += [f"**Budget `{budget}`**: " + ("1 epoch of a BN-MLP instead of the row's model, one seed — a "
                  "pipeline check, not a measurement" if budget == "smoke" else "a tenth of each row's epochs (shown "
                  "per row)") + "; the measured numbers are not comparable to the paper's.", ""]
    header = ["Row", "Paper All (accuracy)", "Measured All", "Δ (measured − paper)", "Paper Many / Med / Few",
              "Measured Many / Med / Few", "Seeds", "Epochs, checkpoint", "Paper's selection", "Source"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        paper, got = row.paper, results.get(row.id, [])
        converted = " (100 − error)" if paper["metric"] == "error" else ""
        paper_all = paper_accuracy(paper, "all")
        measured_all = _measured(got, "top1")
        if paper_all is None:
            delta = "paper number unknown"
        elif measured_all:
            delta = f"{statistics.mean(measured_all) - paper_all:+.2f}"
        else:
            delta = "not run"
        groups_paper = " / ".join("—" if (v := paper_accuracy(paper, g)) is None else f"{v:g}"
                                  for g in ("many", "medium", "few"))
        if groups_paper != "— / — / —":
            groups_paper += converted
        groups_measured = " / ".join(_fmt(_measured(got, key)).split(" ± ")[0] for _, key in GROUPS[1:])
        first = got[0] if got else {}
        ran = f"{epochs.get(row.id, '?')}, {first.get('checkpoint', '?')}" + (", flip TTA" if first.get("tta") == "flip" else "")
        source = paper["source"]
        source = source if isinstance(source, str) else ", ".join(f"{k}: {v}" for k, v in source.items() if v)
        cells = [row.label, "unknown" if paper_all is None else f"{paper_all:g}{converted}", _fmt(measured_all),
                 delta, groups_paper, groups_measured if got else "—", str(len(got)), ran, paper["selection"], source]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    notes = [f"- {row.label}: {row.paper['note']}" for row in rows if row.paper.get("note")]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def reproduce(name: str, budget: str = "full", out: Optional[str] = None, jobs: int = 1,
              slurm: Optional[dict] = None, data_root: Optional[str] = None, download: bool = False,
              seeds: Optional[list[int]] = None) -> str:
    if budget not in BUDGETS:
        raise ConfigError(f"--budget: {budget!r}; choose one of {', '.join(BUDGETS)}")
    path, table, rows = load_table(name)
    seeds = seeds or list(table.get("seeds") or [0])
    if budget == "smoke":
        seeds = seeds[:1]
    out_dir = Path(out or Path("runs") / "reproduce" / f"{path.stem}-{budget}")
    phases = plan_table(rows, seeds, budget, out_dir)
    check_data([point for points in phases for point in points], data_root, download)
    outcomes: list[Any] = []
    for points in phases:  # a two-stage row's points start once every stage-1 point has ended
        outcomes += run_points(points, out_dir, jobs, slurm, data_root, download)
    results: dict[str, list[dict]] = {}
    epochs: dict[str, int] = {}
    for outcome in outcomes:
        row_id = outcome.point.name.rsplit(",seed=", 1)[0]
        epochs[row_id] = load_config(outcome.point.config, outcome.point.overrides).train.epochs
        if outcome.results is not None:
            results.setdefault(row_id, []).append(outcome.results)
    text = render(table, rows, results, budget, epochs)
    print(text)
    from longtail.checkpoint import atomic_write_text

    atomic_write_text(out_dir / "table.md", text + "\n")
    print(f"wrote {out_dir / 'table.md'}")
    raise_failures(outcomes)
    return text


@dataclass
class Recorded:
    """A finished run found under `--from`: where, what it trained, what it reached."""
    path: Path
    config: dict  # flattened, today's defaults filled in
    results: dict
    best_test: Optional[float]  # max over metrics.jsonl's test top1: the LDAM-DRW reference code's selection
    best_epoch: Optional[dict]  # that epoch's record (its `test` metrics), the first one reaching it
    train_seconds: float  # the sum of the epochs' training times (evaluation excluded)


def match_key(flat: dict) -> tuple:
    return tuple(float(flat[k]) if k in ("data.imbalance", "optim.weight_decay") else flat[k] for k in MATCH_KEYS)


def read_recorded(root: Path) -> list[Recorded]:
    if not root.is_dir():
        raise ConfigError(f"--from {root}: {'not a directory' if root.exists() else 'no such directory'} (give a "
                          "folder of run directories, e.g. docs/evidence)")
    runs = []
    for results in sorted(root.rglob("results.json")):
        run = results.parent
        if not (run / "config.yaml").is_file():
            continue
        metrics = run / "metrics.jsonl"
        epochs: dict[int, dict] = {}  # by epoch: a resumed run's replayed epoch counts once, as last written
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                record = json.loads(line) if line.strip() else {}
                if "epoch" in record:
                    epochs[record["epoch"]] = record
        tested = [r for _, r in sorted(epochs.items()) if (r.get("test") or {}).get("top1") is not None]
        best = max(tested, key=lambda r: r["test"]["top1"], default=None)  # max keeps the first of equals
        runs.append(Recorded(run, flatten_saved(read_yaml(run / "config.yaml")), json.loads(results.read_text()),
                             best and best["test"]["top1"], best,
                             sum(r.get("epoch_seconds", 0.0) for r in epochs.values())))
    if not runs:
        raise ConfigError(f"--from {root}: no run directories under it (each holds config.yaml, results.json and "
                          "metrics.jsonl, as `longtail train` writes them)")
    return runs


def _delta(values: list[float], paper: Optional[float]) -> str:
    if paper is None:
        return "paper number unknown"
    return f"{statistics.mean(values) - paper:+.2f}" if values else "—"


def trained_dtype(flat: dict) -> str:
    """The dtype a run trained its steps in (not the speed keys of `training.fit.precision`, such as channels-last):
    its seeds are averaged only with runs of the same one."""
    return str(flat["train.amp_dtype"]) if flat["train.amp"] else "float32"


def recorded_line(row: Row, label: str, mine: list[Recorded], root: Path) -> str:
    """One Markdown row: the paper's accuracy beside `mine`, the recorded runs of one precision, one per seed."""
    paper = paper_accuracy(row.paper, "all")
    results = [r.results for r in mine]
    recorded = _measured(results, "top1")
    best = [r.best_test for r in mine if r.best_test is not None]
    rules = sorted({str(r.get("checkpoint", "?")) for r in results})
    groups = " / ".join(_fmt(_measured(results, key)) for _, key in GROUPS[1:])
    source = row.paper["source"]
    source = source if isinstance(source, str) else ", ".join(f"{k}: {v}" for k, v in source.items() if v)
    cells = [label, "unknown" if paper is None else f"{paper:g}" + (" (100 − error)" if row.paper["metric"] == "error" else ""),
             f"{_fmt(recorded)} ({', '.join(rules)})" if mine else "no recorded run", _delta(recorded, paper),
             _fmt(best), _delta(best, paper), groups if mine else "—", _fmt(_measured(results, "ece")),
             ", ".join(str(r.config["train.seed"]) for r in mine) or "—",
             ", ".join(str(r.path.relative_to(root)) for r in mine) or "—", row.paper["selection"], source]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def render_recorded(table: dict, rows: list[Row], runs: list[Recorded], root: Path) -> str:
    """Markdown: per row the paper's accuracy beside the recorded runs that trained the row's recipe, mean ± std
    over their seeds, at the run's own checkpoint rule and at its best test epoch; runs of one row in different
    precisions (a float32 twin of a bfloat16 run) get a line each, since a mean ± std is over seeds."""
    lines = [f"## {table.get('title', '')}", "",
             f"Recorded runs under `{root}`, matched to the rows by {', '.join(MATCH_KEYS)}; nothing was re-run. "
             "\"best test epoch\" is the highest test top-1 over the run's epochs (metrics.jsonl), the LDAM-DRW "
             "reference code's selection; \"recorded\" is results.json's (its checkpoint rule in brackets).", ""]
    header = ["Row", "Paper (accuracy)", "Recorded", "Δ recorded", "Best test epoch", "Δ best test",
              "Many / Med / Few (recorded)", "ECE", "Seeds", "Runs", "Paper's selection", "Source"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    used: list[Recorded] = []  # in the table's row order
    for row in rows:
        key = match_key(flatten(load_config(row.config, row.overrides).to_dict()))
        matched = sorted((r for r in runs if match_key(r.config) == key), key=lambda r: r.config["train.seed"])
        used += [r for r in matched if r not in used]
        by_dtype: dict[str, list[Recorded]] = {}
        for r in matched:
            by_dtype.setdefault(trained_dtype(r.config), []).append(r)
        for dtype, mine in (by_dtype or {"": []}).items():  # a row without runs still gets its line
            seeds = [r.config["train.seed"] for r in mine]
            if len(set(seeds)) < len(seeds):
                twins = ", ".join(str(r.path.relative_to(root)) for r in mine if seeds.count(r.config["train.seed"]) > 1)
                raise ConfigError(f"--from {root}: runs {twins} trained row {row.label!r} with the same seed and "
                                  f"precision ({dtype}); a row averages over seeds, so keep one of them under --from")
            label = f"{row.label} ({dtype})" if len(by_dtype) > 1 else row.label
            lines.append(recorded_line(row, label, mine, root))
    notes = [f"- {row.label}: {row.paper['note']}" for row in rows if row.paper.get("note")]
    if notes:
        lines += ["", *notes]
    others = [str(r.path.relative_to(root)) for r in runs if r not in used]
    if others:
        lines += ["", f"Runs under `{root}` that match no row of this table: {', '.join(others)}"]
    if used:
        lines += ["", "How each run was made: its best test epoch in full, and where each (re)started part of it "
                      "ran (results.json's `segments`; commit, CPU, threads and precision as each part recorded "
                      "them). Training time is the sum of the epochs' training, evaluation excluded.", ""]
        lines += made_table(used, root)
    return "\n".join(lines)


def _once(values: list) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values if v is not None)) or "—"


def made_table(runs: list[Recorded], root: Path) -> list[str]:
    """One line per recorded run: its best test epoch (All / Many / Medium / Few, ECE) and its segments."""
    header = ["Run", "Seed", "Best test epoch", "All / Many / Med / Few at it", "ECE at it", "Parts", "Commit",
              "CPU", "Threads", "Precision", "torch", "Training time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for run in runs:
        # Runs finished before segments were recorded name only the process that finished them.
        parts = run.results.get("segments") or [run.results.get("environment") or {}]
        test = (run.best_epoch or {}).get("test", {})
        at = " / ".join("—" if test.get(k) is None else f"{test[k]:.2f}" for k in ("top1", "many", "medium", "few"))
        hours, minutes = divmod(round(run.train_seconds / 60), 60)
        cells = [str(run.path.relative_to(root)), str(run.config["train.seed"]),
                 "—" if run.best_epoch is None else f"{run.best_epoch['epoch']} of {run.config['train.epochs']}",
                 at if test else "—", "—" if test.get("ece") is None else f"{test['ece']:.2f}", str(len(parts)),
                 _once([p.get("commit") and p["commit"][:10] for p in parts]), _once([p.get("cpu") for p in parts]),
                 _once([p.get("threads") for p in parts]), _once([p.get("precision") for p in parts]),
                 _once([p.get("torch") for p in parts]), f"{hours}h{minutes:02d}m"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def show_recorded(name: str, root: str) -> str:
    """`longtail reproduce TABLE --from DIR`: print the table beside the recorded runs; runs and writes nothing."""
    _, table, rows = load_table(name)
    text = render_recorded(table, rows, read_recorded(Path(root)), Path(root))
    print(text)
    return text
