"""Batches of an in-memory dense-task split (segmentation masks, detection boxes, clean images) held on the device.

The dense counterpart of :class:`kdforge.data.loader.TensorLoader`: uint8 images and their targets live on the
training device, a training epoch is a seeded permutation sharded over ranks exactly as classification's
(:func:`~kdforge.data.loader.train_shard`), and a task's joint augmentation transforms image and targets together as
batched tensor ops before normalisation. Evaluation shows every sample once, rank ``r`` taking samples
``r, r + W, ...`` (the task's evaluator reduces over ranks, so the split of the work does not change a metric).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from kdforge.data.augment import normalize
from kdforge.data.batch import Batch
from kdforge.data.loader import train_shard
from kdforge.seeding import mix_seed

#: ``augment(images, targets, generator) -> (images, targets)``: images ``[B, 3, H, W]`` float in [0, 1].
JointAugment = Callable[[Tensor, Any, torch.Generator], tuple[Tensor, Any]]


def index_targets(targets: Any, idx: Tensor) -> Any:
    """The rows ``idx`` of a target tensor or of every tensor in a mapping of them."""
    if isinstance(targets, Tensor):
        return targets[idx]
    return {k: v[idx] for k, v in targets.items()}


def _to_device(targets: Any, device: torch.device) -> Any:
    if isinstance(targets, Tensor):
        return targets.to(device)
    return {k: v.to(device) for k, v in targets.items()}


class DenseTensorLoader:
    """Batches of ``images`` with their ``targets``.

    Args:
        images: ``[N, 3, H, W]`` uint8.
        targets: ``[N, ...]`` tensor or a mapping of ``[N, ...]`` tensors (padded per sample).
        batch_size: samples per batch (per rank).
        train: shuffle per epoch and drop the last partial global batch; otherwise fixed order, every sample once.
        mean, std: normalisation statistics (of ``[0, 1]`` pixel values).
        device: where the data lives and batches are made.
        seed: base of the shuffling and augmentation randomness.
        rank, world_size: this process's shard.
        augment: the task's joint augmentation, applied to training batches (``None``: none).
        labels: ``[N]`` int64 image-level labels put in ``Batch.target`` (zeros when the task has none).
    """

    def __init__(
        self,
        images: Tensor,
        targets: Any,
        batch_size: int,
        *,
        train: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: JointAugment | None = None,
        labels: Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.targets = _to_device(targets, self.device)
        n = images.shape[0]
        self.labels = (labels if labels is not None else torch.zeros(n, dtype=torch.int64)).to(self.device)
        self.batch_size, self.train, self.mean, self.std = batch_size, train, mean, std
        self.seed, self.rank, self.world_size, self.augment = seed, rank, world_size, augment
        self.num_samples = self.dataset_size = n
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // (self.world_size * self.batch_size)
        return math.ceil(len(range(self.rank, self.num_samples, self.world_size)) / self.batch_size)

    def _order(self) -> Tensor:
        if self.train:
            shard = train_shard(
                self.num_samples,
                self.batch_size,
                seed=self.seed,
                epoch=self.epoch,
                rank=self.rank,
                world_size=self.world_size,
            )
            return shard.view(-1, self.batch_size)
        idx = torch.arange(self.rank, self.num_samples, self.world_size)
        return torch.split(idx, self.batch_size)  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        for i in range(self.start_batch, len(order)):
            idx = order[i].to(self.device)
            x = self.images[idx].float().div_(255.0)
            targets = index_targets(self.targets, idx)
            if self.train and self.augment is not None:
                # The batch's randomness comes from (seed, epoch, rank, batch) alone: a resumed epoch redraws it.
                g = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, self.epoch, self.rank, i, 7))
                x, targets = self.augment(x, targets, g)
            x = normalize(x.mul(255.0), self.mean, self.std)
            yield Batch(x, self.labels[idx], idx, targets=targets)
        self.start_batch = 0


__all__ = ["DenseTensorLoader", "JointAugment", "index_targets"]
