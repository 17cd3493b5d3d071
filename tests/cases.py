"""Method × task test cases: every registered method paired with every task it declares, with tiny networks and
batches of that task, for the registry-wide tests (test_methods, test_checkpoint_roundtrip, ...).

A new task adds one entry to ``TASK_CASES``; a test fails until it does (``test_every_task_has_a_test_case``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from conftest import TinyNet
from torch import nn

from kdforge.data.batch import Batch
from kdforge.methods import METHODS, Method, create_method
from kdforge.models import create_model
from kdforge.models.dense.enhancer import UNetEnhancer
from kdforge.registry import TASKS
from kdforge.tasks.base import Task

NUM_CLASSES = 4
CONTEXT = {"num_classes": NUM_CLASSES, "num_train": 64, "epochs": 2, "steps_per_epoch": 4}


@dataclass
class TaskCase:
    """How to build a tiny student, teacher and batch of one task."""

    task: Callable[[], Task]
    student: Callable[[int], nn.Module]
    teacher: Callable[[int], nn.Module]
    batch: Callable[[Method, int], Batch]


def _seeded(make: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return make()

    return build


def _classification_batch(method: Method, seed: int, n: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    views = (x + 0.1 * torch.randn(n, 3, 8, 8, generator=g),) if method.needs_views else ()
    batch = Batch(
        x, torch.randint(0, NUM_CLASSES, (n,), generator=g), (torch.arange(n) + n * seed) % CONTEXT["num_train"], views
    )
    if method.needs_negatives:  # other-class samples (triplet KD, AMKD); their labels do not matter here
        batch.negative, batch.negative_index = torch.randn(n, 3, 8, 8, generator=g), torch.arange(n).flip(0)
    return batch


def _segmentation_batch(method: Method, seed: int, n: int = 4) -> Batch:
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, NUM_CLASSES, (n, 32, 32), generator=g)
    masks[:, :2] = 255  # a band of ignored pixels
    x = torch.randn(n, 3, 32, 32, generator=g)
    return Batch(
        x, torch.zeros(n, dtype=torch.int64), (torch.arange(n) + n * seed) % CONTEXT["num_train"], targets=masks
    )


def _enhancement_batch(method: Method, seed: int, n: int = 4) -> Batch:
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(n, 3, 16, 16, generator=g)
    low = (clean * 0.2 + 0.02 * torch.rand(n, 3, 16, 16, generator=g)).clamp(0, 1)  # dark, noisy input in [0, 1]
    return Batch(
        low, torch.zeros(n, dtype=torch.int64), (torch.arange(n) + n * seed) % CONTEXT["num_train"], targets=clean
    )


def _detection_batch(method: Method, seed: int, n: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    # a small, a medium and a large box per image, so every FPN level gets positives (and its scale a gradient)
    wh = torch.tensor([10.0, 24.0, 48.0])[None, :, None] + torch.rand(n, 3, 2, generator=g) * 4
    xy = torch.rand(n, 3, 2, generator=g) * (64 - wh)
    boxes = torch.cat((xy, xy + wh), dim=-1)
    boxes = torch.cat((boxes, torch.zeros(n, 1, 4)), dim=1)
    labels = torch.randint(0, NUM_CLASSES, (n, 4), generator=g)
    labels[:, -1] = -1  # a padding row
    targets = {"boxes": boxes * (labels >= 0)[..., None], "labels": labels, "image_ids": torch.arange(n) + n * seed}
    x = torch.randn(n, 3, 64, 64, generator=g)
    return Batch(
        x, torch.zeros(n, dtype=torch.int64), (torch.arange(n) + n * seed) % CONTEXT["num_train"], targets=targets
    )


def _hashing_batch(method: Method, seed: int, n: int = 6) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    views = torch.cat([x + 0.3 * torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)], dim=1)  # [B, 6, H, W]
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return Batch(views, labels, (torch.arange(n) + n * seed) % CONTEXT["num_train"], targets=labels)


def _hashing_task() -> Task:
    return TASKS.get("hashing")(bits=16)


def _oriented_batch(method: Method, seed: int, n: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    # a small, a medium and a large elongated box per image at random angles, so every FPN level gets positives
    # (and Rotated-LD's imitation region, whose anchors are 4 strides wide, reaches the coarsest level too)
    long = torch.tensor([12.0, 24.0, 52.0])[None, :] + torch.rand(n, 3, generator=g) * 4
    short = long / (2.0 + 0.5 * torch.rand(n, 3, generator=g))
    centre = 24 + torch.rand(n, 3, 2, generator=g) * 16
    theta = (torch.rand(n, 3, generator=g) - 0.5) * torch.pi
    rboxes = torch.cat((centre, long[..., None], short[..., None], theta[..., None]), dim=-1)
    rboxes = torch.cat((rboxes, torch.zeros(n, 1, 5)), dim=1)
    labels = torch.randint(0, NUM_CLASSES, (n, 4), generator=g)
    labels[:, -1] = -1  # a padding row
    targets = {"rboxes": rboxes, "labels": labels, "image_id": torch.arange(n) + n * seed}
    x = torch.randn(n, 3, 64, 64, generator=g)
    return Batch(
        x, torch.zeros(n, dtype=torch.int64), (torch.arange(n) + n * seed) % CONTEXT["num_train"], targets=targets
    )


def _oriented_task() -> Task:
    return TASKS.get("oriented_detection")(num_classes=NUM_CLASSES, reg_max=8, angle_bins=8)


def _detection_task() -> Task:
    return TASKS.get("detection")(num_classes=NUM_CLASSES)


def _segmentation_task() -> Task:
    return TASKS.get("segmentation")(num_classes=NUM_CLASSES)


TASK_CASES: dict[str, TaskCase] = {
    "classification": TaskCase(
        task=lambda: TASKS.get("classification")(num_classes=NUM_CLASSES),
        student=_seeded(lambda: TinyNet(NUM_CLASSES)),
        teacher=_seeded(lambda: TinyNet(NUM_CLASSES)),
        batch=_classification_batch,
    ),
    "segmentation": TaskCase(
        task=_segmentation_task,
        student=_seeded(lambda: _segmentation_task().build_model("fcn_resnet8")),
        teacher=_seeded(lambda: _segmentation_task().build_model("pspnet_resnet20")),
        batch=_segmentation_batch,
    ),
    "enhancement": TaskCase(
        task=lambda: TASKS.get("enhancement")(),
        student=_seeded(lambda: UNetEnhancer(width=4)),
        teacher=_seeded(lambda: UNetEnhancer(width=6)),
        batch=_enhancement_batch,
    ),
    "detection": TaskCase(
        task=_detection_task,
        student=_seeded(lambda: _detection_task().build_model("gfl_resnet8")),
        teacher=_seeded(lambda: _detection_task().build_model("gfl_resnet20")),
        batch=_detection_batch,
    ),
    "hashing": TaskCase(
        task=_hashing_task,
        student=_seeded(lambda: _hashing_task().build_model("hash_resnet8")),
        teacher=_seeded(lambda: _hashing_task().build_model("hash_resnet14", hidden=32)),
        batch=_hashing_batch,
    ),
    "oriented_detection": TaskCase(
        task=_oriented_task,
        student=_seeded(lambda: _oriented_task().build_model("ogfl_resnet8")),
        teacher=_seeded(lambda: _oriented_task().build_model("ogfl_resnet20")),
        batch=_oriented_batch,
    ),
}


def method_task_pairs() -> list[tuple[str, str]]:
    """``(method, task)`` for every method and every task it declares (``"*"``: every registered task)."""
    pairs = []
    for name in METHODS.names():
        tasks = METHODS.get(name).tasks
        pairs += [(name, t) for t in (TASKS.names() if "*" in tasks else tasks)]
    return pairs


def pair_id(pair: tuple[str, str]) -> str:
    return pair[0] if pair[1] == "classification" else f"{pair[0]}-{pair[1]}"


def make_method(name: str, task_name: str = "classification", **params) -> Method:
    """Method ``name`` on a tiny student (seed 0) and teacher (seed 1) of ``task_name``."""
    case = TASK_CASES[task_name]
    cls = METHODS.get(name)
    if cls.student_models:  # e.g. DATS trains only its attention-sampled networks
        torch.manual_seed(0)
        student = create_model(cls.student_models[0], num_classes=NUM_CLASSES)
    else:
        student = case.student(0)
    teacher = case.teacher(1) if cls.needs_teacher else None
    return create_method(name, student, teacher, context=CONTEXT, task=case.task(), **params)


def make_batch(method: Method, task_name: str = "classification", seed: int = 3) -> Batch:
    return TASK_CASES[task_name].batch(method, seed)
