"""Classification reports: confusion matrix, per-class precision/recall/F1, top-k, and the binary ROC curve.

Definitions follow scikit-learn's (``confusion_matrix``, ``precision_recall_fscore_support`` with ``zero_division=0``,
``roc_curve(drop_intermediate=False)``, ``roc_auc_score``) so that reports compare with what users compute
elsewhere; they are tested against independent numpy computations. Everything is a tensor op on the predictions'
device; the confusion matrix is additive, so it is all-reduced across processes like any count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """Counts ``cm[t, p]`` of samples of true class ``t`` predicted as ``p``.

    Args:
        pred: ``[N]`` int64 predicted classes.
        target: ``[N]`` int64 true classes in ``[0, num_classes)``.
        num_classes: ``K``.

    Returns:
        ``[K, K]`` int64.
    """
    flat = target.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class PerClass:
    """Per-class scores from a confusion matrix, each ``[K]`` float64 (support int64).

    A class never predicted has precision 0, a class with no samples recall 0, and F1 is 0 where precision and
    recall are both 0 (scikit-learn's ``zero_division=0``). ``macro_*`` average over all classes, ``weighted_*`` by
    support, and ``accuracy`` is the trace over the total.
    """

    precision: Tensor
    recall: Tensor
    f1: Tensor
    support: Tensor

    @property
    def macro_f1(self) -> float:
        return float(self.f1.mean())

    @property
    def weighted_f1(self) -> float:
        total = self.support.sum()
        return float((self.f1 * self.support).sum() / total) if total > 0 else 0.0


def per_class_scores(cm: Tensor) -> PerClass:
    """Precision, recall, F1 and support of every class of confusion matrix ``cm`` ``[K, K]`` (rows = truth)."""
    cm = cm.double()
    tp = cm.diagonal()
    predicted = cm.sum(dim=0)
    support = cm.sum(dim=1)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), torch.zeros_like(tp))
    return PerClass(precision, recall, f1, support.long())


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, Tensor]:
    """Number of samples whose true class is among the ``k`` highest scores, for each ``k`` (clipped to ``C``).

    Args:
        logits: ``[N, C]`` scores.
        target: ``[N]`` int64.
        ks: the ``k`` values.

    Returns:
        ``{k: int64 scalar tensor}``.
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == target[:, None]
    return {k: hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks}


@dataclass(frozen=True)
class RocCurve:
    """A binary ROC curve: ``fpr``, ``tpr`` and the score ``thresholds`` (descending, the first one ``+inf``)."""

    fpr: Tensor
    tpr: Tensor
    thresholds: Tensor

    @property
    def auc(self) -> float:
        """Area under the curve by the trapezoidal rule (equal to the Mann–Whitney statistic, ties counting 1/2)."""
        return float(torch.trapezoid(self.tpr, self.fpr))


def roc_curve(scores: Tensor, positive: Tensor) -> RocCurve:
    """The ROC curve of a score for the positive class, one point per distinct score value.

    Args:
        scores: ``[N]`` higher means more likely positive (e.g. the softmax probability of the positive class).
        positive: ``[N]`` bool, the ground truth.

    Returns:
        The curve from ``(0, 0)`` (threshold ``+inf``) to ``(1, 1)``; a threshold ``s`` predicts positive for
        ``score >= s``. With no positive (or no negative) sample the undefined rate is set to 0, as scikit-learn
        does after its warning.
    """
    scores = scores.double()
    order = torch.argsort(scores, descending=True, stable=True)
    s = scores[order]
    y = positive[order].double()
    tps = torch.cumsum(y, 0)
    fps = torch.cumsum(1 - y, 0)
    # keep the last index of each run of equal scores: all tied samples cross the threshold together
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tps, fps, thr = tps[last], fps[last], s[last]
    zero = torch.zeros(1, dtype=torch.float64, device=s.device)
    tps = torch.cat([zero, tps])
    fps = torch.cat([zero, fps])
    thr = torch.cat([torch.full_like(zero, float("inf")), thr])
    p, n = tps[-1], fps[-1]
    tpr = tps / p if p > 0 else torch.zeros_like(tps)
    fpr = fps / n if n > 0 else torch.zeros_like(fps)
    return RocCurve(fpr, tpr, thr)
