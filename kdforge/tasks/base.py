"""The task and evaluator interfaces (DESIGN.md §2b).

An :class:`Evaluator` accumulates over a whole split and reduces across processes itself, so the loop never knows
whether it is counting correct labels, filling a confusion matrix or gathering boxes. Collective operations reach it
through a :class:`Reducer`, which keeps this module free of ``torch.distributed`` and lets tests stand two ranks up
in one process.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Protocol

from torch import Tensor


class Reducer(Protocol):
    """The two collectives an evaluator needs. One process: ``sum`` is the identity, ``gather`` returns ``[obj]``."""

    def sum(self, tensor: Tensor) -> Tensor:
        """Element-wise sum of ``tensor`` over all processes (every process gets the result)."""
        ...

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj``, in rank order, on rank 0; ``None`` on the other ranks."""
        ...


class LocalReducer:
    """The reducer of a single process."""

    def sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]


class Evaluator(abc.ABC):
    """Accumulates predictions over a split and computes the task's metrics.

    ``compute`` must give the same numbers whether the split was seen by one process or spread over several:
    additive state (counts, confusion matrices) is summed, variable-size state (boxes, codes) is gathered to rank 0
    and scored there in dataset order.
    """

    #: the metric the loop tracks as ``best_<primary>``
    primary: ClassVar[str]
    #: whether a larger ``primary`` is better (mIoU, AP, mAP, PSNR: yes; a loss: no)
    higher_is_better: ClassVar[bool] = True

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything accumulated."""

    @abc.abstractmethod
    def update(self, preds: Any, targets: Any) -> None:
        """Add one batch: the task's post-processed predictions and the batch's targets."""

    @abc.abstractmethod
    def compute(self, reducer: Reducer | None = None) -> dict[str, float]:
        """Metrics over everything seen by every process. Rank 0 gets them all; other ranks may get ``{}`` where
        the metric needs gathered data."""
