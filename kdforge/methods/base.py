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
from kdforge.tasks.base import Task
from kdforge.tasks.classification import ClassificationTask


@dataclass
class StepOutput:
    """What a training step returns.

    Attributes:
        loss: the scalar the engine backpropagates.
        losses: named, already weighted parts of ``loss`` (for logging; the engine never sums them).
        logits: ``[B, C]`` student logits of ``batch.input`` (train accuracy); ``None`` for dense tasks, whose
            outputs have no label accuracy.
    """

    loss: Tensor
    losses: dict[str, Tensor]
    logits: Tensor | None


def total_loss(parts: dict[str, Tensor]) -> Tensor:
    """The sum of named loss parts, in their order (one part is returned as it is, with no ``0 +``)."""
    values = iter(parts.values())
    total = next(values)
    for value in values:
        total = total + value
    return total


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
    #: the method ships a config for every standard teacher-student pair (12 CIFAR-100, ImageNet R34->R18; generated
    #: by scripts/make_configs.py). Defaults to ``needs_teacher``: a teacher-less method (vanilla, DML, PURF) has no
    #: pairs. A new distillation method declares ``False`` until its pair configs exist.
    standard_pairs: ClassVar[bool] = True
    #: registry names of the students the method can train, or empty for any classifier (DATS needs the
    #: attention-sampled ``dats_*`` networks); generic tests build the first one.
    student_models: ClassVar[tuple[str, ...]] = ()
    #: the tasks the method distils (``kdforge.registry.TASKS`` names, ``"*"`` for every task); the registry-wide
    #: tests pair the method with each of them, and ``create_method`` refuses any other.
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    #: the frozen, eval-mode teacher's only job is logits of ``batch.input``, asked through :meth:`teacher_outputs`,
    #: so they may be computed once per ``(view, sample)`` and reused when the data repeats
    #: (:mod:`kdforge.engine.teacher_cache`). A subclass that overrides ``forward_train`` must declare it again.
    teacher_cacheable: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "standard_pairs" not in cls.__dict__:
            cls.standard_pairs = cls.needs_teacher

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None) -> None:
        super().__init__()
        self.student = student
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        object.__setattr__(self, "_frozen_teacher", teacher)
        # What the student is trained to do (its own loss, post-processing, evaluator). create_method sets the run's
        # task after construction; a plain attribute, not a module: a task holds no parameters.
        self.task: Task = ClassificationTask(getattr(student, "num_classes", None))
        # A plain attribute, not a buffer: the cache is rebuilt at fit start and must stay out of state_dict,
        # checkpoints and DDP's buffer broadcast.
        self._teacher_cache: Tensor | None = None
        self._teacher_cache_dtype = torch.float32

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

    def teacher_outputs(self, batch: Batch) -> Tensor:
        """Frozen-teacher logits ``[B, C]`` of ``batch.input``.

        With a cache attached (:meth:`set_teacher_cache`) they are gathered by ``(batch.view_id, batch.index)`` on
        the device, no teacher forward and no host synchronisation; otherwise this is :meth:`teacher_logits`.
        """
        cache = self._teacher_cache
        if cache is None:
            return self.teacher_logits(batch.input)
        if batch.view_id is None:
            if cache.shape[0] != 1:
                raise RuntimeError(f"the teacher cache holds {cache.shape[0]} views but the batch has no view_id")
            rows = cache[0].index_select(0, batch.index)
        else:
            rows = cache[batch.view_id, batch.index]
        # Back to the dtype the teacher's forward produced (bf16 under autocast): the round trip through float32 is
        # exact, so the loss sees the very values an uncached step would.
        return rows.to(self._teacher_cache_dtype)

    def set_teacher_cache(self, logits: Tensor | None, dtype: torch.dtype = torch.float32) -> None:
        """Serve :meth:`teacher_outputs` from ``logits`` (``None`` detaches the cache).

        Args:
            logits: ``[V, N, C]`` float32 on the training device: the teacher's logits of view ``v`` of training
                sample ``n`` (``V = 1`` without replayed views).
            dtype: the dtype the teacher's forward returned when the cache was filled; outputs are cast back to it.
        """
        self._teacher_cache = logits
        self._teacher_cache_dtype = dtype

    @property
    def teacher_cache(self) -> Tensor | None:
        """The attached ``[V, N, C]`` teacher-logit cache, or ``None``."""
        return self._teacher_cache

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

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """Whether some trainable parameters can get no gradient in a step (a teacher tuned only inside a window,
        one DML peer per substep). DDP must then search the autograd graph for them every step, so it is asked
        only for the methods and settings that need it."""
        return False

    def ddp_ignored_state(self) -> list[str]:
        """Names of buffers the method keeps identical on every rank itself (from all-gathered updates), which DDP
        must therefore not overwrite with rank 0's copy at every forward."""
        return []

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
