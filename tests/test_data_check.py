"""`longtail data NAME --check`: every image file of the splits decoded once, the unreadable ones listed."""
import io
import json

import pytest
from PIL import Image

from longtail.cli import main
from longtail.config import DataConfig
from longtail.data.check import check_images
from longtail.data.listfile import Benchmark, build_listfile


def _png(size=(20, 16), colour=(10, 100, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, counts={"ant": 4, "bee": 2}):
    for split, per_class in (("train", None), ("test", 2)):
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(per_class or n):
                (root / split / name / f"{i}.png").write_bytes(_png(colour=(40 * i, 100, 200)))
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_files_are_listed_and_the_command_exits_2(tmp_path, capsys, workers):
    root = _folder(tmp_path / "d")
    (root / "train/ant/1.png").write_bytes(b"not an image")
    truncated = _png(size=(64, 64))
    (root / "test/bee/0.png").write_bytes(truncated[:len(truncated) // 2])
    Image.open(root / "test/bee/0.png")  # its header reads: only decoding the whole image finds it

    args = ["data", "folder", f"root={root}", "profile=none", f"num_workers={workers}", "--check"]
    assert main(args) == 2
    captured = capsys.readouterr()
    report = captured.out.split("\n\n")[-1].splitlines()
    assert report[0] == "check: 2 of 10 image files (train 6, test 4) cannot be read:"
    assert report[1].startswith(f"  cannot read image {root / 'train/ant/1.png'}: cannot identify image file")
    assert report[2].startswith(f"  cannot read image {root / 'test/bee/0.png'}: ")
    (err,) = captured.err.splitlines()
    assert err.startswith("longtail data: error: 2 image file(s) cannot be read (listed above)")

    assert main([*args, "--json"]) == 2
    check = json.loads(capsys.readouterr().out)["check"]
    assert check["opened"] == {"train": 6, "test": 4} and len(check["unreadable"]) == 2


def test_a_clean_dataset_passes_and_an_in_memory_one_says_there_is_nothing_to_open(tmp_path, capsys, data_root):
    root = _folder(tmp_path / "d")
    assert main(["data", "folder", f"root={root}", "profile=none", "--check"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        "check: opened 10 image files (train 6, test 4): every one is readable"
    assert main(["data", "fashion_mnist_lt", "imbalance=10", "--data-root", str(data_root), "--check"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("check: fashion_mnist_lt holds its images as arrays, read "
                                                        "whole and shape-checked when it loads: there are no image "
                                                        "files to open")
    assert main(["data", "folder", f"root={root}", "profile=none"]) == 0  # without --check: no check line
    assert "check:" not in capsys.readouterr().out


def test_list_file_datasets_name_the_line_and_each_file_is_opened_once(tmp_path):
    base = tmp_path / "Tiny_LT"
    (base / "img").mkdir(parents=True)
    for i in range(6):
        (base / "img" / f"{i}.png").write_bytes(_png())
    (base / "img" / "4.png").write_bytes(b"")
    (base / "train.txt").write_text("img/0.png 0\nimg/1.png 0\nimg/2.png 1\nimg/4.png 1\n")
    (base / "test.txt").write_text("img/3.png 0\nimg/5.png 1\nimg/4.png 1\n")  # 4.png is in both lists
    tiny = Benchmark("tiny", "Tiny_LT", 2, {"train": ("train.txt", 4), "test": ("test.txt", 3)})
    data = build_listfile(DataConfig(profile="none", image_size=16), tmp_path, tiny)
    result = check_images(data)
    assert result["opened"] == {"train": 4, "test": 2}
    (message,) = result["unreadable"]
    assert message.startswith(f"{base / 'train.txt'}:4: cannot read image {base / 'img/4.png'}: ")
