import os
import pickle

import numpy as np
import pytest

from fake_data import write_cifar10
from longtail.data.safe_pickle import load_pickle
from longtail.errors import ConfigError


class _Exploit:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_python2_cifar_pickle_loads(tmp_path):
    fake = write_cifar10(tmp_path, train_per_class=5, test_per_class=1)
    record = load_pickle(fake.path / "data_batch_1")
    assert set(record) == {"batch_label", "labels", "data", "filenames"}  # str keys, not bytes
    assert record["data"].dtype == np.uint8 and record["data"].shape == (10, 3072)
    assert record["labels"] == fake.train_labels[:10].tolist()


def test_python3_numpy_pickle_loads(tmp_path):
    path = tmp_path / "py3"
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path.write_bytes(pickle.dumps({"data": array, "labels": [np.int64(3)]}, protocol=4))
    record = load_pickle(path)
    assert np.array_equal(record["data"], array) and record["labels"] == [3]


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    sentinel = tmp_path / "ran"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Exploit(sentinel)}, protocol=2))
    pickle.loads(pickle.dumps(_Exploit(tmp_path / "control")))  # the payload does work when unrestricted
    assert (tmp_path / "control").exists()
    with pytest.raises(ConfigError, match=r"data_batch_1.*refusing.*(posix|os)\.system"):
        load_pickle(path)
    assert not sentinel.exists()


def test_other_globals_are_refused(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(pickle.dumps({"x": frozenset}, protocol=2))  # builtins.frozenset
    with pytest.raises(ConfigError, match=r"(builtins|__builtin__)\.frozenset"):
        load_pickle(path)


def test_sets_load_as_db_loss_split_files_hold_them(tmp_path):
    path = tmp_path / "class_split.pkl"
    path.write_bytes(pickle.dumps({"head": {0, 2}, "middle": {1}, "tail": set()}, protocol=2))
    assert load_pickle(path) == {"head": {0, 2}, "middle": {1}, "tail": set()}


def test_numpy_scalars_in_sets_load_as_db_loss_real_split_files_hold_them(tmp_path):
    # DB-Loss's real class_split.pkl holds sets of np.int64 written at protocol 2 by Python 3, whose scalar
    # bytes go through _codecs.encode(text, "latin1"): a plain-int test file would not exercise that.
    path = tmp_path / "class_split.pkl"
    split = {"head": {np.int64(4), np.int64(6)}, "middle": {np.int64(1)}, "tail": {np.int64(0)}}
    data = pickle.dumps(split, protocol=2)
    assert b"_codecs" in data
    path.write_bytes(data)
    assert load_pickle(path) == {"head": {4, 6}, "middle": {1}, "tail": {0}}


def test_codecs_encode_is_allowed_only_for_latin1_text(tmp_path):
    class Utf16:  # pickles as _codecs.encode(text, "utf-16"), which the unpickler must refuse
        def __reduce__(self):
            import _codecs
            return _codecs.encode, ("x", "utf-16")
    path = tmp_path / "f"
    path.write_bytes(pickle.dumps(Utf16(), protocol=2))
    with pytest.raises(ConfigError, match="only \\(str, 'latin1'\\)"):
        load_pickle(path)


def test_truncated_and_missing_files(tmp_path):
    fake = write_cifar10(tmp_path, train_per_class=5, test_per_class=1)
    good = (fake.path / "test_batch").read_bytes()
    bad = tmp_path / "truncated"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ConfigError, match="truncated"):
        load_pickle(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_pickle(tmp_path / "nope")
