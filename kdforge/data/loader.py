"""The device-resident loader for CIFAR-sized datasets: the whole uint8 set lives on the training device.

Each epoch is a permutation of the dataset drawn from ``(seed, epoch)`` (identical on every rank), cut into equal
disjoint rank shards and then into batches; augmentation randomness comes from ``(seed, epoch, rank, batch)``. A
batch is therefore a pure function of those numbers, which is what makes ``set_epoch(epoch, start_batch)`` resume
an interrupted epoch bit-identically and lets every rank of a distributed run see its own shard.

Methods with ``needs_negatives`` (triplet KD, AMKD) also get, per sample, one training sample of another class:
drawn per batch by :class:`NegativeSampler` from the dataset's labels (by index, no second copy of the data), with
randomness from ``(seed, epoch, rank, batch)`` on a stream of its own, so negatives resume exactly too and switching
them on leaves the anchors' shuffling and augmentation unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from kdforge.data.augment import normalize, random_crop, random_hflip
from kdforge.data.batch import Batch
from kdforge.data.jda import JDAPolicy, jda_augment

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads nearby (seed, epoch, ...) tuples over the seed space


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (a tiny hash, stable across processes and Python versions)."""
    h = 0
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & 0x7FFFFFFFFFFFFFFF


class NegativeSampler:
    """Draws, for each anchor, one training sample uniformly among all samples of the other classes.

    This is the negative of triplet KD (Oki et al., IJCNN 2020; i13abe/Triplet-Loss-for-Knowledge-Distillation
    ``utils/datasets.py:KDTripletDataset`` draws ``np.random.choice(np.where(labels != label)[0])``): uniform over
    *samples* of other classes, so a class's chance is proportional to its size. The draw is vectorised: indices are
    grouped by class once, a rank ``r`` is drawn uniformly in ``[0, N − n_y)`` and mapped past the anchor's own
    class block.

    Args:
        labels: ``[N]`` int64 labels of the training set (on the device where negatives are drawn).

    Raises:
        ValueError: fewer than two classes are present (no sample has a negative).
    """

    def __init__(self, labels: Tensor) -> None:
        labels = labels.to(torch.int64)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty [N] tensor, got shape {tuple(labels.shape)}")
        counts = torch.bincount(labels)
        if int((counts > 0).sum()) < 2:
            raise ValueError("negatives need a training set with at least two classes")
        self.labels = labels
        self.order = torch.argsort(labels, stable=True)  # dataset indices grouped by class, in index order
        self.count = counts
        self.start = torch.cumsum(counts, 0) - counts  # position of each class's block in `order`
        self.num_samples = len(labels)

    def __call__(self, target: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``[B]`` dataset indices of one other-class sample per anchor label in ``target`` ``[B]``."""
        n_other = self.num_samples - self.count[target]
        # float64: a float32 uniform has 24 bits, too coarse to reach every rank of an ImageNet-sized class complement.
        u = torch.rand(target.shape, generator=generator, device=target.device, dtype=torch.float64)
        r = torch.minimum((u * n_other).long(), n_other - 1)
        pos = torch.where(r < self.start[target], r, r + self.count[target])  # skip the anchor's own class
        return self.order[pos]


class TensorLoader:
    """Batches of a uint8 tensor dataset held on ``device``.

    Args:
        images: ``[N, C, H, W]`` uint8.
        labels: ``[N]`` int64.
        batch_size: samples per batch (per rank).
        train: shuffle per epoch and drop the last partial batch; otherwise fixed order, every sample once.
        augment: random crop (padding 4) and horizontal flip on training batches.
        mean, std: normalization statistics.
        device: where the data lives and batches are made.
        seed: base of the shuffling and augmentation randomness.
        rank, world_size: this process's shard.
        channels_last: return inputs in channels-last memory format.
        views: a JDA policy: training batches then carry one extra augmented view (``Batch.views``).
        padding: random-crop padding.
        negatives: training batches carry one other-class sample per anchor (``Batch.negative``); settable later
            through the ``negatives`` attribute.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        train: bool,
        augment: bool = True,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        views: JDAPolicy | None = None,
        padding: int = 4,
        negatives: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size, self.train, self.augment = batch_size, train, augment
        self.mean, self.std = mean, std
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.channels_last, self.views, self.padding = channels_last, views, padding
        self.num_samples = len(images)
        self.epoch, self.start_batch = 0, 0
        self._negatives: NegativeSampler | None = None
        self.negatives = negatives

    @property
    def negatives(self) -> bool:
        """Whether training batches carry ``Batch.negative`` (evaluation batches never do)."""
        return self._negatives is not None

    @negatives.setter
    def negatives(self, on: bool) -> None:
        self._negatives = NegativeSampler(self.labels) if on and self.train else None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation; ``start_batch`` skips the batches an interrupted run already did."""
        self.epoch, self.start_batch = epoch, start_batch

    def _shard(self) -> Tensor:
        if not self.train:
            return torch.arange(self.num_samples)[self.rank :: self.world_size]
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.num_samples, generator=g)
        per_rank = self.num_samples // self.world_size  # equal shards: every rank runs the same number of steps
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        n = len(self._shard()) if not self.train else self.num_samples // self.world_size
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _finish(self, x: Tensor, g: torch.Generator | None) -> Tensor:
        if self.train and self.augment:
            x = random_hflip(random_crop(x, self.padding, g), g)
        out = normalize(x, self.mean, self.std)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __iter__(self) -> Iterator[Batch]:
        order = self._shard().to(self.device)
        for i in range(self.start_batch, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            raw = self.images[idx]
            g = None
            if self.train:
                g = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, self.epoch, self.rank, i, 1))
            views: tuple[Tensor, ...] = ()
            if self.train and self.views is not None:
                views = (self._finish(jda_augment(raw, self.views, g), g),)
            x = self._finish(raw, g)
            neg = neg_idx = None
            if self.train and self._negatives is not None:
                gn = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, self.epoch, self.rank, i, 3))
                neg_idx = self._negatives(self.labels[idx], gn)
                neg = self._finish(self.images[neg_idx], gn)
            yield Batch(x, self.labels[idx], idx, views, neg, neg_idx)
        self.start_batch = 0


__all__ = ["NegativeSampler", "TensorLoader", "mix_seed"]
