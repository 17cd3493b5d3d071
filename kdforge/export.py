"""``kdforge export``: a trained student as TorchScript and ONNX, each checked against PyTorch, plus a profile.

The student is rebuilt from its run's saved config through the run's task (as ``kdforge eval`` does: a
classification network from the model zoo, a segmentation network from the task's own models), loaded with its
weights and put in eval mode. Every exported file is first written under a temporary name, loaded back and run on a
random batch; only when its outputs (logits of any shape: ``[B, K]``, ``[B, K, H, W]``) match the eager model's
within tolerance is it renamed into place, so a failed export or check never leaves a half-written or unverified
file behind. ONNX needs the ``onnx`` extra (``pip install
kdforge[onnx]``); without onnxruntime the ONNX file is validated structurally and the numeric check is reported as
skipped.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.config import config_from_dict
from kdforge.engine.checkpoint import atomic_write_json, atomic_write_text
from kdforge.errors import ConfigError, KDForgeError
from kdforge.models import create_model, load_weights
from kdforge.profile import format_profile, profile_model
from kdforge.registry import DATASETS, MODELS, TASKS, close_matches
from kdforge.tasks.base import Task

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 18
# fp32 kernels of the exporters' runtimes reorder sums; logits of a trained CIFAR net agree to ~1e-5.
DEFAULT_ATOL = 1e-4
CHECK_BATCH = 2  # not 1: a batch of one would let the exporter specialise the batch axis to a constant


@dataclass
class LoadedModel:
    """A network rebuilt from a run: the eval-mode module and what the export and the profile need to know."""

    model: nn.Module
    name: str
    num_classes: int
    image_size: int
    weights: Path
    teacher: str | None = None
    task: Task | None = None  # the run's task (builds the teacher profiled beside it); None: classification

    @property
    def task_name(self) -> str:
        return self.task.name if self.task is not None else "classification"

    def build(self, arch: str) -> nn.Module:
        """Another network of the run's task and class count (the teacher of the profile), randomly initialised."""
        if self.task is None or self.task.name == "classification":
            return create_model(arch, num_classes=self.num_classes)
        return self.task.build_model(arch, num_classes=self.num_classes)

    def check_name(self, arch: str) -> None:
        """One clear error line when ``arch`` is not a network of the run's task."""
        if self.task is None or self.task.name == "classification":
            MODELS.get(arch)  # the registry's one-line "did you mean" error
            return
        check_task_model(self.task.name, arch)


@dataclass
class ExportResult:
    """What ``export_student`` wrote and measured: file paths, per-format checks and the profile rows."""

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    profile: list[dict[str, Any]] = field(default_factory=list)
    table: str = ""


def parse_formats(text: str | Sequence[str]) -> list[str]:
    """``"torchscript,onnx"`` (or a list) as a checked, de-duplicated list of format names."""
    items = text.split(",") if isinstance(text, str) else list(text)
    formats = list(dict.fromkeys(s.strip().lower() for s in items if s.strip()))
    if not formats:
        raise ConfigError(f"--format needs at least one of {', '.join(FORMATS)}")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ConfigError(f"unknown export format '{bad[0]}'; choose from {', '.join(FORMATS)} (comma-separated)")
    return formats


def check_task_model(task: str, arch: str) -> None:
    """Raise one ``ConfigError`` line, with close matches, when ``arch`` is not a network of ``task``."""
    names = TASKS.get(task).model_names()
    if arch not in names:
        hint = close_matches(arch, names)
        raise ConfigError(
            f"unknown {task} model '{arch}'"
            + (f"; did you mean {', '.join(hint)}?" if hint else f"; choose one of {', '.join(names)}")
        )


def model_task(arch: str) -> str:
    """The task a network name belongs to: ``classification`` for the model zoo, else the task whose
    ``model_names()`` lists it (e.g. ``fcn_resnet8`` → ``segmentation``); one error line for an unknown name."""
    import kdforge.tasks  # noqa: F401  (registers every task)

    if arch in MODELS:
        return "classification"
    owners = [t for t in TASKS.names() if t != "classification" and arch in TASKS.get(t).model_names()]
    if owners:
        return owners[0]
    every = [
        n for t in TASKS.names() for n in (MODELS.names() if t == "classification" else TASKS.get(t).model_names())
    ]
    hint = close_matches(arch, every)
    raise ConfigError(
        f"unknown model '{arch}' (no task has it)"
        + (f"; did you mean {', '.join(hint)}?" if hint else "; `kdforge models` lists the zoo")
    )


def task_input(task: str) -> tuple[int, int]:
    """``(image_size, num_classes)`` a task's networks are profiled at by default: those of the task's built-in
    dataset with the smallest input (the one its zoo networks are designed for, e.g. ``cifar10_seg``: 64, 11)."""
    sets = [
        DATASETS.meta(d)
        for d in DATASETS.names()
        if DATASETS.meta(d).get("task") == task and DATASETS.meta(d).get("image_size")
    ]
    sized = [m for m in sets if m.get("num_classes")]
    if not sized:
        raise ConfigError(
            f"task '{task}' has no built-in dataset to take an input size from; pass --image-size and --num-classes"
        )
    best = min(sized, key=lambda m: m["image_size"])
    return int(best["image_size"]), int(best["num_classes"])


def task_network(task: str, arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised network ``arch`` of ``task`` with ``num_classes`` outputs (for profiling)."""
    import inspect

    check_task_model(task, arch)
    cls = TASKS.get(task)
    kwargs = {"num_classes": num_classes} if "num_classes" in inspect.signature(cls.__init__).parameters else {}
    return cls(**kwargs).build_model(arch, **kwargs)


def _num_classes(cfg_num: int | None, dataset: str, root: str | None = None) -> int:
    if cfg_num is not None:
        return cfg_num
    n = DATASETS.meta(dataset).get("num_classes") if dataset in DATASETS else None
    if not n and root is not None and dataset == "seg_folder":
        # A user's VOC/Cityscapes folder: its class count is the layout's (lists scanned, no image decoded).
        from kdforge.data.segmentation import SegmentationFolder

        n = SegmentationFolder(root, "train").num_classes
    if not n and root is not None and (Path(root) / "train").is_dir():
        # An image-folder run: its classes are the training split's sub-folders (counted, not decoded).
        n = len([p for p in (Path(root) / "train").iterdir() if p.is_dir() and not p.name.startswith(".")])
    if not n:
        raise ConfigError(f"cannot tell the class count of dataset '{dataset}'; pass model.num_classes=<N>")
    return int(n)


def _image_size(cfg_size: int | None, dataset: str, model: str) -> int:
    if cfg_size is not None:
        return cfg_size
    size = DATASETS.meta(dataset).get("image_size") if dataset in DATASETS else None
    return int(size or MODELS.meta(model).get("input_size") or 32)


def load_run_model(checkpoint: str | Path, overrides: Mapping[str, Any] | None = None) -> LoadedModel:
    """The student (or trained model) of a run directory, training checkpoint or weight file, in eval mode.

    The architecture, class count and input size come from the run's saved config (the training checkpoint's, or
    the ``config.yaml`` beside a weight file); ``overrides`` (nested config keys) change them and must give
    ``model.name`` for a bare weight file with no config beside it.
    """
    from kdforge.api import checkpoint_config

    path = Path(checkpoint)
    if not path.exists():
        raise KDForgeError(f"checkpoint {path} does not exist; pass a run directory or a weight file")
    state, path, merged = checkpoint_config(path, dict(overrides or {}))
    teacher = (merged.pop("teacher", None) or {}).get("name")  # profiled beside the student
    merged["method"] = {"name": "vanilla"}  # the method's parameters do not matter for the exported network
    cfg = config_from_dict(merged)
    name = cfg.model.name
    task: Task | None = None
    if cfg.task.name == "classification":
        MODELS.get(name)  # an unknown name raises the registry's one-line "did you mean" error
        num_classes = _num_classes(cfg.model.num_classes, cfg.data.name, cfg.data.root)
        model = create_model(name, num_classes=num_classes)
    else:
        from kdforge.api import build_task

        check_task_model(cfg.task.name, name)
        given = cfg.task.params.get("num_classes") or cfg.model.num_classes
        num_classes = _num_classes(given, cfg.data.name, cfg.data.root)
        task = build_task(cfg, num_classes)
        model = task.build_model(name, num_classes=num_classes)
    try:
        load_weights(model, state)
    except KDForgeError as err:
        raise type(err)(f"{path}: {err}") from None
    return LoadedModel(
        model=model.eval(),
        name=name,
        num_classes=num_classes,
        image_size=_image_size(cfg.data.image_size, cfg.data.name, name),
        weights=path,
        teacher=teacher,
        task=task,
    )


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target``, renamed onto it when the block succeeds and removed when it fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the shipped file private to its writer
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences the exporters' deprecation warnings and progress chatter (the result is checked instead)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _flat(outputs: Any) -> torch.Tensor:
    """One ``[B, K]`` tensor of a network's outputs, each sample's values in order: a tensor flattened per sample,
    nested tuples/lists (a detector's per-level maps; ONNX Runtime's list of outputs) flattened and concatenated, so
    an export is compared output by output whatever container its runtime returns."""
    if isinstance(outputs, torch.Tensor):
        return outputs.flatten(1) if outputs.ndim > 2 else outputs
    return torch.cat([_flat(o).flatten(1) for o in outputs], dim=1)


def _check(fmt: str, reference: Any, got: Any, atol: float, note: str = "") -> dict[str, Any]:
    reference = _flat(reference)
    got = None if got is None else _flat(got)
    if got is None:
        return {"format": fmt, "status": "skipped", "max_abs_diff": None, "atol": atol, "note": note}
    if tuple(got.shape) != tuple(reference.shape):
        raise KDForgeError(f"{fmt} export gives outputs of shape {list(got.shape)}, PyTorch {list(reference.shape)}")
    diff = (got.float() - reference.float()).abs().max().item()
    if not diff <= atol:
        raise KDForgeError(
            f"{fmt} export does not match PyTorch: max |diff| {diff:.3g} > atol {atol:g}; nothing was written "
            "(raise --atol if this is float noise)"
        )
    return {"format": fmt, "status": "ok", "max_abs_diff": diff, "atol": atol, "note": note}


def export_torchscript(model: nn.Module, example: torch.Tensor, target: Path, atol: float) -> dict[str, Any]:
    """Traces ``model`` (eval mode) and saves it to ``target`` if the reloaded file reproduces its outputs."""
    with torch.no_grad():
        reference = model(example)
        try:
            with _quiet():
                traced = torch.jit.trace(model, example, check_trace=False)
        except Exception as err:
            raise KDForgeError(f"TorchScript export failed: {_first_line(err)}") from None
        with _staged(target) as tmp:
            traced.save(str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu")
            # A different batch size than the trace's: the traced graph must not have frozen the batch axis.
            other = torch.cat([example, example[:1]])
            _check("torchscript", model(other), loaded(other), atol)
            check = _check("torchscript", reference, loaded(example), atol, "reloaded with torch.jit.load")
    return check


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(model: nn.Module, example: torch.Tensor, target: Path, atol: float) -> dict[str, Any]:
    """Exports ``model`` to ONNX (opset 18, dynamic batch axis) and checks it with onnx.checker and onnxruntime."""
    if not onnx_available():
        raise KDForgeError("ONNX export needs the onnx extra: pip install 'kdforge[onnx]'")
    import onnx

    with torch.no_grad():
        reference = model(example)
        with _staged(target) as tmp:
            _onnx_export(model, example, tmp)
            try:
                onnx.checker.check_model(str(tmp))
            except Exception as err:
                raise KDForgeError(f"the exported ONNX model is invalid: {_first_line(err)}") from None
            try:
                import onnxruntime as ort
            except ImportError:
                return _check(
                    "onnx", reference, None, atol, "onnx.checker passed; onnxruntime missing, no numeric check"
                )
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            other = torch.cat([example, example[:1]])  # the batch axis is dynamic: check another batch size too
            # every output of the graph, in order (a detector has one per head and level)
            _check("onnx", model(other), [torch.from_numpy(a) for a in session.run(None, {name: other.numpy()})], atol)
            got = [torch.from_numpy(a) for a in session.run(None, {name: example.numpy()})]
            check = _check("onnx", reference, got, atol, "onnxruntime CPU")
    return check


def _onnx_export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``torch.onnx.export`` with the dynamo exporter when onnxscript is installed, else the TorchScript one."""
    try:
        import onnxscript  # noqa: F401

        dynamo = True
    except ImportError:
        dynamo = False
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"], "opset_version": ONNX_OPSET}
    try:
        with _quiet():
            if dynamo:
                batch = torch.export.Dim("batch", min=1)
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=True,
                    dynamic_shapes=({0: batch},),
                    external_data=False,
                    **kwargs,
                )
            else:
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    dynamo=False,
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                    **kwargs,
                )
    except Exception as err:
        raise KDForgeError(
            f"ONNX export failed ({'dynamo' if dynamo else 'torchscript'} exporter): {_first_line(err)}"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def prepare_out_dir(out: str | Path) -> Path:
    """Create ``out`` and check it is writable; a one-line error otherwise."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise KDForgeError(f"cannot write to output directory {out}: {err.strerror or err}") from None
    return out


def export_student(
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    *,
    formats: str | Sequence[str] = FORMATS,
    teacher: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    batch_size: int = 1,
    image_size: int | None = None,
    atol: float = DEFAULT_ATOL,
    runs: int = 50,
    warmup: int = 10,
    threads: int | None = None,
    profile: bool = True,
) -> ExportResult:
    """Export a run's student and profile it beside its teacher.

    Args:
        checkpoint: run directory, training checkpoint (``last.pt``/``best.pt``) or weight file.
        out_dir: where the files go (default: ``export/`` in the run directory).
        formats: ``"torchscript"``, ``"onnx"`` or both; ONNX without the onnx extra is an error when asked for
            explicitly, and skipped with a note when it is only part of the default.
        teacher: teacher architecture to profile (default: the run's ``teacher.name``); ``"none"`` skips it.
            Only the architecture matters for the profile, so no teacher weights are loaded.
        overrides: nested config keys, e.g. ``{"model": {"name": "resnet8"}}`` for a bare weight file.
        batch_size: the second batch size of the latency measurement (batch 1 is always measured).
        image_size: input side (default: the run's data.image_size, else the dataset's).
        atol: largest max-abs-difference of logits accepted between the export and PyTorch.
        runs, warmup, threads: latency measurement settings.
        profile: write the profile table; False exports only.

    Writes ``student.torchscript.pt``, ``student.onnx``, ``profile.json``, ``profile.md`` and ``export.json``
    (checks and profile), each atomically.
    """
    explicit = not (isinstance(formats, tuple) and formats == FORMATS)
    fmts = parse_formats(formats)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"--image-size must be positive, got {image_size}")
    if atol <= 0:
        raise ConfigError(f"--atol must be positive, got {atol}")
    if runs < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise ConfigError(
            f"--runs and --threads must be at least 1 and --warmup at least 0 (got runs={runs}, threads={threads}, "
            f"warmup={warmup})"
        )
    if "onnx" in fmts and explicit and not onnx_available():
        raise KDForgeError("ONNX export needs the onnx extra: pip install 'kdforge[onnx]'")
    loaded = load_run_model(checkpoint, overrides)
    teacher_name = loaded.teacher if teacher is None else (None if teacher.lower() == "none" else teacher)
    if teacher_name is not None:
        loaded.check_name(teacher_name)  # unknown names fail here, before anything is written
    size = image_size or loaded.image_size
    src = Path(checkpoint)
    out = prepare_out_dir(out_dir if out_dir is not None else (src if src.is_dir() else src.parent) / "export")
    result = ExportResult(out_dir=out)

    # what the task deploys: the network, or the network plus in-graph post-processing (a hasher's binary codes)
    model = loaded.model if loaded.task is None else loaded.task.export_module(loaded.model)
    example = torch.randn(CHECK_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    for fmt in fmts:
        if fmt == "torchscript":
            target = out / "student.torchscript.pt"
            check = export_torchscript(model, example, target, atol)
        elif not onnx_available():
            result.checks.append(
                {
                    "format": "onnx",
                    "status": "skipped",
                    "note": "onnx extra not installed (pip install 'kdforge[onnx]')",
                }
            )
            continue
        else:
            target = out / "student.onnx"
            check = export_onnx(model, example, target, atol)
        result.files[fmt] = target
        result.checks.append({**check, "file": str(target)})

    if profile:
        batches = (1, batch_size)
        if teacher_name is not None:
            tnet = loaded.build(teacher_name)
            row = profile_model(
                tnet, teacher_name, size, role="teacher", batch_sizes=batches, runs=runs, warmup=warmup, threads=threads
            )
            result.profile.append(row)
        result.profile.append(
            profile_model(
                model, loaded.name, size, role="student", batch_sizes=batches, runs=runs, warmup=warmup, threads=threads
            )
        )
        result.table = format_profile(result.profile)
        atomic_write_json(out / "profile.json", result.profile)
        atomic_write_text(out / "profile.md", result.table + "\n")
        result.files["profile"] = out / "profile.json"
    atomic_write_json(
        out / "export.json",
        {
            "weights": str(loaded.weights),
            "model": loaded.name,
            "num_classes": loaded.num_classes,
            **({} if loaded.task_name == "classification" else {"task": loaded.task_name}),
            "input_shape": ["batch", 3, size, size],
            "torch": torch.__version__,
            "onnx_opset": ONNX_OPSET if "onnx" in result.files else None,
            "checks": result.checks,
            "profile": result.profile,
        },
    )
    return result


__all__ = [
    "DEFAULT_ATOL",
    "FORMATS",
    "ExportResult",
    "LoadedModel",
    "check_task_model",
    "export_onnx",
    "export_student",
    "export_torchscript",
    "load_run_model",
    "model_task",
    "parse_formats",
    "prepare_out_dir",
    "task_input",
    "task_network",
]
