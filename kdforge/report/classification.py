"""The classification report ``kdforge eval`` gives on request: per-class precision/recall/F1, the confusion matrix
(printed and as a PNG), top-k accuracy and, for two classes, the ROC curve with its AUC and a threshold table.

Computed from the whole test split's logits by :mod:`kdforge.ops.classification_metrics`; the definitions are
scikit-learn's, so the numbers compare with a user's own scripts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdforge.engine.checkpoint import atomic_write_text
from kdforge.ops.classification_metrics import (
    RocCurve,
    confusion_matrix,
    per_class_scores,
    roc_curve,
    topk_correct,
)
from kdforge.report.plots import _pyplot, _save


@dataclass
class ClassificationReport:
    """Everything the report shows; ``to_json()`` is what ``report.json`` holds.

    Attributes:
        classes: class names, in label order.
        confusion: ``[K, K]`` counts, rows = true class, columns = predicted class.
        per_class: rows of ``{"class", "precision", "recall", "f1", "support"}``.
        topk: ``{"top1": %, "top5": %, ...}``.
        macro_f1, weighted_f1: F1 averaged over classes, unweighted and by support.
        roc: the ROC curve of the second class's probability (two classes only).
        positive: the class the ROC curve treats as positive.
    """

    classes: list[str]
    confusion: Tensor
    per_class: list[dict[str, Any]]
    topk: dict[str, float]
    macro_f1: float
    weighted_f1: float
    roc: RocCurve | None = None
    positive: str | None = None
    thresholds: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "classes": self.classes,
            "confusion_matrix": self.confusion.tolist(),
            "per_class": self.per_class,
            "topk": self.topk,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
        }
        if self.roc is not None:
            out["roc"] = {
                "positive": self.positive,
                "auc": self.roc.auc,
                "fpr": self.roc.fpr.tolist(),
                "tpr": self.roc.tpr.tolist(),
                "thresholds": [t if t != float("inf") else "inf" for t in self.roc.thresholds.tolist()],
            }
            out["threshold_table"] = self.thresholds
        return out


def classification_report(
    logits: Tensor, target: Tensor, classes: Sequence[str], ks: tuple[int, ...] = (1, 5)
) -> ClassificationReport:
    """Builds the report from a whole split's logits.

    Args:
        logits: ``[N, K]`` scores of the network under test.
        target: ``[N]`` int64 labels.
        classes: ``K`` class names.
        ks: the top-k accuracies to report (k ≥ K is omitted: it is always 100 %).
    """
    k = logits.shape[1]
    if len(classes) != k:
        raise ValueError(f"{len(classes)} class names for {k} logits")
    logits, target = logits.detach().float().cpu(), target.detach().long().cpu()
    cm = confusion_matrix(logits.argmax(dim=1), target, k)
    scores = per_class_scores(cm)
    per_class = [
        {
            "class": name,
            "precision": float(scores.precision[i]),
            "recall": float(scores.recall[i]),
            "f1": float(scores.f1[i]),
            "support": int(scores.support[i]),
        }
        for i, name in enumerate(classes)
    ]
    n = max(len(target), 1)
    shown = tuple(kk for kk in ks if kk == 1 or kk < k)
    topk = {f"top{kk}": 100.0 * float(c) / n for kk, c in topk_correct(logits, target, shown).items()}
    report = ClassificationReport(list(classes), cm, per_class, topk, scores.macro_f1, scores.weighted_f1)
    if k == 2:
        prob = torch.softmax(logits, dim=1)[:, 1]
        positive = target == 1
        report.roc, report.positive = roc_curve(prob, positive), classes[1]
        for thr in (0.1, 0.25, 0.5, 0.75, 0.9):
            pred = prob >= thr
            tp = int((pred & positive).sum())
            fp = int((pred & ~positive).sum())
            fn = int((~pred & positive).sum())
            report.thresholds.append(
                {
                    "threshold": thr,
                    "precision": tp / (tp + fp) if tp + fp else 0.0,
                    "recall": tp / (tp + fn) if tp + fn else 0.0,
                    "false_positive_rate": fp / max(int((~positive).sum()), 1),
                }
            )
    return report


def format_classification_report(report: ClassificationReport) -> str:
    """The report as console text: top-k, a per-class table, the confusion matrix, AUC and thresholds."""
    width = max(8, *(len(c) for c in report.classes))
    lines = ["  ".join(f"{name} {value:.2f} %" for name, value in report.topk.items())]
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for row in report.per_class:
        lines.append(
            f"{row['class']:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:5.4f}  "
            f"{row['support']:7d}"
        )
    lines.append(f"{'macro F1':<{width}}  {report.macro_f1:.4f}   weighted F1 {report.weighted_f1:.4f}")
    lines.append("confusion matrix (rows: true class, columns: predicted):")
    cell = max(5, min(max(len(c) for c in report.classes), 10) + 1, len(str(int(report.confusion.max()))) + 1)
    short = [c[: cell - 1] for c in report.classes]
    lines.append(" " * width + "".join(f"{c:>{cell}}" for c in short))
    for name, row in zip(report.classes, report.confusion.tolist(), strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{cell}d}" for v in row))
    if report.roc is not None:
        lines.append(f"ROC AUC ({report.positive} as positive): {report.roc.auc:.4f}")
        for t in report.thresholds:
            lines.append(
                f"  p({report.positive}) >= {t['threshold']:.2f}: precision {t['precision']:.4f}, "
                f"recall {t['recall']:.4f}, false-positive rate {t['false_positive_rate']:.4f}"
            )
    return "\n".join(lines)


def plot_confusion_matrix(report: ClassificationReport, path: str | Path) -> Path:
    """The confusion matrix as a PNG, each row normalised to the class's recall (counts written in the cells)."""
    plt = _pyplot()
    cm = report.confusion.double()
    share = cm / cm.sum(dim=1, keepdim=True).clamp_min(1)
    k = len(report.classes)
    side = min(2.0 + 0.45 * k, 14.0)
    fig, ax = plt.subplots(figsize=(side, side), dpi=110)
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), report.classes, rotation=45, ha="right")
    ax.set_yticks(range(k), report.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                color = "white" if share[i, j] > 0.5 else "black"
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7, color=color)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(report: ClassificationReport, path: str | Path) -> Path:
    """The ROC curve (two classes) as a PNG, AUC in the legend."""
    if report.roc is None:
        raise ValueError("a ROC curve needs a two-class report")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.6), dpi=110)
    ax.plot(report.roc.fpr.numpy(), report.roc.tpr.numpy(), linewidth=1.8, label=f"AUC {report.roc.auc:.4f}")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel(f"true-positive rate ({report.positive})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def write_classification_report(report: ClassificationReport, out_dir: str | Path) -> list[Path]:
    """Writes ``report.json``, ``confusion_matrix.png`` and, for two classes, ``roc.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    atomic_write_text(written[0], json.dumps(report.to_json(), indent=2) + "\n")
    written.append(plot_confusion_matrix(report, out / "confusion_matrix.png"))
    if report.roc is not None:
        written.append(plot_roc(report, out / "roc.png"))
    return written
