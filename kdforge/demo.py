"""``kdforge demo``: teacher, student alone, student with KD and with ATF on the embedded CIFAR-10 subset.

By default the teacher is the resnet20 shipped beside the embedded data (``data/assets/demo_teacher_resnet20.pt``),
trained by ``scripts/train_demo_teacher.py`` with exactly the schedule :func:`train_demo_teacher` runs here; its
SHA-256 is checked against the JSON record beside it, it is evaluated on the test split, and only the three students
are trained. ``--train-teacher`` trains the teacher first instead (the full path, about a third longer).

The schedule is short (a few epochs on 10,000 images) so that the demo finishes in a few minutes on two CPU cores;
the numbers it prints are therefore far below converged CIFAR-10 accuracies, but the ordering it is meant to show
(teacher > distilled students > student alone) is what distillation does.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdforge.config import OptimConfig, ScheduleConfig, TrainConfig
from kdforge.data import build_data
from kdforge.engine.checkpoint import atomic_write_text
from kdforge.engine.env import resolve_device, seed_everything
from kdforge.engine.evaluation import evaluate
from kdforge.engine.loop import FitResult, fit
from kdforge.errors import CheckpointError, ConfigError
from kdforge.methods import create_method
from kdforge.models import count_parameters, create_model
from kdforge.report.plots import plot_learning_curves

TEACHER, STUDENT = "resnet20", "resnet8"
# Sized so the runs finish in a few minutes on two CPU cores (README states the measured time).
TRAIN_SUBSET, TEACHER_EPOCHS, STUDENT_EPOCHS = 10000, 6, 3
BATCH_SIZE, EVAL_BATCH_SIZE, LR, SEED = 128, 500, 0.1, 0

ASSET_DIR = Path(__file__).resolve().parent / "data" / "assets"
TEACHER_ASSET = ASSET_DIR / "demo_teacher_resnet20.pt"
TEACHER_RECORD = ASSET_DIR / "demo_teacher_resnet20.json"
SHIPPED_NOTE = "shipped, trained by scripts/train_demo_teacher.py"


@dataclass
class DemoRow:
    """One line of the demo table; ``train_time_s`` is ``None`` for the shipped (not trained here) teacher."""

    run: str
    model: str
    params: int
    final_top1: float
    best_top1: float
    train_time_s: float | None


def build_demo_data(train_subset: int | None = None, device: torch.device | None = None) -> Any:
    """The demo's embedded CIFAR-10 loaders (the first ``train_subset`` of 10,000 training images, 2,000 test)."""
    device = device if device is not None else resolve_device("auto")
    return build_data(
        "embedded",
        batch_size=BATCH_SIZE,
        eval_batch_size=EVAL_BATCH_SIZE,
        train_subset=train_subset or TRAIN_SUBSET,
        device=device,
        seed=SEED,
        channels_last=device.type == "cuda",
    )


def _train(
    data: Any,
    out: Path | None,
    run: str,
    method_name: str,
    model_name: str,
    epochs: int,
    teacher: Any = None,
    verbose: bool = True,
    **params: Any,
) -> tuple[torch.nn.Module, FitResult]:
    seed_everything(SEED)  # same init for the student alone and the KD student
    model = create_model(model_name, num_classes=data.num_classes)
    method = create_method(method_name, model, teacher, **params)
    if verbose:
        print(
            f"\n== {run}: {model_name} ({count_parameters(model) / 1e6:.2f}M params), {method_name}, {epochs} epochs",
            flush=True,
        )
    result = fit(
        method,
        data,
        train=TrainConfig(epochs=epochs, seed=SEED, progress=verbose, log_every=10),
        optim=OptimConfig(lr=LR, nesterov=True, weight_decay=5e-4),
        schedule=ScheduleConfig(name="cosine", warmup_epochs=0.5),
        out_dir=None if out is None else out / run,
        force=True,
    )
    return model, result


def train_demo_teacher(
    data: Any, out: Path | None = None, *, epochs: int | None = None, verbose: bool = True
) -> tuple[torch.nn.Module, FitResult]:
    """Train the demo's resnet20 teacher (vanilla cross-entropy, seed 0) on ``data``; its final weights are the
    teacher. Used by ``kdforge demo --train-teacher`` and by ``scripts/train_demo_teacher.py``."""
    return _train(data, out, "teacher", "vanilla", TEACHER, epochs or TEACHER_EPOCHS, verbose=verbose)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_shipped_teacher(
    num_classes: int = 10, weights: Path = TEACHER_ASSET, record: Path = TEACHER_RECORD
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The shipped demo teacher and its record, after checking the weights' SHA-256 against the record.

    Raises:
        CheckpointError: the weights or the record are missing, or the weights' bytes differ from the recorded ones.
    """
    fix = "reinstall kdforge, or run `kdforge demo --train-teacher` (or scripts/train_demo_teacher.py) instead"
    if not weights.is_file() or not record.is_file():
        missing = weights if not weights.is_file() else record
        raise CheckpointError(f"demo teacher asset missing: {missing}; {fix}")
    try:
        meta = json.loads(record.read_text())
        expected = str(meta["sha256"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"demo teacher record {record} is not valid JSON with a 'sha256' key; {fix}") from None
    actual = sha256_file(weights)
    if actual != expected:
        raise CheckpointError(
            f"demo teacher {weights} was altered: SHA-256 {actual[:12]}… but {record.name} records {expected[:12]}…; "
            f"{fix}"
        )
    model = create_model(TEACHER, num_classes=num_classes)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model, meta


def run_demo(
    out: str | Path = "runs/demo",
    *,
    train_teacher: bool = False,
    teacher_epochs: int | None = None,
    student_epochs: int | None = None,
    train_subset: int | None = None,
    verbose: bool = True,
) -> list[DemoRow]:
    """Load (or train) the teacher, train the students into ``out/{student,kd,atf}``, print the table and the total
    time, write ``curves.png``/``results.md``."""
    if teacher_epochs is not None and not train_teacher:
        raise ConfigError("--teacher-epochs changes the teacher's training: add --train-teacher to train it here")
    t_start = time.perf_counter()
    out = Path(out)
    device = resolve_device("auto")
    data = build_demo_data(train_subset, device)
    s_epochs = student_epochs or STUDENT_EPOCHS

    if train_teacher:
        teacher, t_res = train_demo_teacher(data, out, epochs=teacher_epochs, verbose=verbose)
        t_row = DemoRow("teacher", TEACHER, count_parameters(teacher), t_res.final_top1, t_res.best_top1,
                        t_res.train_time_s)  # fmt: skip
        t_curve = [(h["epoch"], h["test_top1"]) for h in t_res.history if "test_top1" in h]
    else:
        teacher, meta = load_shipped_teacher(data.num_classes, TEACHER_ASSET, TEACHER_RECORD)  # read now: tests patch
        teacher.to(device)
        top1 = evaluate(teacher, data.test, device=device)["top1"]
        if verbose:
            print(f"\n== teacher: {TEACHER} ({SHIPPED_NOTE}), test top-1 {top1:.2f} %", flush=True)
        t_row = DemoRow(f"teacher ({SHIPPED_NOTE})", TEACHER, count_parameters(teacher), top1, top1, None)
        t_curve = [(int(e), float(a)) for e, a in meta.get("curve", [])]

    student, s_res = _train(data, out, "student", "vanilla", STUDENT, s_epochs, verbose=verbose)
    student_params = count_parameters(student)
    # A short run favours a softer teacher signal: τ=4 with half the weight on the labels.
    _, kd_res = _train(
        data, out, "kd", "kd", STUDENT, s_epochs, teacher, verbose, temperature=4.0, ce_weight=0.5, kd_weight=0.5
    )
    _, atf_res = _train(data, out, "atf", "atf", STUDENT, s_epochs, teacher, verbose)

    students = [("student alone", s_res), ("student + KD", kd_res), ("student + ATF", atf_res)]
    rows = [t_row] + [
        DemoRow(name, STUDENT, student_params, r.final_top1, r.best_top1, r.train_time_s) for name, r in students
    ]
    curves = {f"teacher ({TEACHER}{'' if train_teacher else ', shipped'})": t_curve}
    curves |= {
        f"{name} ({STUDENT})": [(h["epoch"], h["test_top1"]) for h in r.history if "test_top1" in h]
        for name, r in students
    }
    plot_learning_curves(
        curves, out / "curves.png", title=f"kdforge demo: embedded CIFAR-10 subset ({data.num_train:,} train images)"
    )
    table = _markdown_table(rows)
    total = time.perf_counter() - t_start
    atomic_write_text(out / "results.md", f"# kdforge demo\n\n{table}\n\nDevice: {device}. Total time {total:.0f} s.\n")
    print(
        f"\n{table}\n\nTotal time {total:.0f} s on {device}. Learning curves: {out / 'curves.png'}; runs in {out}/",
        flush=True,
    )
    return rows


def _markdown_table(rows: list[DemoRow]) -> str:
    lines = [
        "| run | model | params | top-1 final (%) | top-1 best (%) | train time (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.run} | {r.model} | {r.params:,} | {r.final_top1:.2f} | {r.best_top1:.2f} | "
        f"{'—' if r.train_time_s is None else f'{r.train_time_s:.1f}'} |"
        for r in rows
    ]
    return "\n".join(lines)
