"""In-memory splits: uint8 images in RAM, batches in a sampler's order, on-device input preparation.

Every split is a `torch.utils.data.Dataset` (`split[i]` is an image and its label) and cuts its batches from
the positions a `longtail.data.samplers` Sampler draws (`None`: sequential order, for evaluation), so a user's
`DataLoader(split, sampler=...)` and the engine visit the same positions. With `world` > 1 processes each rank
takes its share of one epoch order; `idx` (position in the split) reveals the padding repeats, so gathered
evaluation can drop them.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Protocol, Sequence

import torch
from torch.utils.data import Dataset

from longtail.data.augment import to_model_size
from longtail.data.policies import ImagePolicy
from longtail.data.samplers import build_sampler, rank_slice

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Split(Protocol):
    """What the engine needs from any split (in-memory here, decoded-from-files elsewhere)."""

    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int: ...
    def __getitem__(self, pos: int) -> tuple[torch.Tensor, Any]: ...
    def class_counts(self) -> list[int]: ...
    def batches(self, batch_size: int, *, sampler: Optional[str], seed: int, epoch: int, rank: int = 0,
                world: int = 1, drop_last: bool = False, start: int = 0, tta: str = "none") -> Iterator[Batch]: ...
    def num_batches(self, batch_size: int, world: int = 1, drop_last: bool = False) -> int: ...
    # `tta: lift_crops` (evaluation): the input is N x 5 x C x S x S, LIFT's five crops of each image; a split
    # decoding files cuts them in `batches` (its workers), an in-memory one in `to_input` (on the device).
    def to_input(self, x: torch.Tensor, device: torch.device | str, train: bool,
                 generator: torch.Generator | None = None, tta: str = "none") -> torch.Tensor: ...


class LabelledSplit(Dataset):
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
        if sampler is None:
            order = rank_slice(torch.arange(len(self)), rank, world)
        else:
            order = build_sampler(sampler, self.labels, self.num_classes, seed, epoch, rank, world).positions()
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

    def __getitem__(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 image (C x H x W, on the images' device) and its label: what `batches` gathers, one at a
        time (`to_input` turns a batch of them into the model's input)."""
        return self.images[pos], self.labels[pos]

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
