"""``kdforge`` command line: a thin shell over :mod:`kdforge.api`.

Every user error (bad config, missing data, unreadable checkpoint) ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdforge.errors import ConfigError, KDForgeError
from kdforge.registry import UnknownNameError


def format_table(rows: list[dict[str, Any]], columns: list[str], headers: list[str] | None = None) -> str:
    """Rows as an aligned plain-text table (numbers right-aligned)."""
    headers = headers or columns
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) and rows for c in columns]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(s.rstrip() for s in out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (overrides the defaults)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<command>-<model>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--force", action="store_true", help="overwrite a run directory that already holds a run")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=0.1")


def _add_timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=50, help="timed forward passes per latency figure")
    p.add_argument("--warmup", type=int, default=10, help="untimed passes before timing")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for timing (default: torch's setting)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdforge", description="Knowledge distillation: train, distill, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train a network from scratch (teachers, student baselines)")
    _add_run_args(p)
    p = sub.add_parser("distill", help="distill a teacher into a student")
    _add_run_args(p)
    p = sub.add_parser("eval", help="evaluate a checkpoint on its dataset's test split")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="weight file, last.pt/best.pt or run dir")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--report",
        metavar="DIR",
        help="classification: per-class precision/recall/F1, confusion matrix (printed, PNG), ROC for two classes",
    )
    p.add_argument(
        "--pictures",
        type=int,
        default=None,
        metavar="N",
        help="pictures of the first N test images: segmentation masks, detection boxes (one PNG each), enhanced "
        "images, a DATS student's attention, or hashing queries with their top 10 retrievals",
    )
    p.add_argument(
        "--teacher",
        metavar="PATH",
        help="teacher run dir or weight file drawn beside the student (default: the run's teacher; 'none')",
    )
    p.add_argument(
        "--baseline",
        metavar="PATH",
        help="enhancement pictures: the student trained alone (run dir or weight file), drawn beside the distilled one",
    )
    p.add_argument(
        "--pictures-out",
        metavar="PATH",
        help="where --pictures go: a PNG, or a folder to hold it under its usual name (default: the run dir; "
        "detection: one PNG per image in <run dir>/pictures/)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.name=resnet8 data.name=cifar10")
    p = sub.add_parser("predict", help="a trained classifier on a folder or list of images, to a CSV")
    p.add_argument("network", metavar="RUN_OR_FILE", help="run dir, student.pt, or an exported .torchscript.pt/.onnx")
    p.add_argument("inputs", nargs="+", metavar="IMAGES", help="image files, folders (recursive) or .txt lists")
    p.add_argument("--out", default="predictions.csv", metavar="CSV", help="where the CSV goes")
    p.add_argument("--topk", type=int, default=1, help="classes (and confidences) per image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--on-error", choices=["skip", "stop"], default="skip", help="unreadable images: list, or stop")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("enhance", help="a trained enhancer on a folder of dark images, enhanced images to a folder")
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="an enhancement run dir or weight file")
    p.add_argument("--input", required=True, metavar="DIR", help="folder of images")
    p.add_argument("--output", required=True, metavar="DIR", help="where <stem>.png files are written")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--on-error", choices=["skip", "stop"], default="skip", help="unreadable images: list, or stop")
    p = sub.add_parser("methods", help="list the distillation methods")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("models", help="list the model zoo with parameter counts")
    p.add_argument("--family", choices=["cifar", "imagenet"])
    p.add_argument("--num-classes", type=int, default=None, help="head size for the counts (default: 100/1000)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("datasets", help="list the datasets")
    p = sub.add_parser("export", help="export a student to TorchScript/ONNX, checked, with a cost profile")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="run dir, last.pt/best.pt or weight file")
    p.add_argument("--out", metavar="DIR", help="output directory (default: <run dir>/export)")
    p.add_argument("--format", default=None, metavar="LIST", help="torchscript,onnx (default: both; onnx if installed)")
    p.add_argument("--teacher", metavar="MODEL", help="teacher architecture to profile (default: the run's; 'none')")
    p.add_argument("--batch-size", type=int, default=1, help="second batch size for CPU latency (batch 1 always)")
    p.add_argument("--image-size", type=int, default=None, help="input side (default: the run's dataset)")
    p.add_argument("--atol", type=float, default=None, help="max |logit diff| accepted vs PyTorch (default 1e-4)")
    _add_timing_args(p)
    p.add_argument("--json", action="store_true", help="print the export summary as JSON")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.name=resnet8 for a bare weight file")
    p = sub.add_parser("profile", help="parameters, MACs, size and CPU latency of zoo models")
    p.add_argument("--model", required=True, metavar="NAME", help="the student (or only) architecture")
    p.add_argument("--teacher", metavar="NAME", help="a teacher architecture to compare with")
    p.add_argument(
        "--task", metavar="NAME", help="the models' task, e.g. segmentation (default: the task that has --model)"
    )
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="head size (default: 100 cifar / 1000 imagenet; another task: its smallest built-in dataset's)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input side (default: the model's, 32 or 224; another task: its smallest built-in dataset's, e.g. 64)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="second batch size for CPU latency (batch 1 always)")
    _add_timing_args(p)
    p.add_argument("--out", metavar="FILE", help="also write the profile as JSON to FILE")
    p.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    p = sub.add_parser("sweep", help="run a grid of methods x pairs x seeds from one YAML file (docs/EXPERIMENTS.md)")
    p.add_argument("file", metavar="SWEEP.yaml", help="the sweep file")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    p.add_argument("--gpus", metavar="IDS", help="e.g. 0,1: one run per GPU at a time, as subprocesses")
    p.add_argument(
        "--workers", type=int, metavar="N", help="CPU: N runs at once as subprocesses, the cores shared among them"
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="T",
        help="threads of each --workers run (default: the cores divided among them; lower it when the machine is busy)",
    )
    p = sub.add_parser("report", help="Markdown/CSV tables and PNG plots from run directories")
    p.add_argument("runs_dir", metavar="RUNS_DIR", help="folder searched for run directories")
    p.add_argument("--out", metavar="DIR", help="where report.md, report.csv and the PNGs go (default RUNS_DIR/report)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--markdown", metavar="FILE", help="also update section --section of this Markdown file")
    p.add_argument("--section", metavar="HEADING", help="the '## HEADING' section of --markdown to (re)write")
    p.add_argument("--runs-command", metavar="TEXT", help="the command that produced the runs, for the header")
    p.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="METHOD",
        help="also pair every method by seed against this method or row label (repeatable; the student alone always)",
    )
    p = sub.add_parser("bench", help="training throughput of kdforge's path vs a RepDistiller-style reference loop")
    p.add_argument("--method", default="kd", help="a registered method (single-view)")
    p.add_argument("--teacher", default="resnet20", metavar="MODEL")
    p.add_argument("--student", default="resnet8", metavar="MODEL")
    p.add_argument("--data", default="embedded", help="an in-memory dataset: embedded, cifar10, cifar100, cifar10_jpeg")
    p.add_argument("--root", default=None, help="data.root of that dataset")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per path (the median is reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the kdforge path's trainable forward")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW on CUDA")
    p.add_argument("--no-reference", action="store_true", help="time only the kdforge path")
    p.add_argument("--workers", type=int, default=None, help="reference DataLoader workers (default min(4, cores))")
    p.add_argument("--no-augment", action="store_true", help="no crop/flip (data.augment=false) on every path")
    p.add_argument("--replay-views", type=int, default=0, metavar="K", help="K fixed crop/flip views per image")
    p.add_argument(
        "--teacher-cache", action="store_true", help="also time kdforge with cached teacher logits (kdforge+cache)"
    )
    p.add_argument(
        "--no-fold-teacher", action="store_true", help="keep the frozen teacher's BatchNorms on the kdforge paths"
    )
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("params", nargs="*", metavar="KEY=VALUE", help="method parameters, e.g. temperature=4")
    p = sub.add_parser("demo", help="teacher, student alone, KD and ATF on the embedded CIFAR-10 subset")
    p.add_argument("--out", default="runs/demo", metavar="DIR")
    p.add_argument(
        "--train-teacher",
        action="store_true",
        help="train the resnet20 teacher here (6 epochs) instead of loading the shipped one",
    )
    p.add_argument("--teacher-epochs", type=int, default=None, help="with --train-teacher")
    p.add_argument("--student-epochs", type=int, default=None)
    p.add_argument("--train-subset", type=int, default=None, help="use only this many training images")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return parser


def _run_command(args: argparse.Namespace) -> int:
    from kdforge.api import AUTO_RUN_DIR, load_run_config, run, validate
    from kdforge.config import dump_yaml
    from kdforge.engine import distributed

    cfg = load_run_config(args.command, args.config, args.overrides, resume_dir=args.out if args.resume else None)
    if args.dry_run:
        print(dump_yaml(validate(cfg, args.command)), end="")
        return 0
    result = run(cfg, args.command, args.out or AUTO_RUN_DIR, resume=args.resume, force=args.force)
    is_main = distributed.current().is_main  # asked before shutdown: a destroyed group reads as one process
    distributed.shutdown()  # only after success: see its docstring
    if is_main:
        print(f"run directory: {result.out_dir}")
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    from kdforge.api import evaluate_checkpoint
    from kdforge.config import apply_overrides

    overrides = apply_overrides({}, args.overrides)
    if args.pictures is None and (args.teacher or args.pictures_out or args.baseline):
        raise ConfigError(
            "--teacher, --baseline and --pictures-out go with --pictures N (how many test images to draw)"
        )
    if args.pictures is not None and args.pictures < 1:
        raise ConfigError(f"--pictures {args.pictures}: ask for at least 1 picture")
    if args.report:
        from kdforge.api import classification_report_of
        from kdforge.report.classification import format_classification_report

        report, files = classification_report_of(args.checkpoint, args.report, overrides)
        print(format_classification_report(report))
        print("wrote " + ", ".join(str(f) for f in files))
        return 0
    result = evaluate_checkpoint(args.checkpoint, overrides)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        # The task's metrics in its evaluator's order; per-class entries ("IoU.cat") and a hashing run's
        # per-radius precision-recall points ("pr_recall@3") stay in --json.
        head = ["checkpoint", "model", "dataset", "params"]
        shown = [k for k in result if k not in head and "." not in k and not k.startswith("pr_")]
        print(format_table([result], head + shown))
    if args.pictures is not None:
        from kdforge.api import pictures_of

        _, described = pictures_of(
            args.checkpoint,
            args.pictures,
            teacher=args.teacher,
            baseline=args.baseline,
            out=args.pictures_out,
            overrides=overrides,
        )
        # On stderr under --json, so stdout stays one JSON document.
        print(f"pictures: {described}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _predict_command(args: argparse.Namespace) -> int:
    from kdforge.predict import list_images, load_predictor, predict, write_csv

    predictor = load_predictor(args.network, device=args.device)
    files = list_images(args.inputs)
    result = predict(
        predictor,
        files,
        topk=args.topk,
        batch_size=args.batch_size,
        on_error=args.on_error,
        progress=not args.quiet,
    )
    out = write_csv(result, args.out, min(args.topk, len(predictor.preprocess.classes)))
    for path, why in result.failed:
        print(f"skipped {path}: {why}", file=sys.stderr)
    print(
        f"{len(result.rows)} images -> {out}"
        + (f" ({len(result.failed)} unreadable, skipped)" if result.failed else "")
    )
    return 0


def _enhance_command(args: argparse.Namespace) -> int:
    from kdforge.enhance import enhance_folder

    result = enhance_folder(
        args.checkpoint, args.input, args.output, device=args.device, on_error=args.on_error, overwrite=args.overwrite
    )
    for path, why in result.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    print(f"{len(result.written)} enhanced images -> {args.output}")
    return 0 if result.written else 2


def _methods_command(args: argparse.Namespace) -> int:
    from kdforge.methods import list_methods

    rows = list_methods()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, ["name", "family", "status", "paper"]))
    return 0


def _models_command(args: argparse.Namespace) -> int:
    import torch

    from kdforge.models import count_parameters, create_model, list_models
    from kdforge.registry import MODELS

    rows = []
    for name in list_models(args.family):
        meta = MODELS.meta(name)
        classes = args.num_classes or (1000 if meta.get("family") == "imagenet" else 100)
        with torch.device("meta"):  # counts parameters without allocating or initialising them
            model = create_model(name, num_classes=classes)
        rows.append(
            {
                "name": name,
                "family": meta.get("family"),
                "input": meta.get("input_size"),
                "classes": classes,
                "params": count_parameters(model),
                "stages": len(getattr(model, "feature_info", [])),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, ["name", "family", "input", "classes", "params", "stages"]))
    return 0


def _datasets_command(args: argparse.Namespace) -> int:
    from kdforge.registry import DATASETS

    rows = [
        {"name": n, **{k: DATASETS.meta(n).get(k) for k in ("kind", "num_classes", "image_size", "description")}}
        for n in DATASETS.names()
    ]
    print(format_table(rows, ["name", "kind", "num_classes", "image_size", "description"]))
    return 0


def _export_command(args: argparse.Namespace) -> int:
    from kdforge.config import apply_overrides
    from kdforge.export import DEFAULT_ATOL, FORMATS, export_student

    result = export_student(
        args.checkpoint,
        args.out,
        formats=FORMATS if args.format is None else args.format,
        teacher=args.teacher,
        overrides=apply_overrides({}, args.overrides),
        batch_size=args.batch_size,
        image_size=args.image_size,
        atol=DEFAULT_ATOL if args.atol is None else args.atol,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
    )
    if args.json:
        summary = {"out_dir": str(result.out_dir), "checks": result.checks, "profile": result.profile}
        print(json.dumps(summary, indent=2))
        return 0
    for check in result.checks:
        if check["status"] == "ok":
            line = f"{check['format']}: {check['file']}  max |diff| vs PyTorch {check['max_abs_diff']:.2e}"
            print(line + f" (atol {check['atol']:g}; {check['note']})")
        else:
            print(f"{check['format']}: " + (f"{check['file']}  " if "file" in check else "") + f"{check['note']}")
    print()
    print(result.table)
    print(f"\nfiles in {result.out_dir}")
    return 0


def _profile_command(args: argparse.Namespace) -> int:
    from kdforge.engine.checkpoint import atomic_write_json
    from kdforge.errors import ConfigError
    from kdforge.export import check_task_model, model_task, task_input, task_network
    from kdforge.models import DEFAULT_NUM_CLASSES, create_model
    from kdforge.profile import format_profile, profile_model
    from kdforge.registry import MODELS, TASKS

    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--image-size", args.image_size),
        ("--runs", args.runs),
        ("--threads", args.threads),
        ("--num-classes", args.num_classes),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be positive, got {value}")
    names = [("teacher", args.teacher)] if args.teacher else []
    names.append(("student" if args.teacher else "", args.model))
    task = args.task or model_task(args.model)
    TASKS.get(task)  # an unknown task name fails here with the registry's "did you mean" line
    if task == "classification":
        for _, name in names:
            MODELS.get(name)  # an unknown name fails here with the registry's "did you mean" line
        meta = MODELS.meta(args.model)
        classes = args.num_classes or DEFAULT_NUM_CLASSES.get(meta.get("family", "cifar"), 100)
        size = args.image_size or meta.get("input_size") or 32
    else:
        for _, name in names:
            check_task_model(task, name)
        default_size, default_classes = task_input(task)
        classes, size = args.num_classes or default_classes, args.image_size or default_size
    rows = []
    for role, name in names:
        model = (
            create_model(name, num_classes=classes) if task == "classification" else task_network(task, name, classes)
        )
        rows.append(
            profile_model(
                model,
                name,
                size,
                role=role,
                batch_sizes=(1, args.batch_size),
                runs=args.runs,
                warmup=args.warmup,
                threads=args.threads,
            )
        )
    if args.out:
        try:
            atomic_write_json(args.out, rows)
        except OSError as err:
            raise ConfigError(f"cannot write {args.out}: {err.strerror or err}") from None
    print(json.dumps(rows, indent=2) if args.json else format_profile(rows))
    return 0


def _sweep_command(args: argparse.Namespace) -> int:
    from kdforge.engine.checkpoint import atomic_write_text
    from kdforge.errors import ConfigError
    from kdforge.sweep import SWEEP_DIR, describe_plan, load_sweep, parallel_slots, plan_summary, run_sweep

    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else []
    if args.gpus is not None and not gpus:
        raise ConfigError(f"--gpus must list GPU ids like 0,1, got {args.gpus!r}")
    parallel_slots(gpus, args.workers, threads=args.threads)  # bad --workers/--threads fail before anything is written
    plan = load_sweep(args.file)
    print(plan_summary(plan))
    if args.dry_run:
        print("\n".join(describe_plan(plan)))
        return 0
    command = f"kdforge sweep {args.file}" + (f" --gpus {','.join(gpus)}" if gpus else "")
    command += f" --workers {args.workers}" if args.workers else ""
    command += f" --threads {args.threads}" if args.threads else ""
    atomic_write_text(plan.out / SWEEP_DIR / "command.txt", command + "\n")  # read back by `kdforge report`
    result = run_sweep(plan, gpus=gpus or None, workers=args.workers, threads=args.threads)
    print(f"sweep {plan.out}: {len(result.ran)} ran, {len(result.skipped)} already done, {len(result.failed)} failed")
    if result.failed:
        key, why = next(iter(result.failed.items()))
        raise KDForgeError(f"{len(result.failed)} of {len(plan.all_runs)} runs failed; first: {key}: {why}")
    return 0


def _report_command(args: argparse.Namespace) -> int:
    from kdforge.engine.checkpoint import atomic_write_text
    from kdforge.errors import ConfigError
    from kdforge.report.table import markdown_table, replace_section, write_report

    if bool(args.markdown) != bool(args.section):
        raise ConfigError("--markdown and --section go together: the file and the '## HEADING' to rewrite in it")
    out = Path(args.out) if args.out else Path(args.runs_dir) / "report"
    parts = ["kdforge report", args.runs_dir]
    parts += [f"--out {args.out}"] if args.out else []
    parts += ["--no-plots"] if args.no_plots else []
    parts += [f"--against '{name}'" for name in args.against]
    parts += [f"--markdown {args.markdown} --section '{args.section}'"] if args.markdown else []
    doc = Path(args.markdown) if args.markdown else None
    report = write_report(
        args.runs_dir,
        out,
        command=" ".join(parts),
        runs_command=args.runs_command,
        plots=not args.no_plots,
        link_base=doc.parent if doc else None,
        against=args.against,
    )
    for group in report.groups:
        print(f"{group.dataset}: {group.teacher} -> {group.student}\n{markdown_table(group)}\n")
    if doc is not None:
        text = doc.read_text() if doc.is_file() else "# Results\n"
        atomic_write_text(doc, replace_section(text, args.section, report.block))
        print(f"updated section '{args.section}' of {doc}")
    print(f"wrote {report.markdown}, {report.csv}" + (f" and {len(report.plots)} plots" if report.plots else ""))
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from kdforge.demo import run_demo

    run_demo(
        args.out,
        train_teacher=args.train_teacher,
        teacher_epochs=args.teacher_epochs,
        student_epochs=args.student_epochs,
        train_subset=args.train_subset,
        verbose=not args.quiet,
    )
    return 0


def _bench_command(args: argparse.Namespace) -> int:
    from kdforge.bench import format_bench, run_bench, write_bench
    from kdforge.config import apply_overrides

    report = run_bench(
        args.method,
        args.teacher,
        args.student,
        data=args.data,
        root=args.root,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        rounds=args.rounds,
        device=args.device,
        precision=args.precision,
        channels_last=False if args.no_channels_last else None,
        compile_model=args.compile,
        reference=not args.no_reference,
        workers=args.workers,
        params=apply_overrides({}, args.params),
        augment=not args.no_augment,
        replay_views=args.replay_views,
        teacher_cache=args.teacher_cache,
        fold_teacher=not args.no_fold_teacher,
    )
    print(format_bench(report))
    if args.json:
        write_bench(report, args.json)
    return 0


COMMANDS = {
    "train": _run_command,
    "distill": _run_command,
    "eval": _eval_command,
    "predict": _predict_command,
    "enhance": _enhance_command,
    "methods": _methods_command,
    "models": _models_command,
    "datasets": _datasets_command,
    "export": _export_command,
    "profile": _profile_command,
    "sweep": _sweep_command,
    "report": _report_command,
    "bench": _bench_command,
    "demo": _demo_command,
}


def _rank_tag() -> str:
    """`` (rank R/W)`` under torchrun, where every process reports its own errors; empty otherwise."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')}/{world})" if world not in ("", "1") else ""


def entry_point() -> None:
    """The ``kdforge`` command and ``python -m kdforge``: :func:`main`, then the process exit.

    A torchrun worker leaves without the interpreter's teardown (see
    :func:`kdforge.engine.distributed.exit_process`); everything else exits normally.
    """
    try:
        code = main()
    except BrokenPipeError:
        # `kdforge methods | head`: the reader left; no traceback, and none again when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        from kdforge.engine.distributed import exit_process

        exit_process(code)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (KDForgeError, UnknownNameError) as err:
        print(f"kdforge: error{_rank_tag()}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    entry_point()
