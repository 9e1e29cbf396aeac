"""What a person sees while a command works: bars on a terminal, plain lines in a log file, nothing with --quiet."""
import io
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from longtail import progress
from longtail.inference import collect_features
from longtail.config import load_config
from longtail.data import build_data
from longtail.engine import collect_logits
from longtail.methods.posthoc import search_tau
from longtail.models import build_model
from longtail.progress import Progress, duration, mode, say, track
from tiny import TINY_MLP

TINY = [*TINY_MLP, "train.epochs=2", "train.log_every=3"]


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as tqdm and `progress.mode` ask."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def not_quiet():
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)


def test_mode_is_decided_by_stderr_quiet_and_rank(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert mode() == "bar"
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert mode() == "lines"
    monkeypatch.setenv("RANK", "1")  # a torchrun worker other than rank 0
    assert mode() == "off"
    monkeypatch.setenv("RANK", "0")
    progress.set_quiet(True)
    assert mode() == "off"


def test_a_file_gets_plain_lines_and_an_end_line(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)  # a line at every update
    with Progress(4, "evaluate test", "img") as bar:
        bar.update(3)
        bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("evaluate test: 3/4 img, ") and ", ETA " in lines[0]
    assert lines[1].startswith("evaluate test: 4/4 img, ")
    assert lines[2].startswith("evaluate test: 4 img in ")


def test_a_short_phase_writes_nothing_to_a_file(capsys):
    with Progress(4, "evaluate test", "img") as bar:  # far quicker than LINE_EVERY
        bar.update(4)
    assert capsys.readouterr().err == ""


def test_a_terminal_bar_shows_the_current_count_with_its_values(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with Progress(5, "epoch 1/2", "step") as bar:
        for _ in range(3):
            bar.update()
        bar.note("loss 0.5000")  # refreshes at once: the count must be 3, not tqdm's lazily kept 0
        shown = terminal.getvalue().split("\r")[-1]
    assert "3/5 step" in shown and "loss 0.5000" in shown


def _cells(line: str) -> int:
    """The bar's cells: between its two `|`."""
    return len(line.split("|")[1])


@pytest.mark.parametrize("width,shown,left_out", [
    (60, ["loss 6.9078"], ["img/s", "ETA", "lr"]),
    (80, ["loss 6.9078", "12345 img/s", "ETA 1h02m"], ["lr"]),
    (120, ["loss 6.9078", "12345 img/s", "ETA 1h02m", "lr 1.00e-01"], []),
])
def test_a_narrow_terminal_keeps_a_readable_bar_and_leaves_out_the_last_values(width, shown, left_out):
    # The widest training readout: a 100-epoch run of 4882 steps (ImageNet-LT at batch 64 on a GPU).
    bar = progress.FittedBar(total=4882, initial=2441, desc="epoch 100/100", unit="step", file=io.StringIO(),
                             ncols=width, bar_format=progress.BAR_FORMAT)
    bar.values = ("loss 6.9078", "12345 img/s", "ETA 1h02m", "lr 1.00e-01")
    line = str(bar)
    bar.close()
    assert len(line) <= width and _cells(line) >= progress.MIN_BAR
    assert line.startswith("epoch 100/100 |") and "| 2441/4882 step, " + ", ".join(shown) in line
    assert not any(value in line for value in left_out)


def test_a_terminal_download_shows_bytes_time_left_and_rate(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    with Progress(170498071, "cifar-10-python.tar.gz", "B") as bar:
        bar.update(8 << 20)
        time.sleep(1.05)  # tqdm measures the rate once a second
        bar.update(8 << 20)
        line = str(bar.bar)
    assert line.startswith("cifar-10-python.tar.gz |") and "| 16.0M/163M B, ETA " in line
    assert line.endswith(" MiB/s")


def test_a_download_in_a_log_file_writes_a_line_each_tenth(tmp_path, monkeypatch, capsys):
    from longtail.data import download

    payload = bytes(range(256)) * 400  # 100 KiB
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "x.bin").write_bytes(payload)
    monkeypatch.setattr(download, "CHUNK", 3 << 10)  # 3 KiB reads: 34 of them
    remote = download.Remote("x.bin", ((tmp_path / "served" / "x.bin").as_uri(),), download.md5sum(tmp_path / "served" / "x.bin"))
    assert download.fetch(remote, tmp_path / "root").read_bytes() == payload
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0] == f"downloading {remote.urls[0]}"
    tenths = [line for line in lines[1:-1]]
    assert len(tenths) == 9 and all(line.startswith("x.bin: ") and " of 100.0 KiB (" in line for line in tenths)
    percents = [int(line.split("(")[1].split(" %")[0]) for line in tenths]
    assert [p // 10 for p in percents] == list(range(1, 10))  # one line in each further tenth
    assert all(" KiB/s, ETA " in line or " MiB/s, ETA " in line for line in tenths)
    assert lines[-1].startswith("x.bin: 100.0 KiB in ") and lines[-1].endswith("/s")
    progress.set_quiet(True)  # --quiet: nothing
    download.fetch(download.Remote("y.bin", remote.urls, remote.md5), tmp_path / "root")
    assert capsys.readouterr().err == f"downloading {remote.urls[0]}\n"


def test_quiet_and_other_ranks_show_nothing(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    progress.set_quiet(True)
    assert list(track([1, 2, 3], "search tau", "tau")) == [1, 2, 3]
    say("epoch 1/2 | loss 1.0")
    progress.set_quiet(False)
    monkeypatch.setenv("RANK", "1")
    say("epoch 1/2 | loss 1.0")
    assert capsys.readouterr() == ("", "")


def test_track_counts_each_item_once_it_is_done(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    written = []
    for item in track(["a", "b"], "read runs", "runs"):
        written.append(capsys.readouterr().err)  # what was written before this item's work
    written.append(capsys.readouterr().err)
    counts = [[line.split(",")[0] for line in err.splitlines()] for err in written]
    assert counts == [[], ["read runs: 1/2 runs"], ["read runs: 2/2 runs", "read runs: 2 runs in 0s"]]


def test_the_tau_searches_report_each_tau(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    logits, targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    search_tau(logits, targets, torch.tensor([0.9, 0.1], dtype=torch.float64), "additive", [0.0, 1.0, 0.5])
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == [
        "posthoc: search tau: 1/3 tau", "posthoc: search tau: 2/3 tau", "posthoc: search tau: 3/3 tau",
        "posthoc: search tau: 3 tau in 0s"]


def test_durations_read_as_hours_minutes_seconds():
    assert [duration(s) for s in (0, 42.4, 307, 3720, -1)] == ["0s", "42s", "5m07s", "1h02m", "0s"]


def test_evaluation_and_feature_collection_report_their_images(monkeypatch, capsys, data_root):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    cfg = load_config(None, TINY)
    data = build_data(cfg.data, data_root)
    model = build_model(cfg.model, data.num_classes, data.in_channels, data.image_size)
    collect_logits(model, data.test, torch.device("cpu"), batch_size=64, desc="evaluate test")
    collect_features(model, data.test, torch.device("cpu"), batch_size=64, desc="features test")
    err = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in err] == [
        "evaluate test: 64/100 img", "evaluate test: 100/100 img", "evaluate test: 100 img in 0s",
        "features test: 64/100 img", "features test: 100/100 img", "features test: 100 img in 0s"]


def _train(tmp_path, data_root, *extra, terminal=False, columns=120):
    """`longtail train` in a fresh process, its stdout and stderr as a file (or a pseudo-terminal) gets them."""
    cmd = [sys.executable, "-m", "longtail", "train", "configs/fashion_mnist_lt/ce.yaml", *TINY,
           "--out", str(tmp_path / "run"), *extra]
    env = {**os.environ, "LONGTAIL_DATA": str(data_root)}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not terminal:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout, proc.stderr
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, and tqdm draws nothing into no columns.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen(cmd, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=root)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait() == 0, seen.decode()
    return seen.decode(), ""


def test_a_log_file_of_a_run_reads_line_by_line(tmp_path, data_root):
    out, err = _train(tmp_path, data_root)
    assert "\r" not in out and "\r" not in err
    lines = out.splitlines()
    assert lines[0].startswith(f"run {tmp_path / 'run'}: fashion_mnist_lt")
    # 199 images in batches of 16: 13 steps per epoch; a line at steps 1, 4, 7, 10 (train.log_every=3),
    # then the epoch's own line, then the results table.
    for epoch in (1, 2):
        steps = [line for line in lines if line.startswith(f"epoch {epoch}/2 | step ")]
        assert [line.split(" | ")[1] for line in steps] == ["step 1/13", "step 4/13", "step 7/13", "step 10/13"]
        assert all(" | loss " in line and " | lr " in line and " img/s | ETA " in line for line in steps)
        (summary,) = [line for line in lines if line.startswith(f"epoch {epoch}/2 | loss ")]
        assert " | test top1 " in summary and " | ETA " in summary
    assert lines[-3].startswith("| Run | All |")


def test_a_terminal_gets_bars_and_no_plain_step_lines(tmp_path, data_root):
    seen, _ = _train(tmp_path, data_root, terminal=True, columns=80)
    assert "\r" in seen
    assert "| step 1/13 |" not in seen
    assert "epoch 2/2 | loss " in seen and "| Run | All |" in seen
    # The bar as an 80-column terminal draws it: ten cells or more, then the count, loss, images/s and
    # the run's time left, and lr where it still fits.
    bars = [part.strip("\n\x1b[A") for part in re.split(r"[\r\n]", seen) if part.startswith("epoch 1/2 |")]
    assert bars and all(len(bar) <= 80 for bar in bars)
    drawn = [bar for bar in bars if ", loss " in bar]
    assert drawn and all(len(bar.split("|")[1]) >= progress.MIN_BAR for bar in drawn)
    assert re.search(r"\| \d+/13 step, loss \d\.\d{4}, \d+ img/s, ETA \S+(, lr \S+)?$", drawn[-1]), drawn[-1]


def test_quiet_prints_only_the_final_table(tmp_path, data_root):
    out, err = _train(tmp_path, data_root, "--quiet")
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("| Run | All |") and lines[2].startswith("| erm/ce (test, final) |")
