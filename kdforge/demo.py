"""``kdforge demo``: teacher, student alone, student with KD and with ATF on the embedded CIFAR-10 subset.

The schedule is short (a few epochs on 10,000 images) so that the whole demo finishes in about three minutes on two
CPU cores; the numbers it prints are therefore far below converged CIFAR-10 accuracies, but the ordering it is
meant to show (teacher > distilled students > student alone) is what distillation does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdforge.config import OptimConfig, ScheduleConfig, TrainConfig
from kdforge.data import build_data
from kdforge.engine.checkpoint import atomic_write_text
from kdforge.engine.env import resolve_device, seed_everything
from kdforge.engine.loop import fit
from kdforge.methods import create_method
from kdforge.models import count_parameters, create_model
from kdforge.report.plots import plot_learning_curves

TEACHER, STUDENT = "resnet20", "resnet8"
# Sized so the four runs finish in under three minutes on two CPU cores (README states the measured time).
TRAIN_SUBSET, TEACHER_EPOCHS, STUDENT_EPOCHS = 10000, 6, 3
BATCH_SIZE, LR, SEED = 128, 0.1, 0


@dataclass
class DemoRow:
    run: str
    model: str
    params: int
    final_top1: float
    best_top1: float
    train_time_s: float


def run_demo(
    out: str | Path = "runs/demo",
    *,
    teacher_epochs: int | None = None,
    student_epochs: int | None = None,
    train_subset: int | None = None,
    verbose: bool = True,
) -> list[DemoRow]:
    """Train the runs into ``out/{teacher,student,kd,atf}``, print the table, write ``curves.png``/``results.md``."""
    t_start = time.perf_counter()
    out = Path(out)
    device = resolve_device("auto")
    data = build_data(
        "embedded",
        batch_size=BATCH_SIZE,
        eval_batch_size=500,
        train_subset=train_subset or TRAIN_SUBSET,
        device=device,
        seed=SEED,
        channels_last=device.type == "cuda",
    )
    optim = OptimConfig(lr=LR, nesterov=True, weight_decay=5e-4)
    schedule = ScheduleConfig(name="cosine", warmup_epochs=0.5)
    t_epochs = teacher_epochs or TEACHER_EPOCHS
    s_epochs = student_epochs or STUDENT_EPOCHS

    def train(
        run: str, method_name: str, model_name: str, epochs: int, teacher: Any = None, **params: Any
    ) -> tuple[Any, Any]:
        seed_everything(SEED)  # same init for the student alone and the KD student
        model = create_model(model_name, num_classes=data.num_classes)
        method = create_method(method_name, model, teacher, **params)
        if verbose:
            print(
                f"\n== {run}: {model_name} ({count_parameters(model) / 1e6:.2f}M params), {method_name}, "
                f"{epochs} epochs",
                flush=True,
            )
        result = fit(
            method,
            data,
            train=TrainConfig(epochs=epochs, seed=SEED, progress=verbose, log_every=10),
            optim=optim,
            schedule=schedule,
            out_dir=out / run,
            force=True,
        )
        return model, result

    teacher, t_res = train("teacher", "vanilla", TEACHER, t_epochs)
    student, s_res = train("student", "vanilla", STUDENT, s_epochs)
    student_params = count_parameters(student)
    # A short run favours a softer teacher signal: τ=4 with half the weight on the labels.
    _, kd_res = train("kd", "kd", STUDENT, s_epochs, teacher=teacher, temperature=4.0, ce_weight=0.5, kd_weight=0.5)
    _, atf_res = train("atf", "atf", STUDENT, s_epochs, teacher=teacher)

    runs = [
        ("teacher", TEACHER, count_parameters(teacher), t_res),
        ("student alone", STUDENT, student_params, s_res),
        ("student + KD", STUDENT, student_params, kd_res),
        ("student + ATF", STUDENT, student_params, atf_res),
    ]
    rows = [DemoRow(name, model, params, r.final_top1, r.best_top1, r.train_time_s) for name, model, params, r in runs]
    plot_learning_curves(
        {
            f"{name} ({model})": [(h["epoch"], h["test_top1"]) for h in r.history if "test_top1" in h]
            for name, model, _, r in runs
        },
        out / "curves.png",
        title=f"kdforge demo: embedded CIFAR-10 subset ({data.num_train:,} train images)",
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
        f"| {r.run} | {r.model} | {r.params:,} | {r.final_top1:.2f} | {r.best_top1:.2f} | {r.train_time_s:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)
