"""`longtail reproduce`: shipped tables load and plan under every budget, the rendering compares in the
paper's metric, and a whole table (with a two-stage row) runs on fake data at the smoke budget."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import longtail
from fake_data import write_cifar100
from longtail.errors import ConfigError
from longtail.reproduce import BUDGETS, Row, list_tables, load_table, plan_table, render, tables_dir
from tiny import TINY_MLP

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

TABLES = sorted(p.stem for p in tables_dir().glob("*.yaml"))


def test_the_issue_s_tables_are_shipped_and_listed():
    assert {"ldam_drw", "logit_adjustment", "wb", "ewb", "more"} <= set(TABLES)
    listing = list_tables()
    assert "ldam_drw             11 rows (7 with a published number)" in listing


def test_shipped_tables_are_in_accuracy_with_the_paper_s_error_converted_and_cite_no_internal_notes():
    for path in tables_dir().glob("*.yaml"):
        text = path.read_text()
        assert "SPEC" not in text and "../shared" not in text, path
        _, _, rows = load_table(str(path))
        assert {row.paper["metric"] for row in rows} == {"accuracy"}, path
    _, _, rows = load_table("ldam_drw")
    paper = {row.id: row.paper for row in rows}
    # Cao et al., NeurIPS 2019, Table 2 (top-1 error): accuracy = 100 - error, the error kept in the source
    for row_id, error in [("cifar10_ce", 29.64), ("cifar10_ldam_drw", 22.97), ("cifar100_ce", 61.68),
                          ("cifar10_ce_if10", 13.61), ("cifar10_ldam_drw_if10", 11.84), ("cifar100_ldam_drw_if10", 41.29)]:
        assert paper[row_id]["all"] == pytest.approx(100 - error) and f"{error} % error" in paper[row_id]["source"]["value"]
        assert "Table 2" in paper[row_id]["source"]["table"]
    if10 = [row for row in rows if row.id.endswith("_if10")]
    assert len(if10) == 3 and all(row.overrides == ["data.imbalance=10"] for row in if10)


@pytest.mark.parametrize("name", TABLES)
def test_every_row_of_every_table_is_a_valid_config_under_every_budget(name, tmp_path):
    _, _, rows = load_table(name)
    for row in rows:
        paper = row.paper
        assert paper["metric"] in ("accuracy", "error") and paper["source"] and paper["selection"]
        assert paper.get("all") is not None or "unknown" in paper.get("note", "") + paper.get("label", "") \
            or "no published number" in paper.get("note", "")
    for budget in BUDGETS:
        phases = plan_table(rows, [0, 1], budget, tmp_path)  # validates every point's config
        assert sum(map(len, phases)) == 2 * len(rows)
    full, short = plan_table(rows, [0], "full", tmp_path)[0], plan_table(rows, [0], "short", tmp_path)[0]
    assert not any(o.startswith("train.epochs=") for o in full[0].overrides[len(rows[0].overrides):])
    assert any(o.startswith("train.epochs=") for o in short[0].overrides)


def test_two_stage_rows_start_from_the_same_seed_of_their_stage1_row(tmp_path):
    _, _, rows = load_table("wb")
    phases = plan_table(rows, [0, 1], "full", tmp_path)
    assert len(phases) == 2
    stage2 = {p.name: p for p in phases[1]}
    assert f"method.init_from={tmp_path / 'wb_stage1,seed=1'}" in stage2["wb_stage2,seed=1"].overrides
    assert f"method.init_from={tmp_path / 'wb_stage1_if10,seed=0'}" in stage2["wb_if10,seed=0"].overrides


def test_the_table_compares_in_accuracy_converting_a_published_error_and_saying_so():
    rows = [Row("err", Path("x.yaml"), [], None, {"metric": "error", "all": 22.97, "few": 40.0, "source": "s",
                                                   "selection": "final"}),
            Row("acc", Path("x.yaml"), [], None, {"metric": "accuracy", "all": 70.4, "few": 10.0, "source": "s",
                                                   "selection": "best test epoch"}),
            Row("new", Path("x.yaml"), [], None, {"metric": "accuracy", "all": None, "source": "s", "selection": "?"})]
    results = {"err": [{"top1": 76.0, "checkpoint": "final"}, {"top1": 78.0, "checkpoint": "final"}],
               "acc": [{"top1": 71.4, "few": 12.0, "checkpoint": "final"}],
               "new": [{"top1": 50.0, "checkpoint": "final"}]}
    text = render({"title": "t"}, rows, results, "short", {"err": 20, "acc": 20, "new": 20})
    lines = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert lines["Row"][1:4] == ["Paper All (accuracy)", "Measured All", "Δ (measured − paper)"]
    assert lines["err"][1:5] == ["77.03 (100 − error)", "77.00 ± 1.41", "-0.03", "— / — / 60 (100 − error)"]
    assert lines["acc"][1:5] == ["70.4", "71.40", "+1.00", "— / — / 10"] and lines["acc"][5] == "— / — / 12.00"
    assert lines["new"][1] == "unknown" and lines["new"][3] == "paper number unknown"
    assert "Budget `short`" in text and "not comparable" in text


def test_every_row_s_data_is_checked_before_the_first_run_starts(tmp_path, data_root, capsys):
    from longtail.cli import main

    configs = tmp_path / "configs"
    (configs / "tables").mkdir(parents=True)
    (configs / "fm.yaml").write_text("\n".join(TINY_YAML) + "\n")
    (configs / "c100.yaml").write_text("\n".join(TINY_YAML).replace("fashion_mnist_lt", "cifar100_lt") + "\n")
    table = configs / "tables" / "t.yaml"
    table.write_text(
        "title: two datasets\nrows:\n"
        "  - {id: fm, config: fm.yaml, paper: {metric: accuracy, all: 50, source: s, selection: f}}\n"
        "  - {id: c100, config: c100.yaml, paper: {metric: accuracy, all: 40, source: s, selection: f}}\n")
    out = tmp_path / "rep"
    # Fashion-MNIST is there, CIFAR-100 is not: refused before the Fashion-MNIST row trains.
    assert main(["reproduce", str(table), "--budget", "smoke", "--data-root", str(data_root), "--out", str(out)]) == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith("longtail reproduce: error: row c100: cifar100_lt: no dataset files at ")
    assert err.endswith("nothing was run (every row's data is checked before the first run starts)")
    assert not out.exists() or not any(out.iterdir())


def test_a_bad_table_is_refused_naming_the_row(tmp_path):
    with pytest.raises(ConfigError, match="no table 'ldam'.*reproduce --list"):
        load_table("ldam")
    table = tmp_path / "t.yaml"
    table.write_text("rows:\n  - {id: a, config: cifar10_lt/ce.yaml, paper: {metric: top1, all: 1, source: s, selection: f}}\n")
    with pytest.raises(ConfigError, match=r"rows\[0\] \(a\): paper.metric must be accuracy or error"):
        load_table(str(table))
    table.write_text("rows:\n  - {id: a, config: cifar10_lt/ce.yaml, paper: {metric: error, all: 1, source: s}}\n")
    with pytest.raises(ConfigError, match="paper.selection is required"):
        load_table(str(table))


def test_smoke_budget_runs_a_whole_table_with_its_two_stage_rows(tmp_path):
    write_cifar100(tmp_path / "data", train_per_class=100, test_per_class=2, noise=False)
    env = {**os.environ, "PYTHONPATH": str(Path(longtail.__file__).parents[1])}
    cmd = [sys.executable, "-m", "longtail", "reproduce", "wb", "--budget", "smoke", "--jobs", "2",
           "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "rep")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(longtail.__file__).parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "Budget `smoke`" in table
    rows = [line for line in table.splitlines() if line.startswith("| WB stage 2")]
    assert len(rows) == 1 and "| 53.1 |" in rows[0] and "| 1, best_test, flip TTA |" in rows[0]
    assert (tmp_path / "rep" / "wb_stage2,seed=0" / "results.json").exists()
    # Rerun: every run is finished and skipped, the table is rendered again.
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(longtail.__file__).parents[1])
    assert again.returncode == 0 and "0 ran, 4 already finished" in again.stdout and "0 ran, 2 already finished" in again.stdout


# --------------------------------------------------------------------------- reproduce TABLE --from DIR

TINY = [*TINY_MLP, "train.epochs=2", "train.log_every=2"]


@pytest.fixture(scope="module")
def evidence(tmp_path_factory, data_root):
    """A table of two tiny recipes and a folder of recorded runs: CE seeds 0 and 1, LDAM seed 0 in a folder
    named like a CE run and trained with other speed keys, and a CE run of other length that matches no row."""
    from longtail.config import load_config
    from longtail.engine import fit

    base = tmp_path_factory.mktemp("evidence")
    (base / "configs" / "tables").mkdir(parents=True)
    (base / "configs" / "fm_ce.yaml").write_text("\n".join(TINY_YAML) + "\n")
    (base / "configs" / "fm_ldam.yaml").write_text("\n".join(TINY_YAML + ["loss:", "  name: ldam"]) + "\n")
    (base / "configs" / "tables" / "t.yaml").write_text(
        "title: tiny\nrows:\n"
        "  - {id: ce, config: fm_ce.yaml, paper: {label: CE row, metric: accuracy, all: 50.0, source: s1, selection: best}}\n"
        "  - {id: ldam, config: fm_ldam.yaml, paper: {label: LDAM row, metric: error, all: 40.0, source: s2, selection: f}}\n"
        "  - {id: none, config: fm_ce.yaml, overrides: [data.imbalance=10], paper: {label: IF10 row, metric: accuracy, all: null, source: s3, selection: f}}\n")
    root = base / "runs"
    fit(load_config(None, TINY), root / "cifar" / "ce-seed0", data_root=data_root)
    fit(load_config(None, [*TINY, "train.seed=1"]), root / "cifar" / "ce-seed1", data_root=data_root)
    fit(load_config(None, [*TINY, "loss.name=ldam", "train.log_every=1", "train.channels_last=true"]),
        root / "ce-seed2", data_root=data_root)
    other = root / "longer"
    other.mkdir()
    for name in ("config.yaml", "results.json", "metrics.jsonl"):
        (other / name).write_text((root / "cifar" / "ce-seed0" / name).read_text())
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace("epochs: 2\n", "epochs: 3\n"))
    return base / "configs" / "tables" / "t.yaml", root


TINY_YAML = ["data:", "  name: fashion_mnist_lt", "  imbalance: 5", "  batch_size: 16", "model:", "  name: mlp",
             "  width: 32", "train:", "  epochs: 2", "optim:", "  lr: 0.05", "eval:", "  batch_size: 64"]


def _final_and_best(run):
    import json
    tops = [json.loads(line)["test"]["top1"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run / "results.json").read_text())["top1"], max(tops)


def test_from_shows_recorded_runs_beside_the_paper_matched_by_config_not_folder(evidence, capsys):
    import statistics
    from longtail.cli import main

    table, root = evidence
    before = sorted(p for p in root.rglob("*"))
    assert main(["reproduce", str(table), "--from", str(root)]) == 0
    out = capsys.readouterr().out
    assert sorted(p for p in root.rglob("*")) == before  # nothing re-run, nothing written
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}

    finals, bests = zip(*[_final_and_best(root / "cifar" / f"ce-seed{s}") for s in (0, 1)])
    ce = rows["CE row"]
    assert ce[1] == "50" and ce[8] == "0, 1" and ce[9] == "cifar/ce-seed0, cifar/ce-seed1"
    assert ce[2] == f"{statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f} (final)"
    assert ce[3] == f"{statistics.mean(finals) - 50:+.2f}"
    assert ce[4] == f"{statistics.mean(bests):.2f} ± {statistics.stdev(bests):.2f}"
    assert ce[5] == f"{statistics.mean(bests) - 50:+.2f}" and all(b >= f for f, b in zip(finals, bests))
    assert ce[6].count("±") == 1 and ce[7].count("±") == 1  # Many / Medium / Few (only Few is populated here), ECE

    final, best = _final_and_best(root / "ce-seed2")
    ldam = rows["LDAM row"]  # its folder is named like a CE run; the config says LDAM
    assert ldam[1] == "60 (100 − error)" and ldam[9] == "ce-seed2" and ldam[8] == "0"
    assert ldam[2] == f"{final:.2f} (final)" and ldam[4] == f"{best:.2f}" and ldam[5] == f"{best - 60:+.2f}"
    assert rows["IF10 row"][2] == "no recorded run" and rows["IF10 row"][3] == "paper number unknown"
    assert "match no row of this table: longer" in out

    made = {r[0].strip("| "): r for r in (line.split(" | ") for line in out.split("How each run was made")[1].splitlines()
                                           if line.startswith("| "))}
    assert list(made)[1:] == ["cifar/ce-seed0", "cifar/ce-seed1", "ce-seed2"]  # the rows' runs, not `longer`
    records = [json.loads(line) for line in (root / "ce-seed2" / "metrics.jsonl").read_text().splitlines()]
    best_record = next(r for r in records if r["test"]["top1"] == best)
    cells = made["ce-seed2"]
    assert cells[2] == f"{best_record['epoch']} of 2"
    assert cells[3] == " / ".join("—" if best_record["test"][k] is None else f"{best_record['test'][k]:.2f}"
                                  for k in ("top1", "many", "medium", "few"))
    results = json.loads((root / "ce-seed2" / "results.json").read_text())
    assert cells[5] == "1" and cells[7] == results["environment"]["cpu"] and cells[9] == "float32 + channels_last"
    minutes = round(sum(r["epoch_seconds"] for r in records) / 60)
    assert cells[11].strip(" |") == f"{minutes // 60}h{minutes % 60:02d}m"


def test_runs_of_one_seed_in_two_precisions_get_a_line_each_and_twins_are_refused(evidence, tmp_path, capsys):
    import shutil
    from longtail.cli import main

    table, root = evidence
    shutil.copytree(root / "cifar" / "ce-seed0", tmp_path / "ce-seed0")
    twin = tmp_path / "ce_bf16-seed0"
    shutil.copytree(root / "cifar" / "ce-seed0", twin)
    config = (twin / "config.yaml").read_text()
    assert "  amp: false\n" in config and "  amp_dtype: float16\n" in config
    (twin / "config.yaml").write_text(config.replace("  amp: false\n", "  amp: true\n")
                                      .replace("  amp_dtype: float16\n", "  amp_dtype: bfloat16\n"))
    assert main(["reproduce", str(table), "--from", str(tmp_path)]) == 0
    lines = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| CE row")]
    assert [(c[0], c[8], c[9]) for c in lines] == [("| CE row (float32)", "0", "ce-seed0"),
                                                 ("| CE row (bfloat16)", "0", "ce_bf16-seed0")]
    assert "±" not in lines[0][2] and "±" not in lines[1][2]  # one seed each: no mean over the twins

    (twin / "config.yaml").write_text(config)  # now the same seed and precision twice
    assert main(["reproduce", str(table), "--from", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ce-seed0, ce_bf16-seed0" in err and "same seed and precision (float32)" in err


def test_from_a_folder_without_runs_is_refused(tmp_path, capsys):
    from longtail.cli import main

    assert main(["reproduce", "ldam_drw", "--from", str(tmp_path / "missing")]) == 2
    assert "--from" in capsys.readouterr().err
    assert main(["reproduce", "ldam_drw", "--from", str(tmp_path)]) == 2
    assert "no run directories under it" in capsys.readouterr().err
