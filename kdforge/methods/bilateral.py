"""Bilateral KD (reconstructed): a pretrained teacher and the student distill each other."""

from __future__ import annotations

from torch import nn

from kdforge.data.batch import Batch
from kdforge.losses.logit import cross_entropy, kd_loss
from kdforge.methods.base import Progress, StepOutput
from kdforge.methods.teacher_tuning import BNPolicy, TeacherScope, TunedTeacherMethod
from kdforge.registry import METHODS


@METHODS.register("bilateral")
class BilateralKD(TunedTeacherMethod):
    """``L_S = CE(z_s, y) + λ·τ²·KL(sg p_t ‖ p_s)`` and ``L_T = CE(z_t, y) + μ·τ²·KL(sg p_s ‖ p_t)``.

    Bilateral KD (Comput. Math. Methods Med. 2021, doi 10.1155/2021/4019358): only the summary could be read
    ("teacher and student distill each other"), so this is a reconstruction (METHODS.md §3.9): DML with a pretrained
    teacher fine-tuned at a lower learning rate, as in SOKD/SHAKE-style reverse distillation. It shares the
    teacher fine-tuning mode with ATF; both networks are evaluated and exported.

    Args:
        student: the network being trained.
        teacher: the pretrained teacher (fine-tuned copy; the original is kept frozen).
        temperature: τ.
        ce_weight: weight of the student's CE.
        kd_weight: λ, teacher → student.
        teacher_ce_weight: weight of the teacher's CE.
        reverse_weight: μ, student → teacher.
        teacher_lr_scale, teacher_bn, teacher_scope, teacher_start, teacher_stop: the teacher fine-tuning mode.
    """

    family = "logit"
    paper = "Bilateral KD, Comput. Math. Methods Med. (2021)"
    exact = False
    summary = "teacher and student distill each other; the pretrained teacher is fine-tuned"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        teacher_ce_weight: float = 1.0,
        reverse_weight: float = 0.3,
        teacher_lr_scale: float = 0.1,
        teacher_bn: BNPolicy = "train",
        teacher_scope: TeacherScope = "all",
        teacher_start: float = 0.0,
        teacher_stop: float = 1.0,
    ) -> None:
        super().__init__(
            student,
            teacher,
            teacher_lr_scale=teacher_lr_scale,
            teacher_bn=teacher_bn,
            teacher_scope=teacher_scope,
            teacher_start=teacher_start,
            teacher_stop=teacher_stop,
        )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if min(ce_weight, kd_weight, teacher_ce_weight, reverse_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        self.temperature = temperature
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self.teacher_ce_weight, self.reverse_weight = teacher_ce_weight, reverse_weight

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        x, y = batch.input, batch.target
        active = self.teacher_active(progress)
        logits_t = self.tuned_teacher_logits(x, active)
        logits_s = self.student(x)
        ce = self.ce_weight * cross_entropy(logits_s, y)
        kd = self.kd_weight * kd_loss(logits_s, logits_t.detach(), self.temperature)
        losses = {"ce": ce, "kd": kd}
        loss = ce + kd
        if active:
            t_ce = self.teacher_ce_weight * cross_entropy(logits_t, y)
            rev = self.reverse_weight * kd_loss(logits_t, logits_s.detach(), self.temperature)
            losses.update({"t_ce": t_ce, "rev": rev})
            loss = loss + t_ce + rev
        return StepOutput(loss=loss, losses=losses, logits=logits_s)


__all__ = ["BilateralKD"]
