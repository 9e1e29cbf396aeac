"""`longtail reproduce TABLE`: a paper's table, run through the sweep machinery, beside its numbers.

A table is a YAML file under configs/tables/: `title`, `seeds`, and `rows`, each with an `id`, a
`config` (relative to configs/), `overrides`, optionally `init_from` (the id of the row whose run of
the same seed a two-stage row starts from), and `paper`: the published numbers (`all`, `many`,
`medium`, `few`; null where the source gives none), the `metric` as the paper states it (accuracy
or error, in %), the `source` (paper, table, column, and where the number was taken from) and the
paper's `selection` rule. A row whose number is not known says so (`all: null`); no number is filled in.

Budgets: `full` runs the configs as they are; `short` trains a tenth of the epochs (at least 1) and
says so in the rendered table; `smoke` checks the pipeline in seconds: one seed, one epoch, the
BN-MLP (width 128, so an ETF head fits 100 classes) instead of the CNN, no augmentation, no pretrained
weights. Only `full` numbers are comparable to the paper's.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional


from longtail.config import load_config, read_yaml
from longtail.errors import ConfigError
from longtail.sweep import Point, raise_failures, run_points

BUDGETS = ("smoke", "short", "full")
SMOKE = ["train.epochs=1", "model.name=mlp", "model.width=128", "model.pretrained=null", "data.augment=none",
         "eval.batch_size=512"]
GROUPS = (("all", "top1"), ("many", "many"), ("medium", "medium"), ("few", "few"))


def tables_dir() -> Path:
    """configs/tables of the current directory, else of the checkout this package runs from."""
    here = Path("configs/tables")
    return here if here.is_dir() else Path(__file__).resolve().parents[1] / "configs" / "tables"


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
            load_config(row.config, overrides)  # a bad row stops the table before anything runs
            phases[phase].append(Point(f"{row.id},seed={seed}", str(row.config), overrides, out / f"{row.id},seed={seed}"))
    return phases


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _measured(results: list[dict], key: str, metric: str) -> list[float]:
    """The row's seeds' values of `key`, in the paper's metric (error = 100 - accuracy)."""
    values = [r[key] for r in results if r.get(key) is not None]
    return [100.0 - v for v in values] if metric == "error" else values


def render(table: dict, rows: list[Row], results: dict[str, list[dict]], budget: str, epochs: dict[str, int]) -> str:
    """Markdown: per row the paper's number beside the measured mean ± std over seeds and the difference."""
    lines = [f"## {table.get('title', '')}", ""]
    if budget != "full":
        lines += [f"**Budget `{budget}`**: " + ("1 epoch of a BN-MLP instead of the row's model, one seed — a "
                  "pipeline check, not a measurement" if budget == "smoke" else "a tenth of each row's epochs (shown "
                  "per row)") + "; the measured numbers are not comparable to the paper's.", ""]
    header = ["Row", "Metric", "Paper All", "Measured All", "Δ (measured − paper)", "Paper Many / Med / Few",
              "Measured Many / Med / Few", "Seeds", "Epochs, checkpoint", "Paper's selection", "Source"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        paper, got = row.paper, results.get(row.id, [])
        metric = paper["metric"]
        measured_all = _measured(got, "top1", metric)
        if paper.get("all") is None:
            delta = "paper number unknown"
        elif measured_all:
            delta = f"{statistics.mean(measured_all) - paper['all']:+.2f}"
        else:
            delta = "not run"
        groups_paper = " / ".join("—" if paper.get(g) is None else f"{paper[g]:g}" for g in ("many", "medium", "few"))
        groups_measured = " / ".join(_fmt(_measured(got, key, metric)).split(" ± ")[0] for _, key in GROUPS[1:])
        first = got[0] if got else {}
        ran = f"{epochs.get(row.id, '?')}, {first.get('checkpoint', '?')}" + (", flip TTA" if first.get("tta") == "flip" else "")
        source = paper["source"]
        source = source if isinstance(source, str) else ", ".join(f"{k}: {v}" for k, v in source.items() if v)
        cells = [row.label, metric, "unknown" if paper.get("all") is None else f"{paper['all']:g}", _fmt(measured_all),
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
