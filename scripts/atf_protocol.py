"""ATF's proxy protocol (issue 14): validation-only model selection, then one paired test-set comparison.

CIFAR-10 (the JPEG copy), a resnet20 teacher trained on all 50,000 training images, resnet8 students trained on a
fixed, class-balanced 20,000 of them (``balanced_subset(labels, 20000)``, the images ``data.train_subset: 20000``
selects) for 15 epochs. Two stages, both ``kdforge sweep`` files (finished runs are skipped, cut ones resumed):

1. ``configs/sweeps/atf_validation.yaml``: every setting tried, evaluated on a **validation split of 5,000 training
   images the students never train on** (class-balanced, drawn from the other 30,000). ``split`` writes it as a
   JPEG ``.npz`` whose train split is exactly the students' 20,000 images and whose test split is the validation
   images, so the sweep needs no data option beyond ``data.root``.
2. ``configs/sweeps/atf_test.yaml``: the chosen ATF settings and the baselines at their published defaults on the
   full 10,000 test images, 5 seeds, run once after the selection is fixed.

Pairing: seed ``s`` gives every method the same student initialisation (seeded right before the student is built),
the same data order and the same crops/flips (pure functions of ``(seed, epoch, index)``); tests/test_atf.py checks
it. The report is per method mean ± std of the final top-1 over seeds (the last epoch, never the best epoch, which
would select on the evaluation split) and the paired difference against KD, DKD and LS-KD: mean over the seeds both
methods finished, with a two-sided 95 % t-interval.

    python scripts/atf_protocol.py split                     # writes ../runs/atf_proxy/data/val.npz
    python scripts/atf_protocol.py run --stage validation --workers 2  # waits for the teacher, then sweeps
    python scripts/atf_protocol.py report --stage validation --markdown docs/atf_validation.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kdforge.data import balanced_subset
from kdforge.report.table import Paired

STUDENT_IMAGES = 20_000
VALIDATION_IMAGES = 5_000
VALIDATION_SEED = 1  # the students' subset uses balanced_subset's fixed seed 0; the validation draw its own
SOURCE = Path("../shared/data/cifar10/cifar10_jpeg.npz")
RUNS = Path("../runs/atf_proxy")
TEACHER = RUNS / "teacher_resnet20"
SWEEPS = {
    "validation": Path("configs/sweeps/atf_validation.yaml"),
    "confirm": Path("configs/sweeps/atf_confirm.yaml"),  # same out as the screen: its rows over seeds 0-2
    "test": Path("configs/sweeps/atf_test.yaml"),
}
BASELINES = ("kd", "dkd", "ls_kd")


# ---- the validation split ----------------------------------------------------------------------------------------


def split_indices(
    labels: np.ndarray, n_students: int = STUDENT_IMAGES, n_validation: int = VALIDATION_IMAGES
) -> tuple[np.ndarray, np.ndarray]:
    """``(students, validation)`` training-set indices: the 20,000 images ``data.train_subset: 20000`` selects, and
    5,000 class-balanced images from the other 30,000 (disjoint by construction)."""
    students = balanced_subset(labels, n_students)
    rest = np.setdiff1d(np.arange(len(labels)), students)
    validation = rest[balanced_subset(labels[rest], n_validation, seed=VALIDATION_SEED)]
    return students, validation


def _take(blob: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    parts = [blob[offsets[i] : offsets[i + 1]] for i in idx]
    new_offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    new_offsets[1:] = np.cumsum([len(p) for p in parts])
    return np.concatenate(parts), new_offsets


def write_split(
    source: Path, out: Path, n_students: int = STUDENT_IMAGES, n_validation: int = VALIDATION_IMAGES
) -> Path:
    """Write the validation ``.npz`` (train = the students' images in dataset order, test = validation images)."""
    with np.load(source) as z:
        arrays = {k: z[k] for k in z.files}
    labels = arrays["train_labels"]
    students, validation = split_indices(labels, n_students, n_validation)
    train_jpeg, train_offsets = _take(arrays["train_jpeg"], arrays["train_offsets"], students)
    val_jpeg, val_offsets = _take(arrays["train_jpeg"], arrays["train_offsets"], validation)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        train_jpeg=train_jpeg,
        train_offsets=train_offsets,
        train_labels=labels[students],
        test_jpeg=val_jpeg,
        test_offsets=val_offsets,
        test_labels=labels[validation],
        classes=arrays["classes"],
    )
    tmp.replace(out)
    (out.parent / "split.json").write_text(
        json.dumps(
            {
                "source": str(source),
                "students": len(students),
                "validation": len(validation),
                "validation_seed": VALIDATION_SEED,
                "validation_indices": validation.tolist(),
            }
        )
    )
    return out


# ---- results ---------------------------------------------------------------------------------------------------------


def collect(root: Path) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """``({label: {seed: final top-1}}, {label: {seed: tuned-teacher top-1}})`` of the finished runs under ``root``
    (``<root>/<dataset>/<group>/<label>/seed<k>/summary.json``, the sweep's layout)."""
    final: dict[str, dict[int, float]] = {}
    teacher: dict[str, dict[int, float]] = {}
    for path in sorted(root.glob("*/*/*/seed*/summary.json")):
        label, seed = path.parent.parent.name, int(path.parent.name.removeprefix("seed"))
        summary = json.loads(path.read_text())
        final.setdefault(label, {})[seed] = float(summary["final_top1"])
        # ATF's tuned teacher at the end (final_teacher_top1); a frozen teacher's own score otherwise
        end = summary.get("final_teacher_top1", summary.get("teacher_top1"))
        if end is not None:
            teacher.setdefault(label, {})[seed] = float(end)
    return final, teacher


def _mean_std(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "–"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def sweep_settings(path: Path) -> dict[str, str]:
    """``{label: "key value, ..."}``: what each row of a sweep file sets (its overrides, as written)."""
    import yaml

    methods = yaml.safe_load(path.read_text()).get("methods") or {}
    return {
        str(label): ", ".join(f"{k.removeprefix('method.')} {v}" for k, v in (entry or {}).items()) or "defaults"
        for label, entry in methods.items()
    }


def markdown(
    final: Mapping[str, Mapping[int, float]],
    teacher: Mapping[str, Mapping[int, float]],
    split: str,
    settings: Mapping[str, str] | None = None,
) -> str:
    """Per-label mean ± std of the final top-1 and the paired differences against the baselines present (on the
    validation split also against ``atf``, the provisional defaults every screen row is judged against)."""
    settings = settings or {}
    against = BASELINES if split == "test" else ("atf", *BASELINES)
    baselines = [b for b in against if b in final]
    head = ["setting", "overrides", "seeds", f"final {split} top-1 (%)", "teacher at the end (%)"]
    head += [f"Δ vs {b} [95 % CI]" for b in baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in final.items():
        seeds = sorted(runs)
        cells = [label, settings.get(label, ""), ",".join(map(str, seeds)), _mean_std([runs[s] for s in seeds])]
        t = teacher.get(label, {})
        cells.append(_mean_std([t[s] for s in sorted(t)]) if t else "")
        for b in baselines:
            p = Paired.of(runs, final[b]) if label != b else None
            cells.append(p.format() if p is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---- commands ----------------------------------------------------------------------------------------------------


def _teacher_line() -> str:
    path = TEACHER / "summary.json"
    if not path.is_file():
        return "Teacher: not finished.\n\n"
    summary = json.loads(path.read_text())
    return f"Teacher resnet20: {float(summary['final_top1']):.2f} % top-1 on the 10,000 test images (final epoch).\n\n"


def _wait_for_teacher(poll_s: float = 60.0) -> None:
    done = TEACHER / "summary.json"
    while not done.is_file():
        print(f"{time.strftime('%H:%M:%S')} waiting for the teacher ({done})", flush=True)
        time.sleep(poll_s)


def step_flops(method_name: str, params: Mapping[str, object], batch: int = 32) -> int:
    """FLOPs of one training step (forward and backward) of resnet20 → resnet8 at 32×32, counted by
    ``torch.utils.flop_counter``: the step's cost without the noise of a shared machine's timing."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kdforge.data.batch import Batch
    from kdforge.methods import Progress, create_method
    from kdforge.models import create_model

    torch.manual_seed(0)
    method = create_method(
        method_name, create_model("resnet8", num_classes=10), create_model("resnet20", num_classes=10), **params
    )
    method.train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        method(Batch(x, y, torch.arange(batch)), Progress(0, 0, 0.0, 0.0)).loss.backward()
    return counter.get_total_flops()


COST_SETTINGS: dict[str, dict[str, object]] = {
    "atf (defaults)": {},
    "atf teacher_scope=all": {"teacher_scope": "all"},
    "atf first version (teacher_scope=all anchor=kl)": {"teacher_scope": "all", "anchor": "kl"},
    "atf variant=shadow": {"variant": "shadow"},
}


def interleaved_step_times(settings: Mapping[str, tuple[str, Mapping[str, object]]], rounds: int, batch: int = 128):
    """``{label: [seconds per step, one per round]}``: one optimizer step of each setting in turn per round (order
    rotated), on the same random batch, so that every setting sees the same load of a shared machine."""
    import torch

    from kdforge.config import OptimConfig
    from kdforge.data.batch import Batch
    from kdforge.engine.optim import build_optimizer
    from kdforge.methods import Progress, create_method
    from kdforge.models import create_model

    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    b = Batch(x, y, torch.arange(batch))
    runs = {}
    for label, (name, params) in settings.items():
        teacher = create_model("resnet20", num_classes=10)
        method = create_method(name, create_model("resnet8", num_classes=10), teacher, **params)
        method.train()
        runs[label] = (method, build_optimizer(method.param_groups(), OptimConfig(lr=0.01, nesterov=True)))

    def step(label: str) -> float:
        method, opt = runs[label]
        start = time.perf_counter()
        out = method(b, Progress(0, 0, 0.0, 0.0))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        return time.perf_counter() - start

    labels = list(runs)
    for label in labels:
        step(label)  # warm-up
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            times[label].append(step(label))
    return times


def cmd_cost(args: argparse.Namespace) -> int:
    kd = step_flops("kd", {})
    print(f"FLOPs (torch.utils.flop_counter), batch 32: KD {kd / 1e9:.2f} GFLOPs per step")
    for label, params in COST_SETTINGS.items():
        print(f"  {label}: {step_flops('atf', params) / kd:.2f}x KD")
    if args.rounds:
        settings = {"kd": ("kd", {}), **{label: ("atf", params) for label, params in COST_SETTINGS.items()}}
        times = interleaved_step_times(settings, args.rounds)
        print(f"Wall time per step, batch 128, {args.rounds} interleaved rounds (median; ratio = median of per-round")
        print("ratios to the same round's KD step):")
        for label, ts in times.items():
            ratios = [t / k for t, k in zip(ts, times["kd"], strict=True)]
            print(f"  {label}: {statistics.median(ts) * 1e3:.0f} ms, {statistics.median(ratios):.2f}x KD")
    return 0


def _split(stage: str) -> str:
    """The split a stage evaluates on: the confirmation runs use the screen's validation split."""
    return "test" if stage == "test" else "validation"


def _stage_settings(stage: str) -> dict[str, str]:
    """Each row's overrides; the screen and the confirmation share one run folder, so they share one table."""
    if stage == "test":
        return sweep_settings(SWEEPS["test"])
    return sweep_settings(SWEEPS["validation"]) | sweep_settings(SWEEPS["confirm"])


def cmd_run(args: argparse.Namespace) -> int:
    from kdforge.sweep import load_sweep, plan_summary, run_sweep

    _wait_for_teacher()
    val = RUNS / "data" / "val.npz"
    if args.stage != "test" and not val.is_file():
        write_split(SOURCE, val)
    plan = load_sweep(SWEEPS[args.stage])
    print(plan_summary(plan), flush=True)
    result = run_sweep(plan, workers=args.workers, log=lambda s: print(f"{time.strftime('%H:%M:%S')} {s}", flush=True))
    final, teacher = collect(plan.out)
    print(_teacher_line() + markdown(final, teacher, _split(args.stage), _stage_settings(args.stage)))
    return 1 if result.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from kdforge.sweep import load_sweep

    root = load_sweep(SWEEPS[args.stage]).out
    final, teacher = collect(root)
    table = _teacher_line() + markdown(final, teacher, _split(args.stage), _stage_settings(args.stage))
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_split = sub.add_parser("split", help="write the validation .npz")
    p_split.add_argument("--source", type=Path, default=SOURCE)
    p_split.add_argument("--out", type=Path, default=RUNS / "data" / "val.npz")
    p_cost = sub.add_parser("cost", help="FLOPs and interleaved wall time per step of ATF's settings relative to KD")
    p_cost.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (0: FLOPs only)")
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--stage", choices=sorted(SWEEPS), default="validation")
        if name == "report":
            p.add_argument("--markdown", help="also write the table to this file")
        else:
            p.add_argument("--workers", type=int, help="runs side by side on the CPU (kdforge sweep --workers)")
    args = parser.parse_args(argv)
    if args.command == "split":
        print(write_split(args.source, args.out))
        return 0
    commands = {"run": cmd_run, "report": cmd_report, "cost": cmd_cost}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
