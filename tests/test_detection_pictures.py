"""Detection pictures: boxes drawn where the detections are, ground truth in white, files written per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdforge.data import build_data
from kdforge.data.augment import CIFAR10_MEAN, CIFAR10_STD, normalize
from kdforge.report.detection_pictures import GT_COLOUR, PALETTE, denormalize, detection_pictures, draw_detections
from kdforge.tasks.detection import Detections, DetectionTask


def test_boxes_are_drawn_in_their_class_colour_above_the_threshold() -> None:
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    det = Detections(
        boxes=torch.tensor([[4.0, 6.0, 20.0, 24.0], [10.0, 10.0, 30.0, 30.0]]),
        scores=torch.tensor([0.9, 0.1]),
        labels=torch.tensor([2, 5]),
    )
    gt = torch.tensor([[1.0, 1.0, 3.0, 30.0]])
    arr = np.asarray(draw_detections(image, det, ["a", "b", "c", "d", "e", "f"], gt, score_threshold=0.3))
    assert arr.shape == (32, 32, 3)
    assert tuple(arr[15, 4]) == PALETTE[2] and tuple(arr[15, 20]) == PALETTE[2]  # left and right edges
    assert tuple(arr[30, 20]) == (0, 0, 0)  # the 0.1 detection is not drawn
    assert tuple(arr[15, 1]) == GT_COLOUR
    big = draw_detections(image, det, ["a"] * 6, scale=3)
    assert big.size == (96, 96) and tuple(np.asarray(big)[45, 12]) == PALETTE[2]


def test_denormalize_inverts_normalize() -> None:
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(denormalize(normalize(x, CIFAR10_MEAN, CIFAR10_STD), CIFAR10_MEAN, CIFAR10_STD), x)


def test_pictures_of_a_test_split(tmp_path: Path) -> None:
    data = build_data("cifar10_det", batch_size=4, eval_batch_size=3, train_subset=4, test_subset=5)
    task = DetectionTask(num_classes=10)
    torch.manual_seed(0)
    model = task.build_model("gfl_resnet8")
    paths = detection_pictures(
        model, task, data.test, data.classes, data.mean, data.std, tmp_path / "pics", 4, score_threshold=0.0, scale=2
    )
    assert [p.name for p in paths] == [f"detection_{i:03d}.png" for i in range(4)]
    with Image.open(paths[0]) as im:
        assert im.size == (192, 192)
