"""``kdforge`` command line: a thin shell over :mod:`kdforge.api`.

Every user error (bad config, missing data, unreadable checkpoint) ends as one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdforge.errors import KDForgeError
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
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. model.name=resnet8 data.name=cifar10")
    p = sub.add_parser("methods", help="list the distillation methods")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("models", help="list the model zoo with parameter counts")
    p.add_argument("--family", choices=["cifar", "imagenet"])
    p.add_argument("--num-classes", type=int, default=None, help="head size for the counts (default: 100/1000)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("datasets", help="list the datasets")
    p = sub.add_parser("demo", help="teacher, student alone and KD on the embedded CIFAR-10 subset")
    p.add_argument("--out", default="runs/demo", metavar="DIR")
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--student-epochs", type=int, default=None)
    p.add_argument("--train-subset", type=int, default=None, help="use only this many training images")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    return parser


def _run_command(args: argparse.Namespace) -> int:
    from kdforge.api import run
    from kdforge.config import dump_yaml, load_config, validate

    defaults = {"method": {"name": "vanilla" if args.command == "train" else "kd"}}
    if args.resume and args.out and (Path(args.out) / "config.yaml").is_file() and not args.config:
        cfg = load_config(Path(args.out) / "config.yaml", args.overrides)
    else:
        cfg = load_config(args.config, args.overrides, defaults=defaults)
    validate(cfg, args.command)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    out = args.out or f"runs/{args.command}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run(cfg, args.command, out, resume=args.resume, force=args.force)
    print(f"run directory: {result.out_dir}")
    return 0


def _eval_command(args: argparse.Namespace) -> int:
    from kdforge.api import evaluate_checkpoint
    from kdforge.config import apply_overrides

    result = evaluate_checkpoint(args.checkpoint, apply_overrides({}, args.overrides))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table([result], ["checkpoint", "model", "dataset", "params", "top1", "top5", "loss", "count"]))
    return 0


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


def _demo_command(args: argparse.Namespace) -> int:
    from kdforge.demo import run_demo

    run_demo(
        args.out,
        teacher_epochs=args.teacher_epochs,
        student_epochs=args.student_epochs,
        train_subset=args.train_subset,
        verbose=not args.quiet,
    )
    return 0


COMMANDS = {
    "train": _run_command,
    "distill": _run_command,
    "eval": _eval_command,
    "methods": _methods_command,
    "models": _models_command,
    "datasets": _datasets_command,
    "demo": _demo_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (KDForgeError, UnknownNameError) as err:
        print(f"kdforge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
