"""Plain supervised training: teachers and student baselines, on any task."""

from __future__ import annotations

from torch import Tensor, nn

from kdforge.data.batch import Batch
from kdforge.losses.logit import cross_entropy
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.registry import METHODS


@METHODS.register("vanilla")
class Vanilla(Method):
    """The task's own loss (cross-entropy on the labels for classification); no teacher.

    Args:
        student: the network being trained.
        label_smoothing: ε of label-smoothed cross-entropy (classification only; 0 = plain CE).
    """

    family = "baseline"
    paper = "-"
    summary = "the task's own loss without a teacher (teachers, student baselines)"
    needs_teacher = False
    tasks = ("*",)

    def __init__(self, student: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__(student)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        outputs = self.task.train_outputs(self.student, batch.input)
        if self.label_smoothing:
            if batch.targets is not None:
                raise ValueError("label_smoothing applies to classification; set method.label_smoothing=0")
            parts = {"ce": cross_entropy(outputs, batch.target, self.label_smoothing)}
        else:
            parts = self.task.loss(outputs, batch.task_targets)
        logits = outputs if isinstance(outputs, Tensor) and outputs.ndim == 2 else None
        return StepOutput(loss=total_loss(parts), losses=parts, logits=logits)

    def exports(self) -> dict[str, nn.Module]:
        # A run without a teacher trains one network, saved as model.pt (a teacher for later distillation).
        return {"model": self.student}
