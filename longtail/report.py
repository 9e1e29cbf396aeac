"""`longtail report RUN_DIR...`: finished runs side by side as one Markdown table.

Runs whose resolved configs differ only in `train.seed` (and in keys that do not change what is
computed, such as the device) are one row: mean ± sample standard deviation over the seeds. A
two-stage run's `method.init_from` counts by the recipe of the stage-1 run it names, so stage-2 runs
of different seeds, each from its own stage-1 seed, still group together.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from longtail.config import flatten_saved
from longtail.engine import RESUME_FREE_KEYS
from longtail.errors import ConfigError
from longtail.progress import track

IGNORED_KEYS = RESUME_FREE_KEYS | {"train.seed"}
_COLUMNS = [("All", "top1"), ("Many", "many"), ("Medium", "medium"), ("Few", "few"), ("ECE", "ece")]


def _read_results(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no results.json; `longtail report` takes finished run directories")
    return json.loads(path.read_text())


def recipe_key(config: dict, seen: Optional[set] = None) -> str:
    """What a run computes apart from its seed, as a comparable string."""
    flat = {k: v for k, v in flatten_saved(config).items() if k not in IGNORED_KEYS}
    init_from = flat.get("method.init_from")
    if init_from is not None:
        stage1 = Path(init_from)
        stage1 = stage1 if stage1.is_dir() else stage1.parent
        seen = seen or set()
        if (stage1 / "results.json").is_file() and stage1.resolve() not in seen:
            flat["method.init_from"] = recipe_key(_read_results(stage1)["config"], seen | {stage1.resolve()})
    return json.dumps(flat, sort_keys=True, default=str)


def _mean_std(values: list[Optional[float]], digits: int = 2) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "—"
    if len(present) == 1:
        return f"{present[0]:.{digits}f}"
    return f"{statistics.mean(present):.{digits}f} ± {statistics.stdev(present):.{digits}f}"


def _tau(results: dict) -> Optional[float]:
    """The run's tau: of its post-hoc adjustment, else of its tau-normalisation, else None."""
    if results.get("posthoc"):
        return results["posthoc"]["tau"]
    return ((results.get("method_record") or {}).get("tau_norm") or {}).get("tau")


def _imbalance(results: dict) -> str:
    """The Data column's imbalance: `IF x` as configured; under `profile: none` the measured max/min
    train count ratio, from the recorded `class_counts` (results.json files written before the
    measured `imbalance` was recorded hold the unused data.imbalance there, e.g. 100)."""
    data = results["config"]["data"]
    if data.get("profile") == "none":
        counts = results.get("class_counts") or []
        if counts and min(counts) > 0:
            return f"IF {max(counts) / min(counts):.4g} (natural)"
        return "natural counts"
    return f"IF {results.get('imbalance', data['imbalance']):g}"


def _row(name: str, group: list[dict]) -> list[str]:
    first = group[0]
    config = first["config"]
    method = first.get("method", config["method"]["name"])
    recipe = f"{method} / {first.get('loss', config['loss']['name'])}, wd {config['optim']['weight_decay']:g}"
    if first.get("posthoc"):
        recipe += f", {first['posthoc']['kind']} LA"
    checkpoint = first.get("checkpoint", "final")
    epochs = f"{first.get('epochs', config['train']['epochs'])}" + ("" if checkpoint == "final" else f" ({checkpoint})")
    data = f"{first.get('dataset', config['data']['name'])} {_imbalance(first)}"
    taus = [t for t in map(_tau, group) if t is not None]
    seeds = ", ".join(str(r.get("seed", r["config"]["train"]["seed"])) for r in group)
    cells = [name, data, first.get("model", config["model"]["name"]), recipe, epochs, seeds,
             _mean_std(taus) if taus else "—"]
    return cells + [_mean_std([r.get(key) for r in group]) for _, key in _COLUMNS]


def _groups(run_dirs: list[str]) -> list[tuple[str, list[dict]]]:
    """(name of the first run, results of its seeds) per recipe, in input order."""
    groups: dict[str, tuple[str, list[dict]]] = {}
    for run_dir in track(run_dirs, "read runs", "runs"):
        results = _read_results(Path(run_dir))
        key = recipe_key(results["config"])
        groups.setdefault(key, (str(run_dir), []))[1].append(results)
    return list(groups.values())


def report(run_dirs: list[str]) -> str:
    """A Markdown table, one row per recipe (runs differing only in seed merged), in input order."""
    header = ["Run", "Data", "Model", "Recipe", "Epochs", "Seeds", "tau"] + [title for title, _ in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, group in _groups(run_dirs):
        lines.append("| " + " | ".join(_row(name, group)) + " |")
    return "\n".join(lines)


def _mean_per_class(group: list[dict]) -> list[Optional[float]]:
    """Per-class accuracy averaged over a row's seeds (None where no seed has the class)."""
    columns = zip(*(r["per_class"] for r in group))
    return [statistics.mean(present) if (present := [v for v in column if v is not None]) else None
            for column in columns]


def plot_report(run_dirs: list[str], path: str | Path) -> str:
    """`report --plot`: the per-class accuracy of every row (mean over its seeds) against class size, one
    figure; the runs must share the training class counts (one dataset, one subset)."""
    from longtail.plots import plot_per_class_accuracy

    groups = _groups(run_dirs)
    first_name, (first, *_) = groups[0]
    for name, group in groups:
        for results in group:
            if results["class_counts"] != first["class_counts"]:
                raise ConfigError(f"report --plot: {name} was trained on other class counts than {first_name}; the "
                                  "per-class figure compares runs on one dataset and subset")
    rows = {name + (f" (mean of {len(group)} seeds)" if len(group) > 1 else ""): _mean_per_class(group)
            for name, group in groups}
    return plot_per_class_accuracy(rows, first["class_counts"], path, first["thresholds"], first.get("class_names"))
