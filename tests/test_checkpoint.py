"""Checkpoints and logs: `read_jsonl` tolerates only a torn last line; damaged checkpoints say so."""
import json
import zipfile

import pytest
import torch
from torch import nn

from longtail.checkpoint import atomic_torch_save, load_checkpoint, read_jsonl
from longtail.errors import ConfigError


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
