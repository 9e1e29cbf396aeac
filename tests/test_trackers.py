"""train.loggers: TensorBoard's hparams and the CSV files, MLflow against a local SQLite store and W&B offline
(nothing sent), each continued by --resume without repeating the epochs it replays; rank 0 alone logs under
torchrun; a tracker that cannot start stops the run before it trains."""
import csv
import io
import json
import os
import re
import socket
import sys
import threading

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from launch import launch
from longtail.cli import main
from longtail.config import load_config
from longtail.engine import fit
from longtail.errors import ConfigError
from longtail.training import fit as fit_module
from longtail.training.trackers import open_trackers
from tiny import TINY_MLP

TINY = [*TINY_MLP, "train.epochs=3", "train.log_every=4"]


class Sink:
    """A local server that counts the connections made to it: W&B's API address in these tests."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            self.connections += 1
            conn.close()


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """MLflow's store a SQLite file and W&B's API a sink (W&B's mode and directory left to longtail's defaults);
    yields the sink."""
    sink = Sink()
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("WANDB_BASE_URL", sink.url)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing into the home directory
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    yield sink
    sink.server.close()


def _killed_after_epoch_2_record(out, cfg, data_root, monkeypatch):
    """Train `cfg` into `out` until the end of epoch 2, killed after its record and before its checkpoint: the
    resumed run replays epoch 2."""
    save = fit_module.save_checkpoint

    def save_or_die(loop, epochs_done, partial=None):
        if epochs_done == 2:
            raise KeyboardInterrupt("killed before the checkpoint")
        save(loop, epochs_done, partial)

    monkeypatch.setattr(fit_module, "save_checkpoint", save_or_die)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, out, data_root=data_root)
    monkeypatch.setattr(fit_module, "save_checkpoint", save)


def _config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("")
    return str(path)


def _rows(path):
    return list(csv.DictReader(io.StringIO(path.read_text())))


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_tensorboard_hparams_and_csv_rows_over_a_resume(tmp_path, data_root, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(None, [*TINY, "train.loggers=[tensorboard,csv]"])
    _killed_after_epoch_2_record(out, cfg, data_root, monkeypatch)
    assert [row["epoch"] for row in _rows(out / "metrics.csv")] == ["1", "2"]
    fit(cfg, out, resume=True, data_root=data_root)
    results, records = json.loads((out / "results.json").read_text()), _records(out)

    rows = _rows(out / "metrics.csv")  # epoch 2, recorded before the kill and replayed, is there once
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    for row, record in zip(rows, records):
        assert float(row["test/top1"]) == record["test"]["top1"] and float(row["train_loss"]) == record["train_loss"]
    (summary,) = _rows(out / "summary.csv")
    assert float(summary["final/top1"]) == results["top1"] and summary["train.epochs"] == "3"
    assert summary["model.name"] == "mlp" and summary["eval.thresholds"] == "null"

    events = EventAccumulator(str(out))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.epochs"].number_value == 3 and start.hparams["optim.lr"].number_value == 0.05
    assert start.hparams["model.name"].string_value == "mlp"
    assert start.hparams["train.loggers"].string_value == '["tensorboard", "csv"]'
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"final/top1", "final/ece", "final/few"} <= {info.name.tag for info in experiment.metric_infos}
    assert events.Scalars("final/top1")[-1].value == pytest.approx(results["top1"])
    assert sorted({e.step for e in events.Scalars("test/top1")}) == [1, 2, 3]


@pytest.mark.e2e
def test_mlflow_and_wandb_record_the_run_and_a_resume_continues_the_same_runs(tmp_path, data_root, monkeypatch,
                                                                             stores):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    cfg = load_config(None, [*TINY, "train.loggers=[mlflow,wandb]"])
    _killed_after_epoch_2_record(out, cfg, data_root, monkeypatch)
    first = json.loads((out / "trackers.json").read_text())
    client = MlflowClient()
    assert client.get_run(first["mlflow"]["run_id"]).info.status == "KILLED"
    fit(cfg, out, resume=True, data_root=data_root)
    results, records = json.loads((out / "results.json").read_text()), _records(out)
    assert json.loads((out / "trackers.json").read_text()) == first

    (run,) = client.search_runs([client.get_experiment_by_name("longtail").experiment_id])
    assert run.info.run_id == first["mlflow"]["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3" and run.data.params["model.name"] == "mlp"
    assert run.data.tags["longtail.run_dir"] == str(out.resolve())
    top1 = client.get_metric_history(run.info.run_id, "test/top1")
    assert sorted({m.step for m in top1}) == [1, 2, 3]  # epoch 2 twice (before the kill and replayed): same step
    assert [m.value for m in top1 if m.step == 3] == [records[2]["test"]["top1"]]
    assert run.data.metrics["final/top1"] == results["top1"] and run.data.metrics["final/ece"] == results["ece"]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 3 * 13 // 4

    # Offline, in the run directory: one folder per attempt, both of the one run id that `wandb sync` joins.
    wandb_id = first["wandb"]["id"]
    attempts = sorted((out / "wandb").glob("offline-run-*"))
    # W&B names a folder by the second it starts in: two attempts in one second give the second a `-1` suffix.
    assert len(attempts) == 2 and all(re.search(rf"-{wandb_id}(-\d+)?$", a.name) for a in attempts)
    written = [(a / f"run-{wandb_id}.wandb").read_bytes() for a in attempts]
    assert all(b"train.epochs" in w and b"test" in w for w in written) and b"final/top1" in written[1]


def test_a_missing_package_names_its_extra_before_anything_is_loaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow fails, as where it is not installed
    out = tmp_path / "run"
    code = main(["train", _config(tmp_path), "--out", str(out), *TINY, "data.root=/nonexistent",
                 "train.loggers=[tensorboard,mlflow]"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()  # before the (missing) data was looked for
    assert "train.loggers: mlflow needs the mlflow package" in err and "pip install 'longtail[mlflow]'" in err


@pytest.mark.e2e
def test_an_unwritable_store_stops_the_run_before_it_trains(tmp_path, data_root, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    out = tmp_path / "run"
    code = main(["train", _config(tmp_path), "--out", str(out), "--data-root", str(data_root), *TINY, "train.loggers=[csv,mlflow]"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"train.loggers: mlflow could not start (tracking store sqlite:///{tmp_path / 'a_file'}" in err
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()


def test_a_resume_in_another_mlflow_store_says_which_store_the_run_is_in(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a store that opens in milliseconds
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "other").as_uri())
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    out = tmp_path / "run"
    out.mkdir()
    saved = {"run_id": "0123456789abcdef0123456789abcdef", "tracking_uri": "sqlite:///elsewhere/mlflow.db"}
    (out / "trackers.json").write_text(json.dumps({"mlflow": saved}))
    with pytest.raises(ConfigError, match="is not in the tracking store .*other; set "
                                          "MLFLOW_TRACKING_URI=sqlite:///elsewhere/mlflow.db"):
        open_trackers(load_config(None, ["train.loggers=[mlflow]"]), out, epochs_done=1)


def test_loggers_are_checked_with_the_config():
    with pytest.raises(ConfigError, match=r"train.loggers\[1\]: 'comet' is not allowed; choose one of: tensorboard"):
        load_config(None, ["train.loggers=[csv, comet]"])
    with pytest.raises(ConfigError, match="train.loggers: csv listed twice"):
        load_config(None, ["train.loggers=[csv, tensorboard, csv]"])
    assert load_config(None, []).train.loggers == ["tensorboard"]
    assert load_config(None, ["train.loggers=[]"]).train.loggers == []


@pytest.mark.e2e
def test_under_torchrun_rank_0_alone_logs_and_nothing_is_sent(tmp_path, data_root, monkeypatch, stores):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    config, out = _config(tmp_path), tmp_path / "run"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a store that opens in milliseconds, not SQLite's seconds
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    env = {**{k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")},
           "LONGTAIL_DATA": str(data_root), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done, _ = launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                      "-m", "longtail", "train", config, *TINY_MLP, "train.epochs=1", "--out", out,
                      "train.loggers=[tensorboard,csv,mlflow,wandb]"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(out.glob("events.out.tfevents.*"))) == 1 and len(_rows(out / "metrics.csv")) == 1
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    client = MlflowClient()
    assert len(client.search_runs([client.get_experiment_by_name("longtail").experiment_id])) == 1
    assert stores.connections == 0  # nothing reached W&B's API, also as the processes exited (W&B reports usage then)
