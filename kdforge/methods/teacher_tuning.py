"""Teacher fine-tuning during distillation: the mode shared by ATF and bilateral KD.

The pretrained teacher is copied into the trainable module (so one optimizer and one DDP wrapper cover it) with
its own parameter group and learning-rate scale; the untouched original stays frozen beside it as the anchor
``t0``. Both networks are exported at the end and the tuned teacher is evaluated with the student.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdforge.methods.base import Method, Progress

BNPolicy = Literal["eval", "train", "frozen"]
TeacherScope = Literal["all", "classifier"]


def _classifier(model: nn.Module) -> nn.Module:
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("teacher_scope=classifier needs a teacher with a linear classifier")
    return linears[-1]


class TunedTeacherMethod(Method):
    """Base of methods that fine-tune the pretrained teacher while distilling.

    Args:
        student: the network being trained.
        teacher: the pretrained teacher; a trainable copy is made, the original stays frozen as the anchor.
        tune_teacher: make the trainable copy (``False`` keeps the plain frozen-teacher setting).
        teacher_lr_scale: the teacher group's learning rate as a multiple of the student's (same schedule shape).
        teacher_bn: ``eval`` keeps the teacher's BN statistics fixed (affine parameters still learn), ``train``
            lets them move with the new batches, ``frozen`` fixes statistics and affine parameters.
        teacher_scope: ``all`` tunes every teacher parameter, ``classifier`` only the final linear layer.
        teacher_start: fraction of training before which the teacher is not updated.
        teacher_stop: fraction of training after which the teacher is no longer updated.
    """

    trains_teacher = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        tune_teacher: bool = True,
        teacher_lr_scale: float = 0.1,
        teacher_bn: BNPolicy = "train",
        teacher_scope: TeacherScope = "all",
        teacher_start: float = 0.0,
        teacher_stop: float = 1.0,
    ) -> None:
        super().__init__(student, teacher)
        if teacher_lr_scale < 0:
            raise ValueError(f"teacher_lr_scale must be >= 0, got {teacher_lr_scale}")
        if not 0.0 <= teacher_start <= teacher_stop <= 1.0:
            raise ValueError(f"need 0 <= teacher_start <= teacher_stop <= 1, got {teacher_start}, {teacher_stop}")
        if teacher_bn not in ("eval", "train", "frozen"):
            raise ValueError(f"teacher_bn must be eval, train or frozen, got {teacher_bn!r}")
        self.teacher_lr_scale = teacher_lr_scale
        self.teacher_bn = teacher_bn
        self.teacher_start = teacher_start
        self.teacher_stop = teacher_stop
        self.tuned_teacher: nn.Module | None = None
        if tune_teacher:
            tuned = copy.deepcopy(teacher)
            tuned.requires_grad_(teacher_scope == "all")
            if teacher_scope == "classifier":
                _classifier(tuned).requires_grad_(True)
            if teacher_bn == "frozen":
                for m in tuned.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.requires_grad_(False)
            self.tuned_teacher = tuned
        else:
            self.trains_teacher = False
        self.train()

    def train(self, mode: bool = True) -> TunedTeacherMethod:
        super().train(mode)
        if self.tuned_teacher is not None and self.teacher_bn != "train":
            for m in self.tuned_teacher.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def teacher_active(self, progress: Progress) -> bool:
        """Whether the tuned teacher is updated at this step (inside ``[teacher_start, teacher_stop)``)."""
        return self.tuned_teacher is not None and self.teacher_start <= progress.fraction < self.teacher_stop

    def tuned_teacher_logits(self, x: Tensor, active: bool) -> Tensor:
        """Logits of the tuned teacher, with gradient only while it is being updated."""
        assert self.tuned_teacher is not None
        if active:
            return self.tuned_teacher(x)
        # Outside the update window the teacher must not change at all: no gradient, and no BN statistics
        # either (a train-mode forward would move them), so it runs in eval mode.
        was_training = self.tuned_teacher.training
        self.tuned_teacher.eval()
        try:
            with torch.no_grad():
                return self.tuned_teacher(x)
        finally:
            if was_training:
                self.train(True)

    @property
    def ddp_find_unused_parameters(self) -> bool:
        # Outside [teacher_start, teacher_stop) the tuned teacher runs under no_grad: its parameters get no gradient.
        return self.tuned_teacher is not None and (self.teacher_start > 0.0 or self.teacher_stop < 1.0)

    def anchor_l2(self) -> Tensor:
        """``Σ ‖θ_t − θ_t0‖²`` over the tuned teacher's trainable parameters (ATSC's weight anchor)."""
        assert self.tuned_teacher is not None and self.teacher is not None
        pairs = zip(self.tuned_teacher.parameters(), self.teacher.parameters(), strict=True)
        terms = [(p.float() - p0.float()).pow(2).sum() for p, p0 in pairs if p.requires_grad]
        return torch.stack(terms).sum() if terms else torch.zeros((), device=next(self.parameters()).device)

    def param_groups(self) -> list[dict[str, Any]]:
        if self.tuned_teacher is None:
            return super().param_groups()
        teacher_ids = {id(p) for p in self.tuned_teacher.parameters()}
        student = [p for p in self.trainable_parameters() if id(p) not in teacher_ids]
        teacher = [p for p in self.tuned_teacher.parameters() if p.requires_grad]
        groups = [{"name": "student", "params": student, "lr_scale": 1.0}]
        if teacher:
            groups.append({"name": "teacher", "params": teacher, "lr_scale": self.teacher_lr_scale})
        return groups

    def evaluators(self) -> dict[str, nn.Module]:
        return {"teacher": self.tuned_teacher} if self.tuned_teacher is not None else {}

    def exports(self) -> dict[str, nn.Module]:
        out = {"student": self.student}
        if self.tuned_teacher is not None:
            out["teacher"] = self.tuned_teacher
        return out


__all__ = ["BNPolicy", "TeacherScope", "TunedTeacherMethod"]
