"""The batch every loader yields and every method consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
        negative: ``[B, C, H, W]`` images of other-class training samples, one per sample, augmented like ``input``
            (triplet KD, AMKD: methods with ``needs_negatives``); ``None`` otherwise.
        negative_index: ``[B]`` int64 dataset indices of those samples; ``None`` without negatives.
        view_id: ``[B]`` int64: which of the loader's ``replay_views`` fixed crop/flip views ``input`` shows for each
            sample (``data.replay_views > 0``); ``None`` otherwise. With ``index`` it names the exact input, which is
            what lets a teacher-output cache replace the teacher's forward.
        targets: the task's targets when they are more than a class label (dense tasks): a segmentation mask
            ``[B, H, W]``, a mapping of padded detection tensors (``boxes``, ``labels``, ...), a clean image; ``None``
            for classification, whose target is ``target``. Augmentation transforms ``input`` and ``targets``
            together.
    """

    input: Tensor
    target: Tensor
    index: Tensor
    views: tuple[Tensor, ...] = field(default_factory=tuple)
    negative: Tensor | None = None
    negative_index: Tensor | None = None
    view_id: Tensor | None = None
    targets: Any = None

    @property
    def task_targets(self) -> Any:
        """What the task's loss and evaluator compare predictions with: ``targets``, or the labels."""
        return self.target if self.targets is None else self.targets

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(
            self.input.to(device, non_blocking=non_blocking),
            self.target.to(device, non_blocking=non_blocking),
            self.index.to(device, non_blocking=non_blocking),
            tuple(v.to(device, non_blocking=non_blocking) for v in self.views),
            move(self.negative),
            move(self.negative_index),
            move(self.view_id),
            _move_targets(self.targets, device, non_blocking),
        )

    def __len__(self) -> int:
        return self.input.shape[0]


def batch_negatives(batch: Batch, method: str) -> Tensor:
    """``batch.negative`` ``[B, C, H, W]``: one training sample of another class per anchor.

    Raises:
        ValueError: the batch carries no negatives (saying where they come from), or their shape is not the input's.
    """
    if batch.negative is None:
        raise ValueError(
            f"method '{method}' needs an other-class negative per sample (Batch.negative): kdforge's loaders add "
            "them when the engine trains such a method (or build_data(..., negatives=True)); a custom loader must "
            "fill Batch.negative itself"
        )
    if batch.negative.shape != batch.input.shape:
        raise ValueError(f"Batch.negative has shape {tuple(batch.negative.shape)}, input {tuple(batch.input.shape)}")
    return batch.negative


def _move_targets(targets: Any, device: torch.device | str, non_blocking: bool) -> Any:
    if isinstance(targets, Tensor):
        return targets.to(device, non_blocking=non_blocking)
    if isinstance(targets, dict):
        return {k: _move_targets(v, device, non_blocking) for k, v in targets.items()}
    return targets
