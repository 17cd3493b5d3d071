"""Published top-1 numbers (%) that kdforge's configs reproduce the protocol of, transcribed from BENCHMARKS.md.

Only entries whose training recipe matches a kdforge config are listed: CIFAR-100 with the RepDistiller/mdistiller
240-epoch schedule (``configs/cifar100/<method>/<teacher>_<student>.yaml``, BENCHMARKS.md §1.1, §1.2, §1.4) and
ImageNet ResNet-34 → ResNet-18 with mdistiller's 100-epoch schedule (``configs/imagenet``, §1.3). Every number
carries its source; all are best-epoch accuracies, as those papers report them. Nothing here is estimated: a pair,
method or dataset that BENCHMARKS.md does not give a number for has no entry, and the report prints "—".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    """One published number: top-1 (%), a short tag for table cells and where it was read."""

    top1: float
    tag: str
    source: str


@dataclass(frozen=True)
class Protocol:
    """The part of a run's config that must match for a published number to be comparable."""

    dataset: str
    epochs: int
    description: str


PROTOCOLS = {
    "cifar100": Protocol("cifar100", 240, "CIFAR-100, 240 epochs (RepDistiller/mdistiller recipe)"),
    "imagenet": Protocol("imagenet", 100, "ImageNet, 100 epochs (mdistiller r34_r18 recipe)"),
}

CRD = ("CRD", "RepDistiller README (CRD paper), via BENCHMARKS.md §1")
MD = ("MD", "mdistiller README (DKD paper), via BENCHMARKS.md §1")
LS = ("LS", "logit-standardization-KD README, via BENCHMARKS.md §1")
TD = ("TD", "torchdistill imagenet-resnet18_kd.tsv (original-work column) and rrpr2020 log, via BENCHMARKS.md §1.3")
MDI = ("MD", "mdistiller README, via BENCHMARKS.md §1.3")

# Column order of the CIFAR-100 tables in BENCHMARKS.md §1.1/§1.2; "teacher" and "vanilla" are the two networks
# trained alone. The per-column sources follow the table's source notes: teacher, student, FitNet, AT, RKD and CRD
# from [CRD]; KD from [CRD] (repeated by [MD] and [LS]); DKD from [MD] unless marked; LS+KD from [LS].
_COLUMNS = ("teacher", "vanilla", "kd", "fitnet", "at", "rkd", "crd", "dkd", "ls_kd")
_COLUMN_SOURCES = (CRD, CRD, CRD, CRD, CRD, CRD, CRD, MD, LS)
_CIFAR100_ROWS: dict[tuple[str, str], tuple[float | None, ...]] = {
    # §1.1 same-architecture pairs
    ("resnet32x4", "resnet8x4"): (79.42, 72.50, 73.33, 73.50, 73.44, 71.90, 75.51, 76.32, 76.62),
    ("wrn_40_2", "wrn_16_2"): (75.61, 73.26, 74.92, 73.58, 74.08, 73.35, 75.48, 76.23, 76.11),
    ("resnet56", "resnet20"): (72.34, 69.06, 70.66, 69.21, 70.55, 69.61, 71.16, 71.97, 71.43),
    ("resnet110", "resnet32"): (74.31, 71.14, 73.08, 71.06, 72.31, 71.82, 73.48, 74.11, 74.17),
    ("vgg13", "vgg8"): (74.64, 70.36, 72.98, 71.02, 71.43, 71.48, 73.94, 74.68, 74.36),
    ("wrn_40_2", "wrn_40_1"): (75.61, 71.98, 73.54, 72.24, 72.77, 72.22, 74.14, 74.81, 74.37),
    ("resnet110", "resnet20"): (74.31, 69.06, 70.67, 68.99, 70.22, 69.25, 71.46, 71.06, 71.48),
    # §1.2 heterogeneous pairs (LS+KD not reported for the ShuffleNetV1 students)
    ("resnet32x4", "ShuffleV1"): (79.42, 70.50, 74.07, 73.59, 71.73, 72.28, 75.11, 76.45, None),
    ("resnet32x4", "ShuffleV2"): (79.42, 71.82, 74.45, 73.54, 72.73, 73.21, 75.65, 77.07, 75.56),
    ("vgg13", "MobileNetV2"): (74.64, 64.60, 67.37, 64.14, 59.40, 64.52, 69.73, 69.71, 68.61),
    ("ResNet50", "MobileNetV2"): (79.34, 64.60, 67.35, 63.16, 58.58, 64.43, 69.11, 70.35, 69.02),
    ("wrn_40_2", "ShuffleV1"): (75.61, 70.50, 74.83, 73.73, 73.32, 72.21, 76.05, 76.70, None),
}
# Cells whose source differs from their column's (BENCHMARKS.md marks them explicitly).
_SOURCE_EXCEPTIONS = {
    ("resnet110", "resnet20", "dkd"): LS,
    ("resnet32x4", "ShuffleV2", "dkd"): LS,
}
# DKD+LS, reported by [LS] for the first six §1.1 pairs.
_LS_DKD = {
    ("resnet32x4", "resnet8x4"): 77.01,
    ("wrn_40_2", "wrn_16_2"): 76.39,
    ("resnet56", "resnet20"): 72.32,
    ("resnet110", "resnet32"): 74.29,
    ("vgg13", "vgg8"): 74.81,
    ("wrn_40_2", "wrn_40_1"): 74.89,
}

# The teacher is torchvision's ResNet-34 as evaluated in torchdistill's log; the student alone is torchvision's
# ResNet-18; AT, CRD and LS+KD are the "original work" column of torchdistill's TSV.
_IMAGENET: dict[str, tuple[float, tuple[str, str]]] = {
    "teacher": (73.31, TD),
    "vanilla": (69.76, TD),
    # mdistiller's own KD setting (tau 1, CE 0.5, KD 0.5) is the one configs/imagenet/kd uses.
    "kd": (71.03, MDI),
    "at": (70.70, TD),
    "crd": (71.17, TD),
    "dkd": (71.70, MDI),
    "ls_kd": (71.42, TD),
}


def _build() -> dict[tuple[str, str, str, str], Published]:
    table: dict[tuple[str, str, str, str], Published] = {}
    for (teacher, student), values in _CIFAR100_ROWS.items():
        for column, source, value in zip(_COLUMNS, _COLUMN_SOURCES, values, strict=True):
            if value is not None:
                source = _SOURCE_EXCEPTIONS.get((teacher, student, column), source)
                table[("cifar100", teacher, student, column)] = Published(value, *source)
    for (teacher, student), value in _LS_DKD.items():
        table[("cifar100", teacher, student, "ls_dkd")] = Published(value, *LS)
    for method, (value, source) in _IMAGENET.items():
        table[("imagenet", "resnet34", "resnet18", method)] = Published(value, *source)
    return table


PUBLISHED = _build()


def lookup(dataset: str, teacher: str, student: str, method: str, epochs: int | None = None) -> Published | None:
    """The published number for a run, or ``None`` when there is none or the protocol differs.

    ``method`` is a kdforge method name, or ``"teacher"`` for the teacher's own accuracy; ``"vanilla"`` is the
    student trained alone. A run whose ``epochs`` differ from the protocol's (a short budget) is not comparable.
    """
    protocol = PROTOCOLS.get(dataset)
    if protocol is None or (epochs is not None and epochs != protocol.epochs):
        return None
    return PUBLISHED.get((dataset, teacher, student, method))
