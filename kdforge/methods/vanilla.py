"""Plain supervised training: teachers and student baselines."""

from __future__ import annotations

from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.logit import cross_entropy
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.registry import METHODS


@METHODS.register("vanilla")
class Vanilla(Method):
    """Cross-entropy on the labels; no teacher.

    Args:
        student: the network being trained.
        label_smoothing: ε of label-smoothed cross-entropy (0 = plain CE).
    """

    family = "baseline"
    paper = "-"
    summary = "cross-entropy training without a teacher (teachers, student baselines)"
    needs_teacher = False

    def __init__(self, student: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__(student)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        logits = self.student(batch.input)
        ce = cross_entropy(logits, batch.target, self.label_smoothing)
        return StepOutput(loss=ce, losses={"ce": ce}, logits=logits)

    def exports(self) -> dict[str, nn.Module]:
        # A run without a teacher trains one network, saved as model.pt (a teacher for later distillation).
        return {"model": self.student}
