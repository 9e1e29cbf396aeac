"""The training samplers, as `torch.utils.data.Sampler`s: the engine's batches and a user's `DataLoader` draw
their positions from these same classes.

Each epoch is as long as the split (N positions) and is drawn from (seed, epoch) alone: call `set_epoch(epoch)`
before each epoch, as with torch's `DistributedSampler` (without it every epoch repeats epoch 0's order).
- `InstanceSampler` (`instance`): a random permutation;
- `ClassBalancedSampler` (`class_balanced`): a class uniformly at random, then an instance of it uniformly;
- `SqrtSampler` (`sqrt`): a class with probability proportional to sqrt(n_k), then an instance uniformly;
- `ClassAwareSampler` (`class_aware`, multi-hot labels): DB-Loss's class-aware sampler — classes in shuffled
  rounds, from each drawn class 3 consecutive images taken from that class's own shuffled cycle of images
  carrying it.
With `world` > 1 processes, rank r takes positions r, r + world, ... of the same epoch order, padded by
repeating its start so that all ranks see equally many samples.

Layer: building blocks. Imports the foundation (errors).
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator, Optional

import torch
from torch.utils.data import Sampler

from longtail.errors import ConfigError

CLASS_AWARE_RUN = 3  # images per class draw (DB-Loss's ClassAwareSampler num_samples_cls)


def order_generator(seed: int, epoch: int, purpose: str = "sampler") -> torch.Generator:
    """A CPU generator for one (purpose, seed, epoch). torch's CPU generator keeps only 32 bits of its
    seed, so the three are hashed into those bits instead of being packed side by side."""
    digest = hashlib.sha256(f"{purpose}:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))


def rank_slice(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s share of `order`, padded from its start to a multiple of `world`."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    total = math.ceil(len(order) / world) * world
    padded = order.repeat(math.ceil(total / max(len(order), 1)))[:total]
    return padded[rank::world]


class EpochSampler(Sampler[int]):
    """Positions 0..N-1 of a split in the order this epoch visits them (`order`), this rank's share of them
    when iterated. `labels`: class ids (N) or multi-hot rows (N x C), e.g. `data.train.labels`;
    `num_classes`: the dataset's (`data.num_classes`), else the labels' largest id + 1."""

    def __init__(self, labels: torch.Tensor, num_classes: Optional[int] = None, *, seed: int = 0, rank: int = 0,
                 world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        self.labels = torch.as_tensor(labels)
        if num_classes is None:
            num_classes = self.labels.shape[1] if self.labels.ndim == 2 else int(self.labels.max()) + 1
        self.num_classes, self.seed, self.rank, self.world = num_classes, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch about to be drawn (from 0): each epoch's order comes from (seed, epoch) alone."""
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        """The whole epoch's positions, every rank's together (int64, N)."""
        return self.draw(order_generator(self.seed, self.epoch))

    def draw(self, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def positions(self) -> torch.Tensor:
        """This rank's positions of the epoch."""
        return rank_slice(self.order(), self.rank, self.world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions().tolist())

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.world)


class InstanceSampler(EpochSampler):
    """Every position once per epoch, in a random order."""

    def draw(self, g: torch.Generator) -> torch.Tensor:
        return torch.randperm(len(self.labels), generator=g)


class ClassBalancedSampler(EpochSampler):
    """Each draw: a class (with an image) uniformly at random, then one of its images uniformly."""

    def class_weights(self, counts: torch.Tensor) -> torch.Tensor:
        return (counts > 0).double()

    def draw(self, g: torch.Generator) -> torch.Tensor:
        labels, n = self.labels, len(self.labels)
        if labels.ndim != 1:
            raise ConfigError("data.sampler: class_balanced and sqrt draw one class id per image; for multi-hot "
                              "targets use class_aware")
        counts = torch.bincount(labels, minlength=self.num_classes)
        classes = torch.multinomial(self.class_weights(counts), n, replacement=True, generator=g)
        # Positions sorted by class: class k occupies by_class[start[k] : start[k] + counts[k]].
        by_class = torch.argsort(labels, stable=True)
        start = torch.cumsum(counts, 0) - counts
        size = counts[classes]
        within = torch.minimum((torch.rand(n, generator=g, dtype=torch.float64) * size).long(), size - 1)
        return by_class[start[classes] + within]


class SqrtSampler(ClassBalancedSampler):
    """Each draw: a class with probability proportional to the square root of its count, then one of its
    images uniformly."""

    def class_weights(self, counts: torch.Tensor) -> torch.Tensor:
        return counts.double().sqrt()


class ClassAwareSampler(EpochSampler):
    """Multi-hot labels: each class (that has an image) once per shuffled round, and from the drawn class the
    next CLASS_AWARE_RUN images of its own cycle, reshuffled whenever it wraps (DB-Loss's RandomCycleIter)."""

    def draw(self, g: torch.Generator) -> torch.Tensor:
        return class_aware_order(self.labels, len(self.labels), g)


def class_aware_order(multi_hot: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n positions drawn by `ClassAwareSampler`'s rule from `g`."""
    if multi_hot.ndim != 2:
        raise ConfigError("data.sampler: class_aware samples by the positive labels of multi-hot targets; for class "
                          "ids use class_balanced")
    members = [torch.nonzero(multi_hot[:, k] > 0).flatten() for k in range(multi_hot.shape[1])]
    classes = torch.tensor([k for k, m in enumerate(members) if len(m)])
    cycles = {int(k): (members[k][torch.randperm(len(members[k]), generator=g)], 0) for k in classes}
    out: list[int] = []
    while len(out) < n:
        for k in classes[torch.randperm(len(classes), generator=g)].tolist():
            for _ in range(CLASS_AWARE_RUN):
                cycle, at = cycles[k]
                if at == len(cycle):
                    cycle, at = members[k][torch.randperm(len(members[k]), generator=g)], 0
                out.append(int(cycle[at]))
                cycles[k] = (cycle, at + 1)
            if len(out) >= n:
                break
    return torch.tensor(out[:n], dtype=torch.int64)


# `data.sampler` -> its Sampler (`None`, evaluation, visits the split in order).
SAMPLERS: dict[str, type[EpochSampler]] = {
    "instance": InstanceSampler, "class_balanced": ClassBalancedSampler, "sqrt": SqrtSampler,
    "class_aware": ClassAwareSampler,
}


def build_sampler(name: str, labels: torch.Tensor, num_classes: int, seed: int, epoch: int, rank: int = 0,
                  world: int = 1) -> EpochSampler:
    """The `data.sampler` named `name`, set to `epoch`."""
    if name not in SAMPLERS:
        raise ConfigError(f"data.sampler: {name!r} is not allowed; choose one of: {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[name](labels, num_classes, seed=seed, rank=rank, world=world)
    sampler.set_epoch(epoch)
    return sampler


def epoch_order(labels: torch.Tensor, num_classes: int, sampler: Optional[str], seed: int,
                epoch: int) -> torch.Tensor:
    """Positions 0..N-1 in the order (or with the repeats) `sampler` visits them in this epoch, every rank's."""
    if sampler is None:
        return torch.arange(len(labels))
    return build_sampler(sampler, labels, num_classes, seed, epoch).order()
