import gzip
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import torch

import longtail.data as data_mod
import longtail.data.core as data_core
from fake_data import decode_index, write_cifar10, write_cifar100, write_fashion_mnist, write_idx
from longtail.config import DataConfig
from longtail.data import build_data, indices_sha256, resolve_root
from longtail.data.describe import describe, format_description, write_indices
from longtail.data.download import Remote, download_archive, fetch, md5sum, safe_extract
from longtail.data.idx import read_idx
from longtail.errors import ConfigError


@pytest.fixture(scope="module")
def c10(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    return root, write_cifar10(root, train_per_class=20, test_per_class=3)


@pytest.fixture(scope="module")
def c100_full(tmp_path_factory):
    """500 images per class, like the real CIFAR-100 train set (zeros: fast)."""
    root = tmp_path_factory.mktemp("c100")
    return root, write_cifar100(root, train_per_class=500, test_per_class=1, noise=False)


def _check_split(split, labels):
    """Images are the original ones at `indices`; labels match the file."""
    assert split.images.dtype == torch.uint8
    assert np.array_equal(decode_index(split.images), split.indices.numpy())
    assert np.array_equal(labels[split.indices.numpy()], split.labels.numpy())


@pytest.mark.parametrize("selection", ["ldam", "first"])
def test_cifar10_lt_counts_and_indices(c10, selection):
    root, fake = c10
    data = build_data(DataConfig(name="cifar10_lt", imbalance=10, selection=selection), root)
    expected = [int(20 * 0.1 ** (i / 9)) for i in range(10)]
    assert data.class_counts == expected == data.train.class_counts()
    assert data.train.images.shape == (sum(expected), 3, 32, 32)
    _check_split(data.train, fake.train_labels)
    _check_split(data.test, fake.test_labels)
    assert len(data.test) == 30 and data.val is None and data.val_indices is None
    assert data.indices_sha256 == indices_sha256(data.indices)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32)
    assert data.default_thresholds == (1000, 200) and data.class_names[0] == "airplane"
    if selection == "first":  # the first n_i of each class in file order
        for c, n in enumerate(expected):
            assert np.array_equal(data.indices[data.train.labels == c].numpy(),
                                  np.where(fake.train_labels == c)[0][:n])


def test_selections_differ_but_seed_reproduces(c10):
    root, _ = c10
    a = build_data(DataConfig(imbalance=10), root)
    b = build_data(DataConfig(imbalance=10), root)
    first = build_data(DataConfig(imbalance=10, selection="first"), root)
    other_seed = build_data(DataConfig(imbalance=10, subset_seed=1), root)
    assert a.indices_sha256 == b.indices_sha256
    assert len({a.indices_sha256, first.indices_sha256, other_seed.indices_sha256}) == 3


def test_val_split(c10):
    root, fake = c10
    data = build_data(DataConfig(imbalance=10, val_per_class=4, selection="first"), root)
    assert data.val.class_counts() == [4] * 10
    assert data.class_counts[0] == 16 and data.class_counts[-1] == round(16 / 10)
    _check_split(data.val, fake.train_labels)
    assert not set(data.indices.tolist()) & set(data.val_indices.tolist())
    for c, n in enumerate(data.class_counts):  # val = the next images after the train ones
        assert np.array_equal(data.val_indices[data.val.labels == c].numpy(),
                              np.where(fake.train_labels == c)[0][n:n + 4])


def test_cifar100_lt_if100_is_10847_with_35_35_30_groups(c100_full):
    root, fake = c100_full
    d = describe(DataConfig(name="cifar100_lt", imbalance=100), root)
    assert d["total"] == 10847 and d["class_counts"][0] == 500 and d["class_counts"][-1] == 5
    assert d["groups"] == {"many": 35, "medium": 35, "few": 30} and d["thresholds"] == [100, 20]
    assert d["num_classes"] == 100 and d["test_total"] == 100
    text = format_description(d)
    assert "10847" in text and d["indices_sha256"] in text and "fine_99" in text
    rng = np.random.RandomState(0)  # LDAM-DRW's IMBALANCECIFAR100: np.random.seed(0), per class shuffle, keep n_i
    reference = []
    for c, n in enumerate(d["class_counts"]):
        idx = np.where(fake.train_labels == c)[0]
        rng.shuffle(idx)
        reference.append(idx[:n])
    assert d["indices"] == np.concatenate(reference).tolist()


def test_recorded_imbalance_is_measured_under_profile_none(c10):
    root, _ = c10
    configured = build_data(DataConfig(imbalance=10), root)
    assert configured.imbalance == 10.0  # exp imposes data.imbalance
    natural = build_data(DataConfig(profile="none"), root)  # data.imbalance stays at its default, 100
    assert natural.class_counts == [20] * 10 and natural.imbalance == 1.0
    d = describe(DataConfig(profile="none"), root)
    assert d["imbalance"] == 1.0 == d["imbalance_ratio"]
    text = format_description(d)
    assert "profile none (natural counts, imbalance 1 measured)" in text and "imbalance 100" not in text
    assert "profile exp (imbalance 10)" in format_description(describe(DataConfig(imbalance=10), root))


def test_thresholds_rule_says_which_default_applies_and_why(c10, tmp_path):
    root, _ = c10
    data = build_data(DataConfig(imbalance=10), root)
    assert data.thresholds_rule == "10-class protocol (> 1000 / < 200): cifar10_lt"
    d = describe(DataConfig(imbalance=10), root)
    assert d["thresholds_rule"] == data.thresholds_rule
    assert "thresholds: 10-class protocol (> 1000 / < 200): cifar10_lt" in format_description(d)
    write_cifar100(tmp_path, train_per_class=10, test_per_class=1)
    c100 = build_data(DataConfig(name="cifar100_lt", imbalance=5), tmp_path)
    assert c100.thresholds_rule == "standard (> 100 / < 20): cifar100_lt, 100 classes"


def test_cifar100_step_profile_and_labels(tmp_path):
    fake = write_cifar100(tmp_path, train_per_class=10, test_per_class=1)
    data = build_data(DataConfig(name="cifar100_lt", profile="step", imbalance=5, selection="first"), tmp_path)
    assert data.class_counts == [10] * 50 + [2] * 50
    _check_split(data.train, fake.train_labels)
    assert data.default_thresholds == (100, 20)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist(tmp_path, gz):
    fake = write_fashion_mnist(tmp_path, train_per_class=12, test_per_class=2, gz=gz)
    data = build_data(DataConfig(name="fashion_mnist_lt", imbalance=4), tmp_path)
    assert data.class_counts == [int(12 * 0.25 ** (i / 9)) for i in range(10)]
    assert data.train.images.shape[1:] == (1, 28, 28) and (data.in_channels, data.image_size) == (1, 28)
    assert data.mean == (0.2860,) and data.std == (0.3530,)
    _check_split(data.train, fake.train_labels)
    _check_split(data.test, fake.test_labels)


def test_torchvision_fashion_mnist_layout(tmp_path):
    write_fashion_mnist(tmp_path, train_per_class=4, test_per_class=1)
    (tmp_path / "FashionMNIST").mkdir()
    (tmp_path / "fashion-mnist").rename(tmp_path / "FashionMNIST" / "raw")
    assert len(build_data(DataConfig(name="fashion_mnist_lt", imbalance=2), tmp_path).test) == 10


def test_mean_std_override(c10):
    root, _ = c10
    data = build_data(DataConfig(imbalance=10, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]), root)
    assert data.mean == (0.5, 0.5, 0.5) and data.train.std == (0.25, 0.25, 0.25)
    assert build_data(DataConfig(imbalance=10), root).mean == (0.4914, 0.4822, 0.4465)
    with pytest.raises(ConfigError, match="data.mean: this dataset has 3 channel"):
        build_data(DataConfig(imbalance=10, mean=[0.5]), root)


def test_missing_dataset_names_path_and_remedies(tmp_path):
    with pytest.raises(ConfigError, match=r"cifar-100-python.*--download.*--data-root.*LONGTAIL_DATA"):
        build_data(DataConfig(name="cifar100_lt"), tmp_path)
    with pytest.raises(ConfigError, match="unknown dataset 'nope'.*cifar10_lt"):
        build_data(DataConfig(name="nope"), tmp_path)


def test_broken_cifar_files(tmp_path):
    fake = write_cifar10(tmp_path, train_per_class=5, test_per_class=1)
    batch = fake.path / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(ConfigError, match="data_batch_3.*truncated"):
        build_data(DataConfig(imbalance=2), tmp_path)
    write_cifar10(tmp_path, train_per_class=5, test_per_class=1)
    (fake.path / "batches.meta").unlink()
    with pytest.raises(ConfigError, match="batches.meta: file not found"):
        build_data(DataConfig(imbalance=2), tmp_path)
    # a CIFAR-100 file where CIFAR-10 is expected: wrong keys
    write_cifar10(tmp_path, train_per_class=5, test_per_class=1)
    c100 = write_cifar100(tmp_path / "x", train_per_class=1, test_per_class=1)
    (fake.path / "test_batch").write_bytes((c100.path / "test").read_bytes())
    with pytest.raises(ConfigError, match="test_batch: missing the entry 'labels'.*fine_labels"):
        build_data(DataConfig(imbalance=2), tmp_path)


def test_broken_idx_files(tmp_path):
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "a", images, gz=False)
    assert read_idx(tmp_path / "a", 3).shape == (3, 28, 28)
    raw = (tmp_path / "a").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-10])
    with pytest.raises(ConfigError, match="short: truncated"):
        read_idx(tmp_path / "short", 3)
    (tmp_path / "magic").write_bytes(b"\x00\x00\x0d\x03" + raw[4:])
    with pytest.raises(ConfigError, match="bad IDX magic 00000d03"):
        read_idx(tmp_path / "magic", 3)
    with pytest.raises(ConfigError, match="bad IDX magic"):
        read_idx(tmp_path / "a", 1)  # an image file where labels are expected
    (tmp_path / "b.gz").write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(ConfigError, match="b.gz: broken gzip"):
        read_idx(tmp_path / "b.gz", 3)
    fake = write_fashion_mnist(tmp_path / "fm", train_per_class=2, test_per_class=1, gz=False)
    write_idx(fake.path / "t10k-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8), gz=False)
    with pytest.raises(ConfigError, match="7 labels for 10 images"):
        build_data(DataConfig(name="fashion_mnist_lt", imbalance=2), tmp_path / "fm")


def test_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGTAIL_DATA", str(tmp_path / "env"))
    assert resolve_root("/explicit", DataConfig(root="/cfg")) == resolve_root("/explicit", DataConfig())
    assert str(resolve_root("/explicit", DataConfig(root="/cfg"))) == "/explicit"
    assert str(resolve_root(None, DataConfig(root="/cfg"))) == "/cfg"
    assert resolve_root(None, DataConfig()) == tmp_path / "env"
    monkeypatch.delenv("LONGTAIL_DATA")
    assert str(resolve_root(None, DataConfig())).endswith(".cache/longtail-data")
    assert "~" not in str(resolve_root(None, DataConfig()))


def test_sha256_definition_and_write_indices(c10, tmp_path):
    root, _ = c10
    data = build_data(DataConfig(imbalance=10), root)
    raw = b"".join(int(i).to_bytes(8, "little", signed=True) for i in data.indices)
    assert data.indices_sha256 == hashlib.sha256(raw).hexdigest()
    write_indices(tmp_path / "idx.txt", data.indices)
    assert [int(x) for x in (tmp_path / "idx.txt").read_text().split()] == data.indices.tolist()
    assert describe(DataConfig(imbalance=10), root)["indices"] == data.indices.tolist()
    d = describe(DataConfig(imbalance=10, val_per_class=2), root)
    json.dumps(d)
    assert d["val_counts"] == [2] * 10 and d["val_total"] == 20


def test_register_dataset():
    @data_mod.register_dataset("toy_test_only")
    def toy(cfg, root, download):
        return ("toy", root, download)
    try:
        assert build_data(DataConfig(name="toy_test_only"), "/r", True) == ("toy", resolve_root("/r", DataConfig()), True)
    finally:
        del data_core._DATASETS["toy_test_only"]


# --- download: checksum and safe extraction on local archives (file:// URLs, no network) ---

def _tar(path, members: dict):
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def test_fetch_verifies_md5(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello")
    good = Remote("f.bin", ("file:///nonexistent/f.bin", src.as_uri()), md5sum(src))
    got = fetch(good, tmp_path / "dl")  # the first mirror fails, the second works
    assert got.read_bytes() == b"hello"
    bad = Remote("g.bin", (src.as_uri(),), "0" * 32)
    with pytest.raises(ConfigError, match="MD5 .* does not match"):
        fetch(bad, tmp_path / "dl")
    assert not (tmp_path / "dl" / "g.bin").exists() and not (tmp_path / "dl" / "g.bin.part").exists()
    with pytest.raises(ConfigError, match="--data-root DIR or \\$LONGTAIL_DATA"):
        fetch(Remote("h.bin", ("file:///nonexistent/h.bin",), "0" * 32), tmp_path / "dl")


@pytest.mark.parametrize("name", ["../escape.txt", "/abs.txt", "ok/../../escape.txt"])
def test_safe_extract_rejects_escaping_members(tmp_path, name):
    archive = _tar(tmp_path / "evil.tar.gz", {"ok/file.txt": b"x", name: b"pwned"})
    with pytest.raises(ConfigError, match="refusing the archive member"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "ok").exists()


def test_safe_extract_rejects_links(tmp_path):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("d/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ConfigError, match="d/link"):
        safe_extract(archive, tmp_path / "out")


def test_download_cifar10_from_local_archive(tmp_path, monkeypatch):
    fake = write_cifar10(tmp_path / "made", train_per_class=3, test_per_class=1)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(fake.path, arcname="cifar-10-batches-py")
    remote = Remote("cifar-10-python.tar.gz", (archive.as_uri(),), md5sum(archive))
    monkeypatch.setattr(data_mod, "CIFAR10", remote)
    root = tmp_path / "root"
    with pytest.raises(ConfigError, match="--download"):
        build_data(DataConfig(imbalance=3), root)
    data = build_data(DataConfig(imbalance=3), root, download=True)
    assert data.class_counts == [int(3 * (1 / 3) ** (i / 9)) for i in range(10)]
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert not list(root.glob(".extract-*"))  # the staging folder is gone
    assert download_archive(remote, root, "cifar-10-batches-py") == root / "cifar-10-batches-py"
