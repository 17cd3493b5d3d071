"""Conv + BatchNorm folding of a method's frozen teacher, where every teacher output the method reads stays exact.

A frozen teacher in eval mode runs each BatchNorm as a fixed affine map; :func:`kdforge.models.fuse.fold_conv_bn`
merges it into the convolution before it, which keeps logits, ``forward_features`` (stage maps, pre-activations,
pooled vector) and hook-read features unchanged within float rounding and only changes the raw output of a folded
convolution. Every registered method reads its frozen teacher through ``teacher_logits``/``teacher_outputs`` (logits),
``read_features``/``forward_features`` (:class:`~kdforge.models.features.Features`) or, for AMKD, the gradient of the
teacher's loss with respect to its input; all three are functions of the folded network's preserved outputs, so
folding is exact for them. It is refused where it is not:

- a method that fine-tunes a copy of its teacher (``trains_teacher``: ATF, bilateral KD) keeps the frozen original as
  its anchor and pairs the copy's parameters with the original's one by one (``anchor_l2``); folding the original
  would remove BatchNorm parameters and rescale convolutions under that pairing, so it is never folded;
- a teacher that is not in eval mode with every parameter frozen.

A method that reads the raw output of a teacher convolution (a :class:`~kdforge.models.taps.FeatureTap` on a conv
module) must not be folded; no registered method does.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from kdforge.errors import ConfigError
from kdforge.methods.base import Method
from kdforge.models.fuse import fold_conv_bn


def fold_blocker(method: nn.Module) -> str | None:
    """Why folding the frozen teacher's conv + BN pairs would not be exact for ``method``; ``None`` when it is."""
    if not isinstance(method, Method) or method.teacher is None:
        return "the run has no frozen teacher"
    name = type(method).__name__
    if type(method).trains_teacher or getattr(method, "tuned_teacher", None) is not None:
        return (
            f"method {name} fine-tunes a copy of its teacher and pairs the copy's parameters with the frozen "
            "original's, which must therefore keep its BatchNorms"
        )
    teacher = method.teacher
    if any(m.training for m in teacher.modules()) or any(p.requires_grad for p in teacher.parameters()):
        return "the teacher is not frozen in eval mode"
    return None


def fold_frozen_teacher(
    method: nn.Module, example: Tensor, *, mode: Literal["auto", "on", "off"] = "auto"
) -> list[tuple[str, str]]:
    """Fold the conv + BatchNorm pairs of ``method``'s frozen teacher in place, where exact.

    Call it once the method is built and on its device (after ``channels_last`` conversion or before, either keeps
    the layout), before the teacher-output cache is filled and before ``torch.compile``. The teacher is not in the
    method's ``state_dict``, so checkpoints are unaffected; a resumed run folds again.

    Args:
        method: the method about to be trained.
        example: one input batch ``[B, C, H, W]`` (values unused) on the training device, for the dataflow probe.
        mode: ``off`` does nothing; ``auto`` folds where exact and leaves other teachers alone; ``on`` insists.

    Returns:
        The folded ``(conv, batchnorm)`` module names of the teacher (empty when nothing was folded).

    Raises:
        ConfigError: ``mode="on"`` where folding would not be exact; the message says why.
    """
    if mode == "off":
        return []
    reason = fold_blocker(method)
    if reason is not None:
        if mode == "on":
            raise ConfigError(f"teacher folding was asked for, but it would not be exact: {reason}")
        return []
    assert isinstance(method, Method) and method.teacher is not None
    with torch.no_grad():
        return fold_conv_bn(method.teacher, example)


__all__ = ["fold_blocker", "fold_frozen_teacher"]
