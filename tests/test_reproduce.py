"""`longtail reproduce`: shipped tables load and plan under every budget, the rendering compares in the
paper's metric, and a whole table (with a two-stage row) runs on fake data at the smoke budget."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import longtail
from fake_data import write_cifar100
from longtail.errors import ConfigError
from longtail.reproduce import BUDGETS, Row, list_tables, load_table, plan_table, render, tables_dir

pytestmark = pytest.mark.e2e  # trains or runs whole commands: `pytest -m "not e2e"` leaves it out

TABLES = sorted(p.stem for p in tables_dir().glob("*.yaml"))


def test_the_issue_s_tables_are_shipped_and_listed():
    assert {"ldam_drw", "logit_adjustment", "wb", "ewb", "more"} <= set(TABLES)
    listing = list_tables()
    assert "ldam_drw             8 rows (3 with a published number)" in listing


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


def test_the_table_compares_in_the_paper_s_metric():
    rows = [Row("err", Path("x.yaml"), [], None, {"metric": "error", "all": 22.97, "source": "s", "selection": "final"}),
            Row("acc", Path("x.yaml"), [], None, {"metric": "accuracy", "all": 70.4, "few": 10.0, "source": "s",
                                                   "selection": "best test epoch"}),
            Row("new", Path("x.yaml"), [], None, {"metric": "accuracy", "all": None, "source": "s", "selection": "?"})]
    results = {"err": [{"top1": 76.0, "checkpoint": "final"}, {"top1": 78.0, "checkpoint": "final"}],
               "acc": [{"top1": 71.4, "few": 12.0, "checkpoint": "final"}],
               "new": [{"top1": 50.0, "checkpoint": "final"}]}
    text = render({"title": "t"}, rows, results, "short", {"err": 20, "acc": 20, "new": 20})
    lines = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert lines["err"][2:5] == ["22.97", "23.00 ± 1.41", "+0.03"]  # errors 24 and 22
    assert lines["acc"][2:5] == ["70.4", "71.40", "+1.00"] and lines["acc"][6] == "— / — / 12.00"
    assert lines["new"][2] == "unknown" and lines["new"][4] == "paper number unknown"
    assert "Budget `short`" in text and "not comparable" in text


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
