import numpy as np
import pytest

from longtail.config import DataConfig
from longtail.data.profiles import lt_subset, select, target_counts
from longtail.errors import ConfigError


def test_cifar10_if100_counts():
    assert target_counts("exp", 5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


@pytest.mark.parametrize("imbalance, total", [(100, 10847), (50, 12608), (10, 19573)])
def test_cifar100_totals(imbalance, total):
    assert sum(target_counts("exp", 500, 100, imbalance)) == total


def test_val_split_rounds_from_reduced_max():
    counts = target_counts("exp", 500, 100, 100, val_per_class=20)
    assert counts[0] == 480 and counts[-1] == round(480 / 100) == 5
    # i = 5: 480 * 0.01**(5/99) = 380.39; round and int agree; i = 4: 398.50 -> round gives 399, int 398
    assert counts[4] == 399 and target_counts("exp", 480, 100, 100)[4] == 398


def test_step_profile():
    assert target_counts("step", 5000, 10, 10) == [5000] * 5 + [500] * 5
    assert target_counts("step", 500, 10, 100, minority_fraction=0.3) == [500] * 7 + [5] * 3


def test_none_profile_keeps_natural_counts():
    assert target_counts("none", 0, 3, 100, natural=[7, 4, 9]) == [7, 4, 9]
    assert target_counts("none", 0, 3, 100, val_per_class=2, natural=[7, 4, 9]) == [5, 2, 7]


def _labels(per_class=30, classes=4, seed=3):
    labels = np.repeat(np.arange(classes), per_class)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _reference_ldam(labels, counts, val_per_class):
    """LDAM-DRW's IMBALANCECIFAR: np.random.seed(0); per class: where, shuffle, keep the first n."""
    state = np.random.get_state()
    np.random.seed(0)
    train, val = [], []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        train.append(idx[:n])
        val.append(idx[n:n + val_per_class])
    np.random.set_state(state)
    return np.concatenate(train), np.concatenate(val)


def test_ldam_selection_matches_the_reference_recipe():
    labels = _labels()
    counts = [27, 12, 5, 2]
    state = np.random.get_state()
    got = select(labels, counts, "ldam", val_per_class=3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(state, np.random.get_state()))  # global RNG untouched
    train, val = _reference_ldam(labels, counts, 3)
    assert np.array_equal(got.train, train) and np.array_equal(got.val, val)
    assert got.counts == counts and got.train.dtype == np.int64


def test_first_selection_takes_file_order():
    labels = _labels()
    got = select(labels, [10, 4, 2, 1], "first", val_per_class=2)
    for c, n in enumerate([10, 4, 2, 1]):
        file_order = np.where(labels == c)[0]
        assert np.array_equal(got.train[labels[got.train] == c], file_order[:n])
        assert np.array_equal(got.val[labels[got.val] == c], file_order[n:n + 2])
    assert not set(got.train) & set(got.val)


def test_subset_seed_changes_ldam_selection():
    labels = _labels()
    a = select(labels, [10, 4, 2, 1], "ldam", seed=0).train
    b = select(labels, [10, 4, 2, 1], "ldam", seed=1).train
    assert sorted(labels[a]) == sorted(labels[b]) and not np.array_equal(a, b)


def test_too_few_images_is_a_config_error():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ConfigError, match="class 1 has 3 images"):
        select(labels, [10, 5], "first")
    with pytest.raises(ConfigError, match="class 1 would keep 0.*lower data.imbalance"):
        lt_subset(np.array([0] * 10 + [1] * 10), 2, DataConfig(imbalance=20))


def test_profile_none_blames_val_per_class_not_imbalance():
    labels = np.array([0] * 10 + [1] * 3)
    with pytest.raises(ConfigError) as info:
        lt_subset(labels, 2, DataConfig(profile="none", val_per_class=3))
    message = str(info.value)
    assert "class 1 has 3 images and data.val_per_class=3 leaves none of them for training" in message
    assert "lower data.val_per_class to at most 2" in message and "data.imbalance" not in message
    with pytest.raises(ConfigError, match="class 1 has no training images") as info:
        lt_subset(np.array([0] * 4), 2, DataConfig(profile="none"))
    assert "data.imbalance" not in str(info.value)


def test_lt_subset_uses_largest_class_as_n_max():
    labels = _labels(per_class=40, classes=3)
    sub = lt_subset(labels, 3, DataConfig(imbalance=4, selection="first"))
    assert sub.counts == [40, 20, 10] and len(sub.train) == 70 and len(sub.val) == 0
    assert np.bincount(labels[sub.train]).tolist() == [40, 20, 10]


def test_fewer_than_two_classes_rejected():
    with pytest.raises(ConfigError, match="at least 2 classes"):
        target_counts("exp", 10, 1, 10)
