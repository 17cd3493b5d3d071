"""Teacher fine-tuning during distillation: the mode shared by ATF and bilateral KD.

The pretrained teacher is copied into the trainable module (so one optimizer and one DDP wrapper cover it) with
its own parameter group and learning-rate scale; the untouched original stays frozen beside it as the anchor
``t0``. Both networks are exported at the end and the tuned teacher is evaluated with the student.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from kdforge.methods.base import Method, Progress

BNPolicy = Literal["eval", "train", "frozen"]
TeacherScope = Literal["all", "last_stage", "classifier"]


def _classifier(model: nn.Module) -> nn.Module:
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("teacher_scope=classifier needs a teacher with a linear classifier")
    return linears[-1]


def _last_stage(model: nn.Module) -> nn.Module:
    """The teacher's last feature stage, named by ``feature_info[-1].name`` (``layer3`` of a CIFAR ResNet)."""
    info = getattr(model, "feature_info", None)
    if info:
        try:
            return model.get_submodule(info[-1].name)
        except AttributeError:
            pass
    raise ValueError(
        "teacher_scope=last_stage needs a kdforge teacher whose feature_info names its last stage module; "
        "use teacher_scope=all or classifier"
    )


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


class TunedTeacherMethod(Method):
    """Base of methods that fine-tune the pretrained teacher while distilling.

    Args:
        student: the network being trained.
        teacher: the pretrained teacher; a trainable copy is made, the original stays frozen as the anchor.
        tune_teacher: make the trainable copy (``False`` keeps the plain frozen-teacher setting).
        teacher_lr_scale: the teacher group's learning rate as a multiple of the student's (same schedule shape).
        teacher_bn: BatchNorm of the tuned part: ``eval`` keeps its statistics fixed (affine parameters still
            learn), ``train`` lets them move with the new batches, ``frozen`` fixes statistics and affine
            parameters. BN layers outside ``teacher_scope`` always run in eval mode, exactly as in ``t0``.
        teacher_scope: ``all`` tunes every teacher parameter, ``last_stage`` the last feature stage and the
            classifier (the backward pass stops there; a teacher without ``feature_info`` stage names is tuned
            whole, with a warning), ``classifier`` only the final linear layer.
        teacher_start: fraction of training before which the teacher is not updated.
        teacher_stop: fraction of training after which the teacher is no longer updated.
        teacher_start_epoch: (fractional) epoch before which the teacher is not updated; both starts apply.
        teacher_every: update the teacher on every k-th optimizer step only (``progress.step % k == 0``); the other
            steps run it without gradient, like the frozen teacher.
        teacher_weight_decay: the teacher group's weight decay; ``None`` keeps the optimizer's (decay toward zero).
            A pretrained teacher should rather be pulled toward its own weights (``anchor_l2``), so ATF passes 0.
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
        teacher_start_epoch: float = 0.0,
        teacher_every: int = 1,
        teacher_weight_decay: float | None = None,
    ) -> None:
        super().__init__(student, teacher)
        if teacher_lr_scale < 0:
            raise ValueError(f"teacher_lr_scale must be >= 0, got {teacher_lr_scale}")
        if not 0.0 <= teacher_start <= teacher_stop <= 1.0:
            raise ValueError(f"need 0 <= teacher_start <= teacher_stop <= 1, got {teacher_start}, {teacher_stop}")
        if teacher_start_epoch < 0:
            raise ValueError(f"teacher_start_epoch must be >= 0, got {teacher_start_epoch}")
        if teacher_every < 1:
            raise ValueError(f"teacher_every must be >= 1, got {teacher_every}")
        if teacher_weight_decay is not None and teacher_weight_decay < 0:
            raise ValueError(f"teacher_weight_decay must be >= 0 or null, got {teacher_weight_decay}")
        if teacher_bn not in ("eval", "train", "frozen"):
            raise ValueError(f"teacher_bn must be eval, train or frozen, got {teacher_bn!r}")
        if teacher_scope not in ("all", "last_stage", "classifier"):
            raise ValueError(f"teacher_scope must be all, last_stage or classifier, got {teacher_scope!r}")
        self.teacher_lr_scale = teacher_lr_scale
        self.teacher_bn = teacher_bn
        self.teacher_scope = teacher_scope
        self.teacher_start = teacher_start
        self.teacher_stop = teacher_stop
        self.teacher_start_epoch = teacher_start_epoch
        self.teacher_every = teacher_every
        self.teacher_weight_decay = teacher_weight_decay
        self.tuned_teacher: nn.Module | None = None
        # Names (in the tuned teacher) of the BN layers whose mode follows teacher_bn; every other one stays eval.
        self._tuned_bn: set[str] = set()
        if tune_teacher:
            tuned = copy.deepcopy(teacher)
            tuned.requires_grad_(teacher_scope == "all")
            scope = tuned
            if teacher_scope == "classifier":
                scope = _classifier(tuned)
            elif teacher_scope == "last_stage":
                try:
                    scope = _last_stage(tuned)
                except ValueError as err:
                    # A teacher that does not name its stages (not a kdforge model) is tuned whole, said aloud.
                    warnings.warn(f"{err}; tuning every teacher parameter instead", stacklevel=2)
                    tuned.requires_grad_(True)
                else:
                    _classifier(tuned).requires_grad_(True)
            scope.requires_grad_(True)
            names = {id(m): n for n, m in tuned.named_modules()}
            self._tuned_bn = {names[id(m)] for m in scope.modules() if _is_bn(m)}
            if teacher_bn == "frozen":
                for m in tuned.modules():
                    if _is_bn(m):
                        m.requires_grad_(False)
            self.tuned_teacher = tuned
        else:
            self.trains_teacher = False
        self.train()

    def train(self, mode: bool = True) -> TunedTeacherMethod:
        super().train(mode)
        if self.tuned_teacher is not None:
            for name, m in self.tuned_teacher.named_modules():
                if _is_bn(m) and (self.teacher_bn != "train" or name not in self._tuned_bn):
                    m.eval()
        return self

    def teacher_active(self, progress: Progress) -> bool:
        """Whether the tuned teacher is updated at this step: inside ``[teacher_start, teacher_stop)`` of training,
        at or after ``teacher_start_epoch``, and on a step that is a multiple of ``teacher_every``."""
        return (
            self.tuned_teacher is not None
            and self.teacher_start <= progress.fraction < self.teacher_stop
            and progress.epoch_float >= self.teacher_start_epoch
            and progress.step % self.teacher_every == 0
        )

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

    @torch.no_grad()
    def pretrained_logits_like_tuned(self, x: Tensor) -> Tensor:
        """Logits ``[B, C]`` of the frozen pretrained teacher ``t0`` run in the tuned copy's BN modes.

        A KL anchor between the tuned copy (BN in train mode: batch statistics) and ``t0`` in eval mode (running
        statistics) is not zero even before any update, and pushes the weights to cancel a normalization
        difference. Here every BN layer of ``t0`` takes the mode of its tuned twin, and the forward runs on
        copies of ``t0``'s buffers, so its running statistics stay bit-identical while the outputs are those of
        the tuned copy at step 0.
        """
        assert self.tuned_teacher is not None and self.teacher is not None
        t0 = self.teacher
        modes = [_is_bn(m) and m.training for m in self.tuned_teacher.modules()]
        if not any(modes):
            return t0(x)
        try:
            for m, mode in zip(t0.modules(), modes, strict=True):
                m.training = mode
            state = {**dict(t0.named_parameters()), **{k: v.clone() for k, v in t0.named_buffers()}}
            return functional_call(t0, state, (x,))
        finally:
            t0.eval()

    @property
    def ddp_find_unused_parameters(self) -> bool:
        # Outside the update steps the tuned teacher runs under no_grad: its parameters get no gradient.
        windowed = self.teacher_start > 0.0 or self.teacher_stop < 1.0 or self.teacher_start_epoch > 0
        return self.tuned_teacher is not None and (windowed or self.teacher_every > 1)

    def anchor_l2(self) -> Tensor:
        """``Σ ‖θ_t − θ_t0‖²`` over the tuned teacher's trainable parameters (ATSC's weight anchor).

        Its gradient ``2(θ_t − θ_t0)`` is weight decay toward the pretrained weights instead of toward zero.
        """
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
            group: dict[str, Any] = {"name": "teacher", "params": teacher, "lr_scale": self.teacher_lr_scale}
            if self.teacher_weight_decay is not None:
                group["weight_decay"] = self.teacher_weight_decay
            groups.append(group)
        return groups

    def evaluators(self) -> dict[str, nn.Module]:
        return {"teacher": self.tuned_teacher} if self.tuned_teacher is not None else {}

    def exports(self) -> dict[str, nn.Module]:
        out = {"student": self.student}
        if self.tuned_teacher is not None:
            out["teacher"] = self.tuned_teacher
        return out


__all__ = ["BNPolicy", "TeacherScope", "TunedTeacherMethod"]
