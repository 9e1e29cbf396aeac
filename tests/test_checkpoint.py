"""Checkpoints and logs: `read_jsonl` tolerates only a torn last line; damaged checkpoints say so."""
import errno
import json
import os
import tempfile
import zipfile

import pytest
import torch
from torch import nn

from longtail.checkpoint import (append_line, atomic_torch_save, atomic_write_json, atomic_write_text, load_checkpoint,
                                 read_jsonl)
from longtail.errors import ConfigError, LongtailError


def _lines(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_read_jsonl_reads_every_record_and_skips_blank_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines({"epoch": 1}, {"epoch": 2}) + "\n" + _lines({"epoch": 3}))
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]
    (tmp_path / "empty.jsonl").write_text("")
    assert read_jsonl(tmp_path / "empty.jsonl") == []


@pytest.mark.parametrize("torn", ['{"epoch": 3, "train_loss": 0.5', '{"epoch": 3, "tr', "{", '"epoch"', "3"])
def test_read_jsonl_drops_a_torn_last_line(tmp_path, torn):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines({"epoch": 1}, {"epoch": 2}) + torn)
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]


def test_read_jsonl_drops_a_torn_last_line_cut_inside_a_utf8_character(tmp_path):
    whole = _lines({"epoch": 1}).encode() + json.dumps({"epoch": 2, "name": "é"}, ensure_ascii=False).encode()
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(whole[:-3])  # cuts the two-byte 'é' in half
    assert read_jsonl(path) == [{"epoch": 1}]


def test_read_jsonl_rejects_a_damaged_line_before_the_last(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_lines({"epoch": 1}) + '{"epoch": 2, "tr\n' + _lines({"epoch": 3}))
    with pytest.raises(ConfigError, match=r"metrics\.jsonl, line 2: not a JSON object"):
        read_jsonl(path)
    path.write_text(_lines({"epoch": 1}) + "\n[1, 2]\n" + _lines({"epoch": 3}))
    with pytest.raises(ConfigError, match=r"metrics\.jsonl, line 3: not a JSON object"):
        read_jsonl(path)


def _saved_checkpoint(path):
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 8)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "rng": torch.get_rng_state()}
    atomic_torch_save(state, path)
    return state


def test_a_truncated_checkpoint_is_reported_as_truncated(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = _saved_checkpoint(path)
    assert load_checkpoint(path)["epoch"] == 3
    data = path.read_bytes()
    for length in (0, 1, 10, 100, len(data) // 2, len(data) - 30, len(data) - 1):
        cut = tmp_path / f"cut-{length}.pt"
        cut.write_bytes(data[:length])
        with pytest.raises(ConfigError) as info:
            load_checkpoint(cut)
        message = str(info.value)
        assert message.startswith(f"checkpoint {cut} is truncated or corrupt ({length} bytes, "), (length, message)
        assert message.endswith("restart without it"), (length, message)
        assert "Errno" not in message and "Weights only" not in message and "miniz" not in message, (length, message)
    assert torch.equal(load_checkpoint(path)["model"]["0.weight"], state["model"]["0.weight"])


def test_a_corrupt_member_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _saved_checkpoint(path)
    with zipfile.ZipFile(path) as archive:
        (pickle_member,) = [m for m in archive.infolist() if m.filename.endswith("data.pkl")]
    data = bytearray(path.read_bytes())
    header = pickle_member.header_offset
    start = header + 30 + int.from_bytes(data[header + 26:header + 28], "little") + int.from_bytes(
        data[header + 28:header + 30], "little")  # past the local header, its name and its extra field
    data[start + pickle_member.file_size // 2] ^= 0xFF  # one flipped byte in the middle of the pickle
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="is truncated or corrupt"):
        load_checkpoint(path)


class _NotATensor:
    pass


def test_an_intact_but_unsafe_checkpoint_keeps_the_safety_message(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"thing": _NotATensor()}, path)
    with pytest.raises(ConfigError, match=r"cannot be loaded safely: .*Weights only load failed"):
        load_checkpoint(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- writes the file system refuses


def _refuse(code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return refuse


@pytest.mark.parametrize("where,code", [("replace", errno.ENOSPC), ("fsync", errno.ENOSPC), ("mkstemp", errno.EROFS),
                                        ("mkstemp", errno.EACCES)])
def test_a_refused_atomic_write_names_the_file_and_loses_nothing(tmp_path, monkeypatch, where, code):
    path = tmp_path / "results.json"
    path.write_text('{"old": true}')
    target = tempfile if where == "mkstemp" else os
    monkeypatch.setattr(target, where, _refuse(code))
    with pytest.raises(LongtailError) as info:
        atomic_write_json(path, {"new": True})
    message = str(info.value)
    assert message.startswith(f"cannot write {path}: {os.strerror(code)} ({errno.errorcode[code]}); nothing was lost: "
                              "the previous results.json is unchanged")
    assert "\n" not in message
    assert path.read_text() == '{"old": true}' and sorted(tmp_path.iterdir()) == [path]  # no temporary left


def test_a_refused_first_write_says_no_partial_file_was_left(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", _refuse(errno.ENOSPC))
    with pytest.raises(LongtailError, match=r"model.yaml: No space left on device \(ENOSPC\); nothing was lost: no "
                                            "partial model.yaml was left"):
        atomic_write_text(tmp_path / "model.yaml", "x")
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_keep_their_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", _refuse(errno.EIO))
    with pytest.raises(OSError) as info:
        atomic_write_text(tmp_path / "a.txt", "x")
    assert not isinstance(info.value, LongtailError) and list(tmp_path.iterdir()) == []


def test_a_refused_append_names_the_log(tmp_path, monkeypatch):
    import builtins

    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"epoch": 1}')
    monkeypatch.setattr(builtins, "open", _refuse(errno.ENOSPC))
    with pytest.raises(LongtailError, match=r"cannot write .*metrics.jsonl: No space left on device \(ENOSPC\); "
                                            "nothing was lost: metrics.jsonl keeps every complete line"):
        append_line(path, '{"epoch": 2}')
    monkeypatch.undo()
    assert read_jsonl(path) == [{"epoch": 1}]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_a_read_only_directory_is_named(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("old")
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(LongtailError, match=r"cannot write .*model.yaml: Permission denied \(EACCES\); nothing"):
            atomic_write_text(path, "new")
    finally:
        tmp_path.chmod(0o755)
    assert path.read_text() == "old"


def test_train_resume_and_eval_on_a_full_disk_end_in_one_line_and_keep_the_run(tmp_path, data_root, monkeypatch,
                                                                                capsys):
    from longtail.cli import main

    run, config = tmp_path / "run", tmp_path / "tiny.yaml"
    config.write_text("data: {name: fashion_mnist_lt, imbalance: 5, batch_size: 64, augment: none}\n"
                      "model: {name: mlp, width: 8}\ntrain: {epochs: 1}\n")
    common = ["--data-root", str(data_root), "--quiet"]
    assert main(["train", str(config), "--out", str(run), *common]) == 0
    capsys.readouterr()

    def refused(command: list[str]) -> str:
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        with monkeypatch.context() as m:
            m.setattr(os, "replace", _refuse(errno.ENOSPC))
            assert main([*command, *common]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "No space left on device (ENOSPC); nothing was lost" in err, err
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
        return err

    assert f"cannot write {run / 'eval-test.json'}:" in refused(["eval", str(run)])
    for name in ("model.pt", "model.yaml", "results.json"):  # as if killed before the export: --resume writes them
        (run / name).unlink()
    assert "longtail train: error: cannot write" in refused(["train", str(config), "--out", str(run), "--resume"])
