"""In-memory splits: uint8 images in RAM, batches in a sampler's order, on-device input preparation.

Samplers (each epoch as long as the split, deterministic from (seed, epoch)):
- `instance`: a random permutation; `None`: sequential order (evaluation);
- `class_balanced`: a class uniformly at random, then an instance of it uniformly;
- `sqrt`: a class with probability proportional to sqrt(n_k), then an instance uniformly;
- `class_aware` (multi-hot labels): DB-Loss's class-aware sampler — classes in shuffled rounds, from each
  drawn class 3 consecutive images taken from that class's own shuffled cycle of images carrying it.
With `world` > 1 processes, rank r takes positions r, r + world, ... of the same epoch order, padded by
repeating its start so that all ranks see equally many samples. `idx` (position in the split) reveals
the repeats, so gathered evaluation can drop them.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator, Optional, Protocol, Sequence

import torch

from longtail.data.augment import to_model_size
from longtail.data.policies import ImagePolicy
from longtail.errors import ConfigError

SAMPLERS = ("instance", "class_balanced", "sqrt", "class_aware")
CLASS_AWARE_RUN = 3  # images per class draw (DB-Loss's ClassAwareSampler num_samples_cls)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Split(Protocol):
    """What the engine needs from any split (in-memory here, decoded-from-files elsewhere)."""

    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int: ...
    def class_counts(self) -> list[int]: ...
    def batches(self, batch_size: int, *, sampler: Optional[str], seed: int, epoch: int, rank: int = 0,
                world: int = 1, drop_last: bool = False, start: int = 0, tta: str = "none") -> Iterator[Batch]: ...
    def num_batches(self, batch_size: int, world: int = 1, drop_last: bool = False) -> int: ...
    # `tta: lift_crops` (evaluation): the input is N x 5 x C x S x S, LIFT's five crops of each image; a split
    # decoding files cuts them in `batches` (its workers), an in-memory one in `to_input` (on the device).
    def to_input(self, x: torch.Tensor, device: torch.device | str, train: bool,
                 generator: torch.Generator | None = None, tta: str = "none") -> torch.Tensor: ...


def epoch_generator(seed: int, epoch: int, purpose: str = "sampler") -> torch.Generator:
    """A CPU generator for one (purpose, seed, epoch). torch's CPU generator keeps only 32 bits of its
    seed, so the three are hashed into those bits instead of being packed side by side."""
    digest = hashlib.sha256(f"{purpose}:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))


def epoch_order(labels: torch.Tensor, num_classes: int, sampler: Optional[str], seed: int,
                epoch: int) -> torch.Tensor:
    """Positions 0..N-1 in the order (or with the repeats) `sampler` visits them in this epoch."""
    n = len(labels)
    if sampler is None:
        return torch.arange(n)
    if sampler not in SAMPLERS:
        raise ConfigError(f"data.sampler: {sampler!r} is not allowed; choose one of: {', '.join(SAMPLERS)}")
    g = epoch_generator(seed, epoch)
    if sampler == "instance":
        return torch.randperm(n, generator=g)
    if sampler == "class_aware":
        return class_aware_order(labels, n, g)
    counts = torch.bincount(labels, minlength=num_classes)
    weights = (counts > 0).double() if sampler == "class_balanced" else counts.double().sqrt()
    classes = torch.multinomial(weights, n, replacement=True, generator=g)
    # Positions sorted by class: class k occupies by_class[start[k] : start[k] + counts[k]].
    by_class = torch.argsort(labels, stable=True)
    start = torch.cumsum(counts, 0) - counts
    size = counts[classes]
    within = torch.minimum((torch.rand(n, generator=g, dtype=torch.float64) * size).long(), size - 1)
    return by_class[start[classes] + within]


def class_aware_order(multi_hot: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n positions: each class (that has an image) once per shuffled round, and from the drawn class the next
    CLASS_AWARE_RUN images of its own cycle, reshuffled whenever it wraps (DB-Loss's RandomCycleIter)."""
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


def rank_slice(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s share of `order`, padded from its start to a multiple of `world`."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside 0..{world - 1}")
    total = math.ceil(len(order) / world) * world
    padded = order.repeat(math.ceil(total / max(len(order), 1)))[:total]
    return padded[rank::world]


class LabelledSplit:
    """What every split shares: labels, class counts, and the rank-sliced epoch order batches are cut from."""

    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self) -> list[int]:
        """Training images per class: of each class id, or carrying each label of multi-hot targets."""
        if self.labels.ndim == 2:
            return (self.labels > 0).sum(dim=0).tolist()
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def num_batches(self, batch_size: int, world: int = 1, drop_last: bool = False) -> int:
        per_rank = math.ceil(len(self) / world)
        return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)

    def batch_positions(self, batch_size: int, sampler: Optional[str], seed: int, epoch: int, rank: int, world: int,
                        drop_last: bool, start: int = 0) -> list[torch.Tensor]:
        """The epoch's batches from the `start`-th on (a run resumed mid-epoch continues where it stopped)."""
        order = rank_slice(epoch_order(self.labels, self.num_classes, sampler, seed, epoch), rank, world)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        return [order[i:i + batch_size] for i in range(start * batch_size, stop, batch_size)]


class InMemorySplit(LabelledSplit):
    """uint8 images N x C x H x W (on the CPU, or on the training device after `to_device`), int64 labels and
    original file indices (on the CPU, where the samplers run). `resize`: the model's input size when it is
    not the images' own (a 224-pixel CLIP on CIFAR; `data.resize_to`), reached per batch on the device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                 mean: Sequence[float], std: Sequence[float], augment: str, num_classes: int,
                 policy: ImagePolicy = ImagePolicy()):
        if not (len(images) == len(labels) == len(indices)):
            raise ValueError("images, labels and indices must have the same length")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean / std need {images.shape[1]} values (one per channel), got {len(mean)} / {len(std)}")
        self.images, self.labels, self.indices = images, labels.long(), indices.long()
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.policy = policy
        self.num_classes = num_classes
        self.resize: Optional[int] = None
        self._normalisers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def to_device(self, device: torch.device) -> None:
        """Hold the images on `device`: batches are then gathered there, with no copy from host memory."""
        self.images = self.images.to(device)

    def batches(self, batch_size: int, *, sampler: Optional[str] = "instance", seed: int = 0, epoch: int = 0,
                rank: int = 0, world: int = 1, drop_last: bool = False, start: int = 0,
                tta: str = "none") -> Iterator[Batch]:
        """(uint8 images on the images' device, labels and positions in this split on the CPU); `tta` acts in
        `to_input`."""
        for pos in self.batch_positions(batch_size, sampler, seed, epoch, rank, world, drop_last, start):
            yield self.images[pos.to(self.images.device)], self.labels[pos], pos

    def to_input(self, x: torch.Tensor, device: torch.device | str, train: bool,
                 generator: torch.Generator | None = None, tta: str = "none") -> torch.Tensor:
        """uint8 batch -> normalised float on `device`: the model's size and training's crop/flip per `augment`
        (`to_model_size`), then the policy and Cutout (`longtail.data.policies`), then the normalisation."""
        x = x.to(device, non_blocking=True).float().div_(255)
        x = to_model_size(x, self.resize, self.augment, train, generator, tta)
        if train and self.policy.active:
            x = self.policy(x, generator)
        if x.device not in self._normalisers:  # built once per device, not per batch
            self._normalisers[x.device] = (torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1),
                                           torch.tensor(self.std, device=x.device).view(1, -1, 1, 1))
        mean, std = self._normalisers[x.device]
        return (x - mean) / std
