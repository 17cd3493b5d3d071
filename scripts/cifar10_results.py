"""The logit-family results table of docs/RESULTS.md on the CIFAR-10 JPEG set, on whatever budget fits.

Trains one teacher, then the student alone and with each method for several seeds, and writes the Markdown table
(best and final top-1, mean ± std over seeds, gain over the student alone) with the command, device and date.
A thin wrapper over ``kdforge.sweep`` (one run directory each, finished runs skipped, interrupted ones resumed) and
``kdforge.report`` (the table, CSV and plots; only the generated part of the section in --doc is replaced, so
hand-written notes below it stay). ``configs/sweeps/cifar10_resnet20_resnet8.yaml`` is the same grid as a sweep file.

    python scripts/cifar10_results.py --root ../shared/data/cifar10 --train-subset 10000 --epochs 15
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Literal

from kdforge.config import RunConfig, config_from_dict
from kdforge.engine.checkpoint import atomic_write_text
from kdforge.report.table import markdown_table, replace_section, write_report
from kdforge.sweep import PlannedRun, SweepPlan, run_sweep
from kdforge.validation import validate

METHODS: dict[str, dict[str, Any]] = {
    "vanilla": {"name": "vanilla"},
    "kd": {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
    "dkd": {"name": "dkd", "ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0},
    "ls_kd": {"name": "ls_kd", "temperature": 2.0, "ce_weight": 0.1, "kd_weight": 9.0},
    "atf": {
        "name": "atf",
        "variant": "full",
        "temperature": 4.0,
        "logit_norm": "layernorm",
        "divergence": "fixed",
        "alpha": 0.5,
        "reverse_mode": "gap",
        "teacher_bn": "train",
    },
    # Feature, relation and contrastive baselines at their CIFAR-100 defaults (RepDistiller/mdistiller), except
    # CRD's negatives: 4,096 instead of 16,384, since the subsets used here hold 10,000-20,000 images.
    "fitnet": {"name": "fitnet"},
    "at": {"name": "at"},
    "rkd": {"name": "rkd"},
    "crd": {"name": "crd", "nce_k": 4096},
    "aft_kd": {"name": "aft_kd"},
}
LOGIT_METHODS = ["vanilla", "kd", "dkd", "ls_kd", "atf"]


def _config(args: argparse.Namespace, model: str, method: dict[str, Any], seed: int, epochs: int) -> RunConfig:
    method = dict(method)
    if method["name"] == "dkd":
        # DKD's 20-epoch warm-up belongs to a 240-epoch schedule; keep the same share of training.
        method["warmup_epochs"] = round(20 * epochs / 240, 3)
    cfg: dict[str, Any] = {
        "model": {"name": model},
        "method": method,
        "data": {
            "name": "cifar10_jpeg",
            "root": args.root,
            "batch_size": args.batch_size,
            "eval_batch_size": 500,
            "train_subset": args.train_subset,
            "test_subset": args.test_subset,
            "num_workers": 0,
        },
        "optim": {"name": "sgd", "lr": args.lr, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "train": {"epochs": epochs, "seed": seed, "progress": False, "eval_every": 1},
    }
    if method["name"] != "vanilla":
        cfg["teacher"] = {"name": args.teacher, "checkpoint": str(Path(args.out) / "teacher")}
    return config_from_dict(cfg)


def build_plan(args: argparse.Namespace) -> SweepPlan:
    """The script's grid with its historical layout: ``<out>/teacher`` and ``<out>/<method>/seed<k>``."""
    out = Path(args.out)
    plan = SweepPlan(out=out)
    teacher_cfg = _config(args, args.teacher, METHODS["vanilla"], 0, args.teacher_epochs)
    plan.teachers.append(PlannedRun("teacher", out / "teacher", "train", teacher_cfg, role="teacher"))
    for seed in args.seeds:
        for m in args.methods:
            command: Literal["train", "distill"] = "train" if m == "vanilla" else "distill"
            cfg = _config(args, args.student, METHODS[m], seed, args.epochs)
            plan.runs.append(PlannedRun(f"{m}/seed{seed}", out / m / f"seed{seed}", command, cfg))
    return plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="folder or path of cifar10_jpeg.npz")
    p.add_argument("--out", default="runs/results_cifar10")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--methods", nargs="+", default=LOGIT_METHODS, choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--doc", default="docs/RESULTS.md", help="Markdown file to (re)write")
    args = p.parse_args(argv)
    plan = build_plan(args)
    for run in plan.all_runs:  # every config error surfaces before the teacher trains for minutes
        validate(run.config, run.command)
    started = time.perf_counter()
    result = run_sweep(plan)
    if result.failed:
        key, why = next(iter(result.failed.items()))
        print(f"cifar10_results: {len(result.failed)} runs failed; first: {key}: {why}", file=sys.stderr)
        return 1
    print(
        f"{len(result.ran)} runs in {(time.perf_counter() - started) / 60:.0f} min, {len(result.skipped)} already done"
    )

    script = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    doc = Path(args.doc)
    section = f"CIFAR-10 (JPEG copy), {args.teacher} → {args.student}"
    report = write_report(
        plan.out,
        plan.out / "report",
        command=f"kdforge report {plan.out.as_posix()} --markdown {doc.as_posix()} --section '{section}'",
        runs_command=script,
        link_base=doc.parent,
    )
    header = "# Results\n\nEvery number here was produced by the command stated above it.\n"
    atomic_write_text(doc, replace_section(doc.read_text() if doc.is_file() else header, section, report.block))
    for group in report.groups:
        print(markdown_table(group))
    return 0


if __name__ == "__main__":
    sys.exit(main())
