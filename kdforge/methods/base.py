"""The method interface: one ``nn.Module`` that holds the student and every trainable module a method owns.

The frozen teacher is deliberately *not* a registered submodule: that keeps it out of the optimizer, out of DDP's
gradient reduction and out of the method's state dict, while ``.to()``/``.train()`` still reach it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdforge.data.batch import Batch


@dataclass
class StepOutput:
    """What a training step returns.

    Attributes:
        loss: the scalar the engine backpropagates.
        losses: named, already weighted parts of ``loss`` (for logging; the engine never sums them).
        logits: ``[B, C]`` student logits of ``batch.input`` (train accuracy).
    """

    loss: Tensor
    losses: dict[str, Tensor]
    logits: Tensor


@dataclass(frozen=True)
class Progress:
    """Where training stands when a step runs.

    Attributes:
        epoch: 0-based epoch.
        step: global optimizer step (batches done so far).
        epoch_float: fractional epoch.
        fraction: share of the whole run done, in ``[0, 1)``.
        substep: which of the method's ``substeps`` updates of this batch runs (0 for most methods).
    """

    epoch: int
    step: int
    epoch_float: float
    fraction: float
    substep: int = 0


class Method(nn.Module, abc.ABC):
    """Base class of every distillation method.

    Subclasses set the class attributes below, take typed keyword arguments in ``__init__`` (the config schema is
    read from that signature) and implement :meth:`forward_train`.

    Args:
        student: the network being trained.
        teacher: the pretrained teacher, frozen here (``requires_grad_(False)``, kept in eval mode).
    """

    family: ClassVar[str] = "logit"
    paper: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    needs_index: ClassVar[bool] = False
    needs_views: ClassVar[bool] = False
    #: every training batch must carry ``Batch.negative``: one sample of another class per anchor (triplet KD, AMKD).
    needs_negatives: ClassVar[bool] = False
    trains_teacher: ClassVar[bool] = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.student = student
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        object.__setattr__(self, "_frozen_teacher", teacher)

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher, or ``None``."""
        return self.__dict__["_frozen_teacher"]

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Method:  # type: ignore[override]
        # .to(), .cuda(), .float() and channels_last conversion all go through _apply; the teacher follows.
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BN statistics of a frozen teacher must never move.
        return self

    def forward(self, batch: Batch, progress: Progress) -> StepOutput:
        return self.forward_train(batch, progress)

    @abc.abstractmethod
    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        """One training step's losses for ``batch``."""

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        """Frozen-teacher logits ``[B, C]`` under ``no_grad``."""
        assert self.teacher is not None
        return self.teacher(x)

    def forward_eval(self, x: Tensor) -> Tensor:
        """Student logits for evaluation."""
        return self.student(x)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; a ``lr_scale`` key scales the base learning rate for that group."""
        return [{"name": "student", "params": list(self.trainable_parameters()), "lr_scale": 1.0}]

    @property
    def substeps(self) -> int:
        """Optimizer updates per batch. 1 for almost every method; DML's alternating mode updates each peer in
        turn on the same batch, so the engine calls ``forward_train`` once per peer with ``progress.substep``."""
        return 1

    def evaluators(self) -> dict[str, nn.Module]:
        """Extra networks the engine evaluates beside the student, by name (a fine-tuned teacher, peers, an
        ensemble); their top-1 is logged as ``<name>_top1``."""
        return {}

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch (0-based)."""

    def on_step_end(self, progress: Progress) -> None:
        """Called after each optimizer step."""

    def extra_state(self) -> dict[str, Any]:
        """Method state that is not in ``state_dict()`` (counters, schedules), saved in checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def exports(self) -> dict[str, nn.Module]:
        """Networks written as plain state dicts at the end of a run, by file stem."""
        return {"student": self.student}
