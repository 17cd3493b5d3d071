"""SegmentationTask and SegmentationEvaluator: metrics against numpy, two-rank exactness, loss, predict, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdforge.data import _embedded_arrays
from kdforge.data.dense_augment import random_scale_crop_flip
from kdforge.data.segmentation import SegTensors
from kdforge.data.synth.segmentation import make_segmentation_canvases
from kdforge.errors import ConfigError
from kdforge.tasks.base import Evaluator
from kdforge.tasks.segmentation import (
    SegmentationEvaluator,
    SegmentationTask,
    confusion_matrix,
    masked_cross_entropy,
    metrics_from_confusion,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # These networks are tiny: one intra-op thread is as fast, and it avoids the large slowdowns of two spinning
    # threads on a loaded shared CPU.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _np_metrics(preds: np.ndarray, labels: np.ndarray, k: int, ignore: int = 255) -> dict[str, float]:
    """mmseg IoUMetric's arithmetic, pixel by pixel in numpy (no confusion matrix)."""
    valid = labels != ignore
    p, t = preds[valid], labels[valid]
    inter = np.array([np.sum((p == c) & (t == c)) for c in range(k)], dtype=np.float64)
    area_p = np.array([np.sum(p == c) for c in range(k)], dtype=np.float64)
    area_t = np.array([np.sum(t == c) for c in range(k)], dtype=np.float64)
    union = area_p + area_t - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / area_t
    out = {"aAcc": inter.sum() / area_t.sum() * 100, "mIoU": np.nanmean(iou) * 100, "mAcc": np.nanmean(acc) * 100}
    out.update({f"IoU.{c}": iou[c] * 100 for c in range(k)})
    out.update({f"Acc.{c}": acc[c] * 100 for c in range(k)})
    return out


def _random_batches(seed: int, k: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        labels = torch.randint(0, k - 1, (3, 9, 7), generator=g)  # class k-1 never labelled...
        preds = torch.where(
            torch.rand(3, 9, 7, generator=g) < 0.6, labels, torch.randint(0, k - 2, (3, 9, 7), generator=g)
        )
        labels[torch.rand(3, 9, 7, generator=g) < 0.15] = 255
        batches.append((preds, labels))  # ...and never predicted: its IoU and Acc are NaN
    return batches


def _assert_metrics_equal(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_evaluator_matches_numpy_over_the_whole_dataset() -> None:
    k = 6
    batches = _random_batches(0, k)
    ev = SegmentationEvaluator(k)
    for preds, labels in batches:
        ev.update(preds, labels)
    preds = np.concatenate([p.numpy().ravel() for p, _ in batches])
    labels = np.concatenate([t.numpy().ravel() for _, t in batches])
    want = _np_metrics(preds, labels, k)
    got = ev.compute()
    _assert_metrics_equal(got, want)
    assert math.isnan(got["IoU.5"]) and not math.isnan(got["mIoU"])
    assert isinstance(ev, Evaluator) and ev.primary == "mIoU" and ev.higher_is_better


def test_metrics_hand_example() -> None:
    # Labels [0, 0, 1, 255], predictions [0, 1, 1, 2]; class 2 is predicted only on an ignored pixel.
    preds = torch.tensor([[0, 1, 1, 2]])
    labels = torch.tensor([[0, 0, 1, 255]])
    cm = confusion_matrix(preds, labels, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    assert m["aAcc"] == pytest.approx(200 / 3)
    assert m["IoU.a"] == pytest.approx(50.0) and m["IoU.b"] == pytest.approx(50.0) and math.isnan(m["IoU.c"])
    assert m["Acc.a"] == pytest.approx(50.0) and m["Acc.b"] == pytest.approx(100.0) and math.isnan(m["Acc.c"])
    assert m["mIoU"] == pytest.approx(50.0) and m["mAcc"] == pytest.approx(75.0)


def test_class_predicted_but_never_labelled_counts_zero_iou() -> None:
    # mmseg: union > 0, intersect = 0 → IoU 0 (in the mean); label area 0 → Acc NaN (out of the mean).
    m = metrics_from_confusion(confusion_matrix(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]), 2))
    assert m["IoU.1"] == 0.0 and math.isnan(m["Acc.1"])
    assert m["mIoU"] == pytest.approx(25.0) and m["mAcc"] == pytest.approx(50.0)


class _TwoRankReducer:
    """Both ranks in one process: ``sum`` adds the other rank's state to the caller's."""

    def __init__(self, other: SegmentationEvaluator) -> None:
        self.other = other

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor + self.other.state()

    def gather(self, obj: object) -> list[object]:
        return [obj, obj]


def test_evaluator_is_exact_under_a_two_rank_reducer() -> None:
    k = 6
    batches = _random_batches(1, k, n=6)
    whole, rank0, rank1 = SegmentationEvaluator(k), SegmentationEvaluator(k), SegmentationEvaluator(k)
    for i, (preds, labels) in enumerate(batches):
        whole.update(preds, labels)
        (rank0 if i % 2 == 0 else rank1).update(preds, labels)
    want = whole.compute()
    _assert_metrics_equal(rank0.compute(_TwoRankReducer(rank1)), want)
    _assert_metrics_equal(rank1.compute(_TwoRankReducer(rank0)), want)
    rank0.reset()
    assert rank0.state().sum() == 0


def test_evaluator_class_names_and_errors() -> None:
    ev = SegmentationEvaluator(2, class_names=["bg", "cat"])
    ev.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    assert ev.compute()["IoU.cat"] == 100.0
    with pytest.raises(ConfigError, match="class names"):
        SegmentationEvaluator(3, class_names=["a"])
    with pytest.raises(ValueError, match="differ in shape"):
        ev.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))


def test_task_loss_predict_and_errors() -> None:
    task = SegmentationTask(num_classes=3)
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    mask = torch.randint(0, 3, (2, 4, 4))
    mask[0, 0] = 255
    parts = task.loss(logits, mask)
    valid = mask != 255
    ref = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[valid], mask[valid])
    assert set(parts) == {"ce"} and parts["ce"].item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.equal(task.predict(logits), logits.argmax(1))
    # A batch of padding only: zero loss, no NaN.
    all_ignored = masked_cross_entropy(logits, torch.full((2, 4, 4), 255))
    assert all_ignored.item() == 0.0
    # Low-resolution logits are resized to the mask.
    assert masked_cross_entropy(logits, torch.zeros(2, 8, 8, dtype=torch.long)).isfinite()
    assert task.evaluator().num_classes == 3 and task.name == "segmentation"
    with pytest.raises(ConfigError, match="unknown segmentation model"):
        task.build_model("unet")
    with pytest.raises(ConfigError, match="ignore_index"):
        SegmentationTask(num_classes=3, ignore_index=1)
    with pytest.raises(ConfigError, match="num_classes"):
        SegmentationTask(num_classes=1)


@pytest.fixture(scope="module")
def canvases() -> SegTensors:
    src = _embedded_arrays()
    return SegTensors.from_arrays(make_segmentation_canvases(src.train_images[:64], src.train_labels[:64], 8, seed=3))


def test_student_learns_the_synthetic_canvases(canvases: SegTensors) -> None:
    torch.manual_seed(0)
    task = SegmentationTask(num_classes=11)
    model = task.build_model("fcn_resnet8")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images = canvases.images.float() / 255 - 0.5
    losses = []
    for _ in range(30):
        loss = sum(task.loss(model(images), canvases.masks).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    ev = task.evaluator()
    model.eval()
    with torch.no_grad():
        ev.update(task.predict(model(images)), canvases.masks)
    assert ev.compute()["aAcc"] > 60.0


def test_augmented_batch_trains_through_the_task_loss(canvases: SegTensors) -> None:
    task = SegmentationTask(num_classes=11)
    model = task.build_model("fcn_resnet8")
    images, masks = random_scale_crop_flip(
        canvases.images.float() / 255, canvases.masks, generator=torch.Generator().manual_seed(0)
    )
    assert (masks == 255).any()  # zoomed-out samples carry padding, which the loss ignores
    loss = sum(task.loss(model(images), masks).values())
    loss.backward()
    assert loss.isfinite()
