"""`longtail report RUN_DIR...`: finished runs side by side as one Markdown table.

Runs whose resolved configs differ only in `train.seed` (and in keys that do not change what is
computed, such as the device) are one row: mean ± sample standard deviation over the seeds. A
two-stage run's `method.init_from` counts by the recipe of the stage-1 run it names, so stage-2 runs
of different seeds, each from its own stage-1 seed, still group together.

With a baseline row, a second table compares every row that shares seeds with it seed by seed:
the mean paired difference, its 95 % interval and the paired t-test p-value (`longtail.stats`).
The same rows also render as CSV and as one self-contained HTML page (`longtail.report_html`).
Rows of MORE runs trained with `train.track_every` get a third table: MORE's diagnostics at their last
tracked epoch, so a comparison of variants shows where each low-rank part acts beside what it reached.
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from longtail.checkpoint import read_json
from longtail.config import flatten_saved
from longtail.training.checkpointing import RESUME_FREE_KEYS
from longtail.errors import ConfigError
from longtail.progress import track
from longtail.task import get_task

IGNORED_KEYS = RESUME_FREE_KEYS | {"train.seed"}
REPORT_COLUMNS = [("All", "top1"), ("Many", "many"), ("Medium", "medium"), ("Few", "few"), ("ECE", "ece")]
PAIRED_COLUMNS = REPORT_COLUMNS[:4]  # accuracies; a difference in ECE is not what a comparison of recipes asks
REPORT_MULTILABEL_COLUMNS = [("mAP", "map"), ("Head", "map_head"), ("Medium", "map_medium"), ("Tail", "map_tail"),
                       ("macro-F1", "macro_f1")]


@dataclass
class Group:
    """One row: the runs of one recipe, in input order."""
    name: str  # the first run directory given
    dirs: list[str]
    results: list[dict]

    def seeds(self) -> list[int]:
        return [r.get("seed", r["config"]["train"]["seed"]) for r in self.results]

    def by_seed(self, key: str) -> dict[int, Optional[float]]:
        return {seed: r.get(key) for seed, r in zip(self.seeds(), self.results)}


def _read_results(run_dir: Path) -> dict:
    path = run_dir / "results.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no results.json; `longtail report` takes finished run directories")
    return read_json(path)


def find_runs(paths: list[str]) -> list[str]:
    """The run directories `paths` name, found as `tensorboard --logdir` finds runs: a directory holding
    results.json is a run; any other directory is searched at any depth for the run directories beneath
    it (sorted, hidden folders skipped), so a sweep's OUT gives its points and a run's `posthoc-<kind>/`
    result, and its `logs/` gives none. A run directory without results.json (unfinished) is an error when
    named and left out, with a note on stderr, when found; a folder with no run beneath it adds nothing (the
    `logs/` that `sweep/*` passes). A run named twice counts once."""
    runs: dict[Path, str] = {}
    unfinished: list[str] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise ConfigError(f"{path}: {'not a directory' if path.exists() else 'no such directory'}; "
                              "`longtail report` takes run directories and folders holding them (a sweep's OUT)")
        if (path / "results.json").is_file():
            runs.setdefault(path.resolve(), str(path))
            continue
        if (path / "config.yaml").is_file():
            raise ConfigError(f"{path}: no results.json (an unfinished run); `longtail report` takes finished run "
                              "directories, and a folder holding runs (a sweep's OUT) gives those that finished")
        for folder, subfolders, files in os.walk(path):
            subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
            if "results.json" in files:
                runs.setdefault(Path(folder).resolve(), folder)
            elif "config.yaml" in files:
                unfinished.append(folder)
    if unfinished:
        print(f"report: left out {len(unfinished)} unfinished run(s), without results.json: {', '.join(unfinished)}",
              file=sys.stderr)
    if not runs:
        raise ConfigError(f"{', '.join(paths)}: no results.json in it or in any folder beneath it; `longtail report` "
                          "takes finished run directories and folders holding them (a sweep's OUT)")
    return list(runs.values())


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


def group_row(name: str, group: list[dict], columns: list) -> list[str]:
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
    return cells + [_mean_std([r.get(key) for r in group]) for _, key in columns]


def group_runs(run_dirs: list[str]) -> list[Group]:
    """Runs grouped by recipe (runs differing only in seed together), in input order; folders of runs are
    searched for them (`find_runs`)."""
    groups: dict[str, Group] = {}
    for run_dir in track(find_runs(run_dirs), "read runs", "runs"):
        results = _read_results(Path(run_dir))
        key = recipe_key(results["config"])
        group = groups.setdefault(key, Group(str(run_dir), [], []))
        group.dirs.append(str(run_dir))
        group.results.append(results)
    return list(groups.values())


def columns_for(groups: list[Group]) -> tuple[list, list]:
    """(table columns, paired columns): accuracies for single-label runs, mAP for multi-label ones. One
    table holds one kind: accuracy and mAP do not share columns."""
    kinds: dict[str, str] = {}
    for group in groups:
        for run_dir, results in zip(group.dirs, group.results):
            kinds.setdefault(get_task(results.get("task")).name, run_dir)
    if len(kinds) > 1:
        raise ConfigError(f"longtail report: {' and '.join(f'{d} is {k}' for k, d in kinds.items())}; accuracy and "
                          "mAP do not share columns, so report single-label and multi-label runs separately")
    if kinds and get_task(next(iter(kinds))).multilabel:
        return REPORT_MULTILABEL_COLUMNS, REPORT_MULTILABEL_COLUMNS[:4]
    return REPORT_COLUMNS, PAIRED_COLUMNS


def find_baseline(groups: list[Group], baseline: str) -> Group:
    """The row named by `baseline`: one of its run directories, or a sweep point's name without its
    seed (`loss.name=ce` for the runs `loss.name=ce,seed=0`, `...,seed=1`)."""
    for group in groups:
        for run_dir in group.dirs:
            path = Path(run_dir)
            if Path(baseline).resolve() == path.resolve() or path.name.rsplit(",seed=", 1)[0] == baseline:
                return group
    raise ConfigError(f"--baseline {baseline}: no row has that run directory or sweep point name; "
                      f"rows: {', '.join(g.name for g in groups)}")


def paired_rows(groups: list[Group], base: Group, columns: list) -> list[tuple[Group, list[int], dict]]:
    """For every other row sharing seeds with `base`: the shared seeds and, per metric, a `Paired`."""
    from longtail.stats import paired

    out = []
    for group in groups:
        if len(set(group.seeds())) != len(group.seeds()):
            raise ConfigError(f"row {group.name}: two runs have the same seed ({', '.join(group.dirs)}), so runs "
                              "cannot be paired by seed; give each run once")
        if group is base:
            continue
        shared = [s for s in group.seeds() if s in base.seeds()]
        if not shared:
            continue
        stats = {}
        for title, key in columns:
            mine, theirs = group.by_seed(key), base.by_seed(key)
            seeds = [s for s in shared if mine[s] is not None and theirs[s] is not None]
            stats[title] = paired([mine[s] for s in seeds], [theirs[s] for s in seeds]) if seeds else None
        out.append((group, shared, stats))
    return out


def paired_cell(p) -> str:
    if p is None:
        return "—"
    if p.low is None:
        return f"{p.mean:+.2f} (1 seed)"
    return f"{p.mean:+.2f} [{p.low:+.2f}, {p.high:+.2f}] p={'—' if p.p is None else format(p.p, '.3g')}"


def _environment(results: dict) -> list[Optional[str]]:
    env = results.get("environment") or {}
    commit = env.get("commit")
    short = commit and commit[:10] + ("+dirty" if commit.endswith("+dirty") else "")
    world = results.get("world_size")
    return [short, env.get("torch"), env.get("device"), None if world is None else str(world)]


def environment_cells(group: Group) -> list[str]:
    """Commit, torch, device, world size; each value once when the row's seeds differ in it; — where
    older results.json files did not record them."""
    columns = zip(*(_environment(r) for r in group.results))
    return [", ".join(dict.fromkeys("—" if v is None else v for v in column)) for column in columns]


ENV_HEADER = ["Commit", "torch", "Device", "World size"]


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def _general(values: list[float]) -> str:
    """Mean ± std of small positive numbers of any size (discrepancies, ratios) in 3 significant digits."""
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def more_rows(groups: list[Group], group_titles: list[str]) -> tuple[list[str], list[list[str]]]:
    """Per row whose runs logged MORE's diagnostics: the last tracked epoch's per-class discrepancy averaged
    over each class group, and the low-rank share ||s B A|| / ||W_g|| of the median and the largest
    decomposed layer, each a mean ± std over the row's seeds that have them."""
    from longtail.analysis import more_history

    header = ["Run", "Seeds", "Epoch"] + [f"Discrepancy {t}" for t in group_titles] + ["Share median %", "Share max %"]
    rows = []
    for group in groups:
        config = group.results[0]["config"]  # the row's runs differ in seed alone
        if not (config.get("more", {}).get("enabled") and config["train"].get("track_every")):
            continue  # no diagnostics logged: its metrics.jsonl files are not read
        histories = {seed: more_history(Path(d)) for seed, d in zip(group.seeds(), group.dirs)}
        last = {seed: history[-1] for seed, history in histories.items() if history}
        if not last:
            continue
        records = list(last.values())
        cells = [group.name, ", ".join(map(str, last)), ", ".join(map(str, sorted({r["epoch"] for r in records})))]
        for key in ("many", "medium", "few"):
            values = [r["more_discrepancy"].get(key) for r in records]
            cells.append("—" if None in values else _general(values))
        shares = [sorted(r["more_layer_ratio"].values()) for r in records]
        cells.append(_general([100 * statistics.median(s) for s in shares]))
        cells.append(_general([100 * s[-1] for s in shares]))
        rows.append(cells)
    return header, rows


def report(run_dirs: list[str], baseline: Optional[str] = None, show_env: bool = False) -> str:
    """A Markdown table, one row per recipe (runs differing only in seed merged), in input order; with
    `baseline`, a table of paired differences against that row; with `show_env`, where runs ran."""
    groups = group_runs(run_dirs)
    columns, paired_columns = columns_for(groups)
    header = ["Run", "Data", "Model", "Recipe", "Epochs", "Seeds", "tau"] + [title for title, _ in columns]
    rows = [group_row(g.name, g.results, columns) + (environment_cells(g) if show_env else []) for g in groups]
    lines = _markdown(header + (ENV_HEADER if show_env else []), rows)
    if baseline is not None:
        base = find_baseline(groups, baseline)
        lines += ["", f"Paired differences against {base.name} over shared seeds (row − baseline, points): "
                      "mean [95 % t interval] and the paired t-test p-value", ""]
        lines += _markdown(["Run", "Shared seeds"] + [title for title, _ in paired_columns],
                           [[g.name, ", ".join(map(str, shared))] + [paired_cell(stats[t]) for t, _ in paired_columns]
                            for g, shared, stats in paired_rows(groups, base, paired_columns)])
    more_header, more_table = more_rows(groups, [title for title, _ in columns[1:4]])
    if more_table:
        lines += ["", "MORE's diagnostics at the last tracked epoch (`train.track_every`), mean ± std over the seeds "
                      "that logged them: the per-class discrepancy averaged over each class group, and the low-rank "
                      "share ||s B A|| / ||W_g|| of the median and the largest decomposed layer", ""]
        lines += _markdown(more_header, more_table)
    return "\n".join(lines)


def report_csv(run_dirs: list[str], baseline: Optional[str] = None) -> str:
    """One CSV line per row: mean and std of each metric; with `baseline`, per accuracy the paired
    difference, interval and p-value (empty where there is none)."""
    groups = group_runs(run_dirs)
    columns, paired_columns = columns_for(groups)
    base = find_baseline(groups, baseline) if baseline is not None else None
    compared = {id(g): (shared, stats) for g, shared, stats in (paired_rows(groups, base, paired_columns) if base else [])}
    header = ["run", "data", "model", "recipe", "epochs", "seeds", "n"]
    for _, key in columns:
        header += [f"{key}_mean", f"{key}_std"]
    if base:
        header += ["shared_seeds"] + [f"{key}_{part}" for _, key in paired_columns
                                      for part in ("diff", "diff_low", "diff_high", "p")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for g in groups:
        cells = group_row(g.name, g.results, columns)
        line = cells[:5] + [" ".join(map(str, g.seeds())), len(g.results)]
        for _, key in columns:
            values = [r.get(key) for r in g.results if r.get(key) is not None]
            line += [round(statistics.mean(values), 4) if values else "",
                     round(statistics.stdev(values), 4) if len(values) > 1 else ""]
        if base:
            shared, stats = compared.get(id(g), ([], {}))
            line.append(" ".join(map(str, shared)))
            for title, _ in paired_columns:
                p = stats.get(title)
                line += ["", "", "", ""] if p is None else [
                    round(p.mean, 4), "" if p.low is None else round(p.low, 4), "" if p.high is None else round(p.high, 4),
                    "" if p.p is None else f"{p.p:.4g}"]
        writer.writerow(line)
    return buf.getvalue()


def _mean_per_class(group: list[dict]) -> list[Optional[float]]:
    """Per-class accuracy averaged over a row's seeds (None where no seed has the class)."""
    columns = zip(*(r["per_class"] for r in group))
    return [statistics.mean(present) if (present := [v for v in column if v is not None]) else None
            for column in columns]


def plot_report(run_dirs: list[str], path: str | Path) -> str:
    """`report --plot`: the per-class accuracy of every row (mean over its seeds) against class size, one
    figure; the runs must share the training class counts (one dataset, one subset)."""
    from longtail.plots import plot_per_class_accuracy

    groups = group_runs(run_dirs)
    first_name, first = groups[0].name, groups[0].results[0]
    for group in groups:
        if get_task(group.results[0].get("task")).multilabel:
            raise ConfigError(f"report --plot: {group.name} is a multi-label run; the figure shows per-class accuracy "
                              "(use longtail eval --plots for AP against class frequency)")
        for results in group.results:
            if results["class_counts"] != first["class_counts"]:
                raise ConfigError(f"report --plot: {group.name} was trained on other class counts than {first_name}; "
                                  "the per-class figure compares runs on one dataset and subset")
    rows = {g.name + (f" (mean of {len(g.results)} seeds)" if len(g.results) > 1 else ""): _mean_per_class(g.results)
            for g in groups}
    return plot_per_class_accuracy(rows, first["class_counts"], path, first["thresholds"], first.get("class_names"))
