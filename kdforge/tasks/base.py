"""The task and evaluator interfaces (DESIGN.md §2b).

An :class:`Evaluator` accumulates over a whole split and reduces across processes itself, so the loop never knows
whether it is counting correct labels, filling a confusion matrix or gathering boxes. Collective operations reach it
through a :class:`Reducer`, which keeps this module free of ``torch.distributed`` and lets tests stand two ranks up
in one process.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from kdforge.data.batch import Batch

#: the name under which :func:`kdforge.engine.evaluation.evaluate` passes the batches of the loader it evaluates
EVALUATED_SPLIT = "test"


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
    #: further named splits the evaluator scores the evaluated split against (retrieval: ``("database",)``): the
    #: engine encodes each with the same network and feeds it through :meth:`update_batch` under its name; the
    #: evaluated loader provides them as ``extra_splits`` (a mapping name → loader)
    extra_splits: tuple[str, ...] = ()
    #: of ``extra_splits``, those the engine also encodes with a distillation run's frozen teacher, fed as
    #: ``"teacher_<name>"`` (retrieval: student queries against a teacher-encoded database)
    teacher_splits: tuple[str, ...] = ()

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything accumulated."""

    @abc.abstractmethod
    def update(self, preds: Any, targets: Any) -> None:
        """Add one batch: the task's post-processed predictions and the batch's targets."""

    def update_batch(self, preds: Any, batch: Batch, split: str = EVALUATED_SPLIT) -> None:
        """Add one batch of ``split`` (:data:`EVALUATED_SPLIT`, a name of :attr:`extra_splits`, or
        ``"teacher_<name>"``): the engine's entry point. The default passes the evaluated split's batches to
        :meth:`update` with ``batch.task_targets``; an evaluator that needs dataset indices or extra splits
        overrides it."""
        if split != EVALUATED_SPLIT:
            raise ValueError(f"{type(self).__name__} scores one split; it was given batches of {split!r}")
        self.update(preds, batch.task_targets)

    @abc.abstractmethod
    def compute(self, reducer: Reducer | None = None) -> dict[str, float]:
        """Metrics over everything seen by every process, the same on every rank (the loop reads the primary
        metric everywhere): gathered metrics are scored on rank 0 and shared back through ``reducer.sum``."""


class Task(abc.ABC):
    """What a network is trained to do: its networks, its own loss, its post-processing and its evaluator.

    Constructor arguments are typed keywords (``num_classes``, ``ignore_index``, ``reg_max``, ``bits``), read as the
    task's config schema like a method's. A distillation method adds its terms to :meth:`loss`'s parts; it never
    re-implements the task loss.
    """

    #: the task's name in configs and on the command line
    name: ClassVar[str]
    #: metrics written to ``summary.json`` as ``final_<name>`` (the primary one is always there as ``best_<name>``)
    summary_metrics: ClassVar[tuple[str, ...]] = ()
    #: metrics written to ``summary.json`` as ``final_<name>`` only by the runs whose evaluator reports them (hashing:
    #: ``map_teacher_db``, which needs a teacher)
    optional_summary_metrics: ClassVar[tuple[str, ...]] = ()
    #: :meth:`build_model` takes ``pretrained`` (a zoo classifier's state dict for the backbone; ``model.pretrained``)
    takes_pretrained_backbone: ClassVar[bool] = False

    @classmethod
    @abc.abstractmethod
    def model_names(cls) -> list[str]:
        """The networks :meth:`build_model` knows, for config validation and ``kdforge models``."""

    @abc.abstractmethod
    def build_model(self, arch: str, **kwargs: Any) -> nn.Module:
        """The teacher or student network of this task called ``arch``."""

    def train_outputs(self, model: nn.Module, x: Tensor) -> Any:
        """What :meth:`loss` needs from a network in training (default ``model(x)``; a segmenter with an auxiliary
        head returns its features so the auxiliary loss can be taken)."""
        return model(x)

    @abc.abstractmethod
    def loss(self, outputs: Any, targets: Any) -> dict[str, Tensor]:
        """The student's own task loss as named, already weighted parts (their sum is the task loss)."""

    @abc.abstractmethod
    def predict(self, outputs: Any) -> Any:
        """Post-processing of raw network outputs into predictions (kept outside any exported graph)."""

    @abc.abstractmethod
    def evaluator(self) -> Evaluator:
        """A fresh evaluator for this task's metrics."""

    def export_module(self, model: nn.Module) -> nn.Module:
        """What ``kdforge export`` writes for a trained ``model``: the network itself (default), or a wrapper that
        adds the part of post-processing a deployment needs inside the graph (a hasher's binarisation). It must
        trace: static control flow only."""
        return model
