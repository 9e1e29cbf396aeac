"""`longtail report`: one Markdown row per recipe, seeds merged into mean ± std."""
import json
import math
import statistics
from pathlib import Path

import pytest

from longtail.config import load_config
from longtail.errors import ConfigError
from longtail.report import _mean_per_class, plot_report, report


def _run(tmp_path, name, overrides, top1, few=None, posthoc=None):
    cfg = load_config(None, overrides)
    out = tmp_path / name
    out.mkdir()
    results = {
        "top1": top1, "balanced": top1, "many": top1 + 10, "medium": None, "few": few, "ece": 5.0, "nll": 1.0,
        "seed": cfg.train.seed, "dataset": cfg.data.name, "imbalance": cfg.data.imbalance, "model": cfg.model.name,
        "method": cfg.method.name, "loss": cfg.loss.name, "epochs": cfg.train.epochs, "checkpoint": cfg.eval.select,
        "posthoc": posthoc, "config": cfg.to_dict(),
    }
    (out / "results.json").write_text(json.dumps(results))
    return str(out)


def _rows(table):
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_seeds_are_grouped_into_mean_and_std(tmp_path):
    runs = [_run(tmp_path, f"ce-s{seed}", [f"train.seed={seed}", "train.device=cpu" if seed else "train.device=auto"],
                 top1, few=top1 / 2) for seed, top1 in enumerate([70.0, 72.0, 74.0])]
    runs.append(_run(tmp_path, "ce-wd", ["optim.weight_decay=0.005"], 75.5))
    rows = _rows(report(runs))
    assert len(rows) == 2
    first, second = rows
    assert first["Run"].endswith("ce-s0") and first["Seeds"] == "0, 1, 2"
    assert first["All"] == f"72.00 ± {statistics.stdev([70, 72, 74]):.2f}"
    assert first["Few"] == f"36.00 ± {statistics.stdev([35, 36, 37]):.2f}"
    assert first["Medium"] == "—" and first["tau"] == "—"
    assert second["All"] == "75.50" and "wd 0.005" in second["Recipe"] and second["Model"] == "resnet32"


def test_a_run_saved_before_a_key_existed_groups_with_runs_that_spell_out_its_default(tmp_path):
    runs = [_run(tmp_path, f"s{seed}", [f"train.seed={seed}"], 70.0 + seed) for seed in (0, 1)]
    old = json.loads((Path(runs[0]) / "results.json").read_text())
    del old["config"]["optim"]["wd_exclude_bn_bias"]  # as if written by a version without that key
    (Path(runs[0]) / "results.json").write_text(json.dumps(old))
    assert [r["Seeds"] for r in _rows(report(runs))] == ["0, 1"]


def test_tau_and_stage2_runs_group_by_their_stage1_recipe(tmp_path):
    stage1 = [_run(tmp_path, f"s1-{seed}", [f"train.seed={seed}"], 60.0) for seed in (0, 1)]
    stage2 = [_run(tmp_path, f"s2-{seed}", [f"train.seed={seed}", "method.name=wb_stage2", f"method.init_from={s}",
                                            "eval.select=best_val", "data.val_per_class=20"],
                   65.0 + seed, posthoc={"kind": "multiplicative", "tau": 1.0 + seed / 10})
              for seed, s in enumerate(stage1)]
    other = _run(tmp_path, "s1-other", ["optim.weight_decay=0.1"], 50.0)
    odd = _run(tmp_path, "s2-odd", ["method.name=wb_stage2", f"method.init_from={other}", "eval.select=best_val",
                                    "data.val_per_class=20"], 40.0)
    rows = _rows(report([*stage2, odd]))
    assert [r["Seeds"] for r in rows] == ["0, 1", "0"]
    assert rows[0]["tau"] == f"1.05 ± {statistics.stdev([1.0, 1.1]):.2f}"
    assert rows[0]["Epochs"] == "200 (best_val)" and "multiplicative LA" in rows[0]["Recipe"]


def test_tau_normalisation_runs_show_their_tau(tmp_path):
    runs = [_run(tmp_path, f"tn-{seed}", [f"train.seed={seed}", "method.name=tau_norm", "method.tau_norm_tau=null",
                                          "data.val_per_class=20"], 60.0) for seed in (0, 1)]
    for run, tau in zip(runs, (0.5, 0.7)):
        path = Path(run) / "results.json"
        results = json.loads(path.read_text())
        results["method_record"] = {"tau_norm": {"tau": tau, "searched": True}}
        path.write_text(json.dumps(results))
    (row,) = _rows(report(runs))
    assert row["tau"] == f"0.60 ± {statistics.stdev([0.5, 0.7]):.2f}"


def test_a_directory_without_results_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no results.json"):
        report([str(tmp_path)])


@pytest.mark.parametrize("content", [b"", b'{"top1": 50.0, "balan', b"[1, 2]"])
def test_a_truncated_or_empty_results_json_is_one_line_naming_it(tmp_path, capsys, content):
    from longtail.cli import main

    good = _run(tmp_path, "good", [], 50.0)
    bad = _run(tmp_path, "bad", [], 40.0)
    (Path(bad) / "results.json").write_bytes(content)
    assert main(["report", good, bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{Path(bad) / 'results.json'}" in err


def test_data_column_shows_the_measured_imbalance_under_profile_none(tmp_path):
    exp = _run(tmp_path, "exp", ["data.imbalance=50"], 60.0)
    natural = _run(tmp_path, "natural", ["data.profile=none", "data.name=imagenet_lt", "model.name=resnet50"], 40.0)
    path = Path(natural) / "results.json"
    old = json.loads(path.read_text())  # as written before the measured imbalance: data.imbalance's 100
    assert old["imbalance"] == 100
    old["class_counts"] = [1280] * 3 + [40] * 5 + [5] * 2  # ImageNet-LT's extremes: 1280 / 5 = 256
    path.write_text(json.dumps(old))
    rows = _rows(report([exp, natural]))
    assert rows[0]["Data"] == "cifar10_lt IF 50"
    assert rows[1]["Data"] == "imagenet_lt IF 256 (natural)"
    old["imbalance"] = 256.0  # as written now: measured
    path.write_text(json.dumps(old))
    assert _rows(report([natural]))[0]["Data"] == "imagenet_lt IF 256 (natural)"


def _seeded(tmp_path, name, overrides, top1s, few_offset=0.0):
    runs = []
    for seed, top1 in enumerate(top1s):
        run = _run(tmp_path, f"{name},seed={seed}", [*overrides, f"train.seed={seed}"], top1, few=top1 / 2 + few_offset)
        path = Path(run) / "results.json"
        results = json.loads(path.read_text())
        results.update(class_counts=[500, 100, 10], per_class=[top1 + 10, top1, None], thresholds=[100, 20],
                       environment={"commit": "0123456789abcdef", "torch": "2.13.0", "device": "cpu"}, world_size=1)
        path.write_text(json.dumps(results))
        runs.append(run)
    return runs


def test_baseline_rows_get_the_paired_difference_its_interval_and_p_value(tmp_path):
    ce = _seeded(tmp_path, "loss.name=ce", [], [70.0, 70.5, 73.0])
    la = _seeded(tmp_path, "loss.name=la", ["loss.name=la"], [72.0, 73.0, 75.0])
    lone = _seeded(tmp_path, "loss.name=bs", ["loss.name=bs"], [80.0])
    other = _seeded(tmp_path, "wd", ["optim.weight_decay=0.1"], [60.0])
    for run in other:  # another seed than any baseline run: no paired row
        path = Path(run) / "results.json"
        path.write_text(path.read_text().replace('"seed": 0', '"seed": 7').replace('"seed": 0', '"seed": 7'))
    text = report([*ce, *la, *lone, *other], baseline="loss.name=ce")
    paired_table = text.split("Paired differences")[1]
    rows = _rows("\n".join(paired_table.splitlines()[2:]))
    assert [r["Run"] for r in rows] == [la[0], lone[0]]
    # Differences 2, 2.5, 2: mean 2.1667, sd 0.2887, t = 13.0 on 2 df: p = 1 - 13 / sqrt(171) = 0.00587;
    # half-width 4.3027 (the 97.5 % t quantile, 2 df) x 0.2887 / sqrt(3) = 0.717.
    assert rows[0]["Shared seeds"] == "0, 1, 2"
    assert rows[0]["All"] == "+2.17 [+1.45, +2.88] p=0.00587"
    assert rows[0]["Few"] == "+1.08 [+0.72, +1.44] p=0.00587"
    assert rows[0]["Medium"] == "—"  # not recorded
    assert rows[1]["Shared seeds"] == "0" and rows[1]["All"] == "+10.00 (1 seed)"
    with pytest.raises(ConfigError, match="no row has that run directory or sweep point name"):
        report(ce, baseline="loss.name=focal")


def test_student_t_matches_tables():
    from longtail.stats import paired, t_quantile, t_two_sided_p

    for df, q in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)]:
        assert abs(t_quantile(0.975, df) - q) < 1e-4
    assert abs(t_two_sided_p(2.0, 5) - 0.101939) < 1e-6  # P(|T| > 2), 5 df
    assert abs(t_two_sided_p(1.0, 1) - 0.5) < 1e-12  # Cauchy: P(|T| > 1) = 1/2
    assert paired([1.0, 2.0], [1.0, 2.0]).p is None  # no spread: no test


def test_csv_has_means_stds_and_paired_columns(tmp_path):
    import csv
    import io

    from longtail.report import report_csv

    ce = _seeded(tmp_path, "loss.name=ce", [], [70.0, 72.0])
    la = _seeded(tmp_path, "loss.name=la", ["loss.name=la"], [71.0, 75.0])
    rows = list(csv.DictReader(io.StringIO(report_csv([*ce, *la], baseline=ce[0]))))
    assert [r["run"] for r in rows] == [ce[0], la[0]]
    assert float(rows[1]["top1_mean"]) == 73.0 and float(rows[1]["top1_std"]) == round(statistics.stdev([71, 75]), 4)
    assert float(rows[1]["top1_diff"]) == 2.0 and rows[1]["shared_seeds"] == "0 1"
    assert rows[0]["top1_diff"] == "" and rows[1]["medium_diff"] == ""
    # Differences 1, 3: mean 2, standard error 1, t = 2 on 1 df (Cauchy): p = 1 - (2 / pi) atan(2).
    assert float(rows[1]["top1_p"]) == pytest.approx(1 - 2 / math.pi * math.atan(2), rel=1e-3)  # 4 digits


def test_html_is_one_page_with_the_tables_and_a_per_class_plot_per_row(tmp_path):
    from html.parser import HTMLParser

    from longtail.report_html import report_html

    ce = _seeded(tmp_path, "loss.name=ce", [], [70.0, 72.0])
    la = _seeded(tmp_path, "loss.name=la", ["loss.name=la"], [71.0, 75.0])
    page = report_html([*ce, *la], baseline="loss.name=ce")

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.cells, self.circles, self.external = [], [], [], []
            self._in_cell = False

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.tags.append(tag)
            self._in_cell = tag in ("td", "th")
            if tag == "circle":
                self.circles.append(attrs)
            if tag in ("script", "link", "img") or "src" in attrs:
                self.external.append(tag)

        def handle_data(self, data):
            if self._in_cell:
                self.cells.append(data)

        def handle_endtag(self, tag):
            self._in_cell = False

    parsed = Page()
    parsed.feed(page)
    assert parsed.tags.count("table") == 2 and parsed.tags.count("svg") == 2 and not parsed.external
    assert "71.00 ± 1.41" in parsed.cells and "73.00 ± 2.83" in parsed.cells
    assert "+2.00 [-10.71, +14.71] p=0.295" in parsed.cells and "0123456789" in parsed.cells
    # Per row, one dot per class with a test accuracy (the third has none), coloured by its group.
    assert [c["class"] for c in parsed.circles] == ["many", "medium"] * 2
    ys = [float(c["cy"]) for c in parsed.circles]
    assert ys[0] < ys[1]  # the head class is more accurate: higher on the page


def test_show_env_adds_commit_torch_device_and_world_size(tmp_path):
    ce = _seeded(tmp_path, "loss.name=ce", [], [70.0, 72.0])
    old = _run(tmp_path, "old", ["loss.name=la"], 70.0)  # written before the environment was recorded
    rows = _rows(report([*ce, old], show_env=True))
    assert (rows[0]["Commit"], rows[0]["torch"], rows[0]["Device"], rows[0]["World size"]) == \
        ("0123456789", "2.13.0", "cpu", "1")
    assert rows[1]["Commit"] == "—" and rows[1]["World size"] == "—"


def _with_per_class(run, per_class, class_counts, class_names=None):
    """Add what `report --plot` reads to a fake run's results.json (class_names: absent, as in older runs)."""
    path = Path(run) / "results.json"
    results = json.loads(path.read_text())
    results.update(per_class=per_class, class_counts=class_counts, thresholds=[1000, 200])
    if class_names is not None:
        results["class_names"] = class_names
    path.write_text(json.dumps(results))
    return run


def test_plot_draws_every_row_and_averages_seeds(tmp_path):
    counts = [5000, 1500, 600, 100]
    ce = [_with_per_class(_run(tmp_path, f"ce-s{seed}", [f"train.seed={seed}"], 50.0), [90.0, 70.0, 10.0 * seed, None],
                          counts, ["plane", "car", "bird", "cat"]) for seed in (0, 1)]
    la = _with_per_class(_run(tmp_path, "la", ["loss.name=la"], 60.0), [80.0, 60.0, 50.0, 40.0], counts)
    out = plot_report([*ce, la], tmp_path / "per_class.png")
    assert out == str(tmp_path / "per_class.png")
    assert (tmp_path / "per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _mean_per_class([json.loads((Path(r) / "results.json").read_text()) for r in ce]) == [90.0, 70.0, 5.0, None]


def test_plot_refuses_runs_on_other_class_counts(tmp_path):
    a = _with_per_class(_run(tmp_path, "a", [], 50.0), [90.0, 10.0], [500, 50])
    b = _with_per_class(_run(tmp_path, "b", ["data.imbalance=50"], 50.0), [90.0, 10.0], [500, 10])
    with pytest.raises(ConfigError, match="b was trained on other class counts than .*a; the per-class figure"):
        plot_report([a, b], tmp_path / "per_class.png")
    assert not (tmp_path / "per_class.png").exists()


def _sweep(tmp_path):
    """A sweep's OUT as `longtail sweep` leaves it: point directories, logs/ and slurm/ beside them."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    ce = _seeded(sweep, "loss.name=ce", [], [70.0, 70.5, 73.0])
    la = _seeded(sweep, "loss.name=la", ["loss.name=la"], [72.0, 73.0, 75.0])
    for folder in ("logs", "slurm"):
        (sweep / folder).mkdir()
        (sweep / folder / "loss.name=ce,seed=0.log").write_text("$ longtail train ...\n")
    return sweep, ce, la


def test_a_sweep_folder_gives_its_runs_as_tensorboard_logdir_does(tmp_path, capsys):
    from longtail.cli import main

    sweep, ce, la = _sweep(tmp_path)
    named = report([*ce, *la], baseline="loss.name=ce")
    assert report([str(sweep)], baseline="loss.name=ce") == named
    # A shell glob passes logs/ and slurm/ too: they hold no run and add nothing.
    assert report(sorted(str(p) for p in sweep.glob("*")), baseline="loss.name=ce") == named
    assert main(["report", str(sweep), "--baseline", "loss.name=ce"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == named and f"| {la[0]} | 0, 1, 2 | +2.17 [+1.45, +2.88]" in out
    # Nested folders are searched at any depth; a run's own post-hoc result beneath it is a run too; a run
    # named twice counts once.
    posthoc = Path(_run(Path(la[0]), "posthoc-additive", ["loss.name=la", "posthoc.kind=additive"], 80.0,
                        posthoc={"kind": "additive", "tau": 1.0}))
    rows = _rows(report([str(tmp_path), ce[0]]))
    assert [r["Run"] for r in rows] == [ce[0], la[0], str(posthoc)]
    assert [r["Seeds"] for r in rows] == ["0, 1, 2", "0, 1, 2", "0"]


def test_unfinished_runs_in_a_folder_are_left_out_with_a_note_and_refused_when_named(tmp_path, capsys):
    sweep, ce, la = _sweep(tmp_path)
    running = sweep / "loss.name=la,seed=3"
    running.mkdir()
    (running / "config.yaml").write_text("train: {seed: 3}\n")
    assert report([str(sweep)]) == report([*ce, *la])
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"report: left out 1 unfinished run(s), without results.json: {running}")
    with pytest.raises(ConfigError, match=r"loss.name=la,seed=3: no results.json \(an unfinished run\)"):
        report([*ce, str(running)])
    with pytest.raises(ConfigError, match="logs: no results.json in it or in any folder beneath it"):
        report([str(sweep / "logs")])
    with pytest.raises(ConfigError, match="nowhere: no such directory"):
        report([str(tmp_path / "nowhere")])


def _with_more_history(run, records):
    with open(Path(run) / "metrics.jsonl", "w") as f:
        for epoch, few, ratios in records:
            f.write(json.dumps({"epoch": epoch, "train_loss": 1.0, "more_discrepancy_per_class": [1e-4, None, few],
                                "more_discrepancy": {"many": 1e-4, "medium": None, "few": few},
                                "more_layer_ratio": dict(zip("abc", ratios))}) + "\n")
        f.write(json.dumps({"epoch": epoch + 1, "train_loss": 0.5}) + "\n")  # untracked epochs add nothing


def test_more_runs_get_their_last_tracked_diagnostics_beside_the_table(tmp_path):
    plain = _seeded(tmp_path, "more.enabled=false", [], [70.0, 71.0])
    more = _seeded(tmp_path, "more.enabled=true", ["more.enabled=true", "train.track_every=10"], [70.5, 71.5])
    _with_more_history(more[0], [(10, 9.0, [1.0, 1.0, 1.0]), (20, 2e-3, [0.01, 0.03, 0.02])])
    _with_more_history(more[1], [(20, 4e-3, [0.02, 0.04, 0.03])])
    text = report([*plain, *more])
    assert "Paired differences" not in text
    rows = _rows("\n".join(text.split("MORE's diagnostics")[1].splitlines()[2:]))
    assert len(rows) == 1  # the plain row logged none
    row = rows[0]
    assert row["Run"] == more[0] and row["Seeds"] == "0, 1" and row["Epoch"] == "20"
    assert row["Discrepancy Many"] == "0.0001 ± 0" and row["Discrepancy Medium"] == "—"
    assert row["Discrepancy Few"] == f"0.003 ± {statistics.stdev([2e-3, 4e-3]):.2g}"
    assert row["Share median %"] == f"2.5 ± {statistics.stdev([2.0, 3.0]):.2g}"  # the middle layer, in %
    assert row["Share max %"] == f"3.5 ± {statistics.stdev([3.0, 4.0]):.2g}"
    assert "MORE's diagnostics" not in report(plain)
    from longtail.report_html import report_html
    page = report_html([*plain, *more])
    assert "<h2>MORE's diagnostics</h2>" in page and "<td>0.0001 ± 0</td>" in page
