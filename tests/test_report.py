"""`longtail report`: one Markdown row per recipe, seeds merged into mean ± std."""
import json
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
