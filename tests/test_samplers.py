import math
from collections import Counter

import pytest
import torch

from longtail.data.samplers import epoch_order, rank_slice
from longtail.data.splits import InMemorySplit
from longtail.errors import ConfigError

COUNTS = [900, 90, 10]


def _split(counts=COUNTS):
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    images = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
    return InMemorySplit(images, labels, torch.arange(len(labels)) + 100, (0.5,), (0.5,), "none", len(counts))


def _class_freq(split, sampler, epochs=4):
    drawn = torch.cat([split.labels[epoch_order(split.labels, 3, sampler, 0, e)] for e in range(epochs)])
    return torch.bincount(drawn, minlength=3).double() / len(drawn)


def test_instance_sampler_is_a_seeded_permutation_per_epoch():
    split = _split()
    a = epoch_order(split.labels, 3, "instance", seed=0, epoch=0)
    assert sorted(a.tolist()) == list(range(len(split)))
    assert torch.equal(a, epoch_order(split.labels, 3, "instance", seed=0, epoch=0))
    assert not torch.equal(a, epoch_order(split.labels, 3, "instance", seed=0, epoch=1))
    assert not torch.equal(a, epoch_order(split.labels, 3, "instance", seed=1, epoch=0))
    assert torch.equal(epoch_order(split.labels, 3, None, 0, 0), torch.arange(len(split)))


def test_class_balanced_frequencies_are_uniform():
    split = _split()
    freq = _class_freq(split, "class_balanced")
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.03)
    order = epoch_order(split.labels, 3, "class_balanced", 0, 0)
    assert len(order) == len(split)
    # within the rare class the draws spread over (almost) all its 10 instances
    assert len(set(order[split.labels[order] == 2].tolist())) >= 8


def test_sqrt_sampler_follows_sqrt_counts():
    freq = _class_freq(_split(), "sqrt")
    target = torch.tensor(COUNTS, dtype=torch.double).sqrt()
    assert torch.allclose(freq, target / target.sum(), atol=0.03)


def test_class_balanced_skips_empty_classes():
    split = InMemorySplit(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 0, 0, 2, 2]),
                          torch.arange(6), (0.5,), (0.5,), "none", 3)
    order = epoch_order(split.labels, 3, "class_balanced", 0, 0)
    assert set(split.labels[order].tolist()) <= {0, 2}


def test_unknown_sampler():
    with pytest.raises(ConfigError, match="data.sampler"):
        epoch_order(torch.zeros(3, dtype=torch.long), 1, "weird", 0, 0)


@pytest.mark.parametrize("n, world", [(10, 3), (12, 4), (2, 4), (1000, 7)])
def test_rank_slices_are_disjoint_and_cover_everything(n, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    slices = [rank_slice(order, r, world) for r in range(world)]
    assert len({len(s) for s in slices}) == 1 and len(slices[0]) == math.ceil(n / world)
    everything = torch.cat(slices).tolist()
    assert set(everything) == set(range(n))
    pad = len(everything) - n
    # the only repeats are the padding, taken from the start of the epoch order
    repeated = [i for i, k in Counter(everything).items() for _ in range(k - 1)]
    assert sorted(repeated) == sorted(order[:pad].tolist())


@pytest.mark.parametrize("sampler", ["instance", "class_balanced", "sqrt", None])
@pytest.mark.parametrize("world, drop_last", [(1, False), (1, True), (3, False), (3, True)])
def test_batches_match_num_batches_and_ranks_share_one_order(sampler, world, drop_last):
    split = _split([20, 7, 3])
    per_rank = []
    for rank in range(world):
        batches = list(split.batches(4, sampler=sampler, seed=1, epoch=2, rank=rank, world=world, drop_last=drop_last))
        assert len(batches) == split.num_batches(4, world=world, drop_last=drop_last)
        for x, y, idx in batches:
            assert x.dtype == torch.uint8 and x.shape[1:] == (1, 2, 2)
            assert torch.equal(y, split.labels[idx]) and len(x) == len(idx) <= 4
            if drop_last:
                assert len(idx) == 4
        per_rank.append(torch.cat([idx for _, _, idx in batches]))
    if not drop_last:
        full = epoch_order(split.labels, 3, sampler, 1, 2)
        assert torch.equal(torch.cat(per_rank), torch.cat([rank_slice(full, r, world) for r in range(world)]))
        if sampler in ("instance", None):  # every sample appears, the padding repeats a few
            assert set(torch.cat(per_rank).tolist()) == set(range(len(split)))
