"""The batch every loader yields and every method consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Batch:
    """One training or evaluation batch.

    Attributes:
        input: ``[B, C, H, W]`` float images, normalized, on the training device.
        target: ``[B]`` int64 class labels.
        index: ``[B]`` int64 dataset indices of the samples (CRD/BRCD memory banks, triplet negatives).
        views: extra augmented views of the same samples, each ``[B, C, H, W]`` (JDA/CCD), empty otherwise.
    """

    input: Tensor
    target: Tensor
    index: Tensor
    views: tuple[Tensor, ...] = field(default_factory=tuple)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        return Batch(
            self.input.to(device, non_blocking=non_blocking),
            self.target.to(device, non_blocking=non_blocking),
            self.index.to(device, non_blocking=non_blocking),
            tuple(v.to(device, non_blocking=non_blocking) for v in self.views),
        )

    def __len__(self) -> int:
        return self.input.shape[0]
