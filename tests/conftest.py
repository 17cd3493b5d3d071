"""Shared test fixtures: tiny models and a synthetic loader that follows the loader protocol."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from kdforge.data.batch import Batch

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10" / "cifar10_jpeg.npz"

# Under pytest-xdist (make test runs one worker per core) each worker gets its share of the cores: more threads than
# cores would make every worker slower than one alone.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` (or ``gpu``) are skipped, with the reason, where no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
    for item in items:
        if item.get_closest_marker("cuda") or item.get_closest_marker("gpu"):
            item.add_marker(skip)


class TinyNet(nn.Module):
    """A 2-stage conv net for 8×8 inputs; ``num_classes`` outputs. ``norm=False`` drops BatchNorm, whose per-batch
    statistics would make a 2-process run differ from one process on the concatenated batch."""

    def __init__(self, num_classes: int = 4, width: int = 8, norm: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width) if norm else nn.Identity(),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.BatchNorm2d(2 * width) if norm else nn.Identity(),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class NaNNet(nn.Module):
    """A network whose logits are always NaN (non-finite-loss handling)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3))) * float("nan")


class ToyLoader:
    """Synthetic, learnable 4-class data (class = brightest quadrant) following the kdforge loader protocol."""

    def __init__(
        self, n: int = 64, batch_size: int = 16, seed: int = 0, shuffle: bool = True, num_classes: int = 4
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
        for i, y in enumerate(self.labels.tolist()):
            r, c = divmod(y % 4, 2)
            x[i, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.5
        self.images = x
        self.batch_size, self.seed, self.shuffle, self.epoch = batch_size, seed, shuffle, 0
        self.dataset_size = self.num_samples = n

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def __iter__(self):
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
            if self.shuffle
            else torch.arange(n)
        )
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield Batch(self.images[idx], self.labels[idx], idx)


class ToyData:
    def __init__(self, n_train: int = 64, n_test: int = 32, batch_size: int = 16) -> None:
        self.train = ToyLoader(n_train, batch_size, seed=1)
        self.test = ToyLoader(n_test, batch_size, seed=2, shuffle=False)
        self.num_classes = 4
        self.num_train = n_train


@pytest.fixture
def toy_data() -> ToyData:
    return ToyData()


@pytest.fixture
def tiny_net():
    def make(num_classes: int = 4, seed: int = 0) -> TinyNet:
        torch.manual_seed(seed)
        return TinyNet(num_classes)

    return make


@pytest.fixture
def method_student(tiny_net):
    """``make(method_name)``: the tiny test student, or the first registry network a method declares it needs
    (``Method.student_models``, e.g. DATS's attention-sampled ``dats_resnet8``)."""
    from kdforge.methods import METHODS
    from kdforge.models import create_model

    def make(name: str, num_classes: int = 4, seed: int = 0) -> nn.Module:
        required = METHODS.get(name).student_models
        if not required:
            return tiny_net(num_classes, seed=seed)
        torch.manual_seed(seed)
        return create_model(required[0], num_classes=num_classes)

    return make


@pytest.fixture
def nan_net():
    return NaNNet
