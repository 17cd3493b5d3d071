"""The device-resident loader for CIFAR-sized datasets: the whole uint8 set lives on the training device.

Each epoch is a permutation of the dataset drawn from ``(seed, epoch)`` (identical on every rank), cut into global
batches of ``world_size × batch_size`` samples, and rank ``r`` takes the ``r``-th slice of each global batch
(:func:`train_shard`). A run on ``W`` ranks with ``batch_size`` B therefore trains on exactly the samples, in the same
order, of a one-process run with batch ``W·B``. Augmentation randomness comes from ``(seed, epoch, rank, batch)``. A
batch is therefore a pure function of those numbers, which is what makes ``set_epoch(epoch, start_batch)`` resume
an interrupted epoch bit-identically and lets every rank of a distributed run see its own shard.

Methods with ``needs_negatives`` (triplet KD, AMKD) also get, per sample, one training sample of another class:
drawn per batch by :class:`NegativeSampler` from the dataset's labels (by index, no second copy of the data), with
randomness from ``(seed, epoch, rank, batch)`` on a stream of its own, so negatives resume exactly too and switching
them on leaves the anchors' shuffling and augmentation unchanged.

With ``replay_views = K > 0`` augmentation is *replayed* instead of drawn afresh: every training sample has K fixed
crop/flip views, each a pure function of ``(seed, index, view)``, and each epoch shows sample ``index`` the view
``hash(seed, epoch, index) mod K``. The network still sees a different crop from epoch to epoch, but only K distinct
ones per sample, so a frozen teacher's logits for every ``(view, index)`` can be computed once and reused exactly
(:mod:`kdforge.engine.teacher_cache`). The view of a sample depends on neither its rank nor its batch, so every rank
of a distributed run agrees with the cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from kdforge.data.augment import crop_at, hflip_where, normalize, random_crop, random_hflip
from kdforge.data.batch import Batch
from kdforge.data.jda import JDAPolicy, jda_augment
from kdforge.seeding import mix_seed

_M32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit lane times one stays below 2**63, so int64 tensor arithmetic never overflows
# and masking the product to 32 bits is exactly multiplication mod 2**32, the same on every device.
_LANE_MUL = (0x5BD1E995, 0x27D4EB2F)


def hash_indices(key: int, *columns: Tensor) -> Tensor:
    """A 32-bit hash of each element of int64 tensors under a Python integer ``key``: :func:`mix_seed` for tensors.

    Per-sample randomness that must not depend on which batch, rank or position a sample lands in (replayed views)
    is a hash of the sample's index rather than a draw from a generator, computed on the tensors' device without a
    host round trip.

    Args:
        key: any integer (e.g. a :func:`mix_seed`); its low and high 32 bits both enter the hash.
        columns: int64 tensors of one shape (dataset indices, view ids), each taken mod 2**32.

    Returns:
        int64 tensor of that shape, values in ``[0, 2**32)``.
    """
    h = torch.full_like(columns[0], key & _M32)
    for part in ((key >> 32) & _M32, *columns):
        h = ((h ^ (part & _M32)) * _LANE_MUL[0]) & _M32
        h = h ^ (h >> 16)
    # Final avalanche, so that neighbouring indices (and views) land far apart in every bit.
    h = ((h ^ (h >> 15)) * _LANE_MUL[1]) & _M32
    h = ((h ^ (h >> 13)) * _LANE_MUL[0]) & _M32
    return h ^ (h >> 16)


def train_shard(n: int, batch_size: int, *, seed: int, epoch: int, rank: int, world_size: int) -> Tensor:
    """This rank's training indices for ``epoch``, batch after batch (the last partial global batch is dropped).

    The epoch's permutation of ``range(n)`` comes from ``(seed, epoch)`` and is the same on every rank; global batch
    ``b`` is ``perm[b·W·B : (b+1)·W·B]`` and rank ``r`` takes its slice ``[r·B, (r+1)·B)``. For ``W = 1`` this is the
    plain shuffled order. Every rank gets the same number of batches, so no rank waits at a collective for another.

    Returns:
        ``[num_batches · batch_size]`` int64 on the CPU.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
    num_batches = n // (world_size * batch_size)
    grid = perm[: num_batches * world_size * batch_size].view(num_batches, world_size, batch_size)
    return grid[:, rank].reshape(-1)


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
        replay_views: ``K > 0`` replays augmentation: each training sample has K fixed crop/flip views and each
            epoch shows one of them (``Batch.view_id``); needs ``augment`` and no JDA ``views``. 0 draws a fresh
            crop/flip per batch.
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
        replay_views: int = 0,
    ) -> None:
        if replay_views < 0:
            raise ValueError(f"replay_views must be >= 0, got {replay_views}")
        if replay_views and (not augment or views is not None):
            raise ValueError("replay_views replays crop/flip augmentation: it needs augment=True and no JDA views")
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
        self.replay_views = replay_views
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
        return train_shard(
            self.num_samples,
            self.batch_size,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
        )

    def __len__(self) -> int:
        if self.train:
            return self.num_samples // (self.world_size * self.batch_size)
        return math.ceil(len(range(self.rank, self.num_samples, self.world_size)) / self.batch_size)

    def _view_of(self, idx: Tensor, stream: int) -> Tensor | None:
        """``[B]`` the replayed view each sample shows this epoch (``None`` without replay); ``stream`` separates
        anchors from negatives."""
        if not (self.train and self.replay_views):
            return None
        return hash_indices(mix_seed(self.seed, self.epoch, stream), idx) % self.replay_views

    def _replay(self, x: Tensor, idx: Tensor, view: Tensor) -> Tensor:
        # Offsets and flip come from (seed, index, view) alone: the same view of a sample is the same pixels in any
        # epoch, batch, rank or cache pass.
        span = 2 * self.padding + 1
        h = hash_indices(mix_seed(self.seed, 5), idx, view)
        dy, dx = h % span, (h // span) % span
        return hflip_where(crop_at(x, dy, dx, self.padding), (h // (span * span)) % 2 == 1)

    def _finish(
        self, x: Tensor, g: torch.Generator | None, idx: Tensor | None = None, view: Tensor | None = None
    ) -> Tensor:
        if self.train and self.augment:
            if view is not None:
                assert idx is not None
                x = self._replay(x, idx, view)
            else:
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
            view_id = self._view_of(idx, 4)
            x = self._finish(raw, g, idx, view_id)
            neg = neg_idx = None
            if self.train and self._negatives is not None:
                gn = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, self.epoch, self.rank, i, 3))
                neg_idx = self._negatives(self.labels[idx], gn)
                neg = self._finish(self.images[neg_idx], gn, neg_idx, self._view_of(neg_idx, 6))
            yield Batch(x, self.labels[idx], idx, views, neg, neg_idx, view_id)
        self.start_batch = 0

    def iter_view(self, view: int, batch_size: int) -> Iterator[Batch]:
        """Every training sample once, in index order, exactly as training shows it in replayed view ``view``.

        This is what a teacher-output cache runs the teacher on: the same crop/flip, normalization and memory format
        as the training batches, but all ``N`` samples (not this rank's shard) in batches of ``batch_size``. Without
        augmentation there is one view, 0: the plain training input.

        Raises:
            ValueError: an evaluation loader, random (unreplayed) augmentation or JDA views (no fixed inputs), or a
                view outside ``[0, max(replay_views, 1))``.
        """
        if not self.train or self.views is not None or (self.augment and not self.replay_views):
            raise ValueError("only a training loader without random augmentation or JDA views has fixed inputs")
        if not 0 <= view < max(self.replay_views, 1):
            raise ValueError(f"view {view} outside [0, {max(self.replay_views, 1)})")
        for start in range(0, self.num_samples, batch_size):
            idx = torch.arange(start, min(start + batch_size, self.num_samples), device=self.device)
            view_id = torch.full_like(idx, view) if self.replay_views else None
            yield Batch(self._finish(self.images[idx], None, idx, view_id), self.labels[idx], idx, view_id=view_id)


__all__ = ["NegativeSampler", "TensorLoader", "hash_indices", "mix_seed", "train_shard"]
