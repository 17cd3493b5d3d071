"""The Python API; the CLI is a thin shell over these functions.

import kdforge
teacher = kdforge.create_model("resnet32x4", num_classes=100, pretrained="runs/teacher/model.pt")
student = kdforge.create_model("resnet8x4", num_classes=100)
method = kdforge.create_method("kd", student, teacher, temperature=4.0)
data = kdforge.build_data("cifar100", root="data/", download=True)
result = kdforge.fit(method, data, train={"epochs": 240}, optim={"lr": 0.05}, out_dir="runs/kd")
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kdforge.config import DataConfig, RunConfig, TaskConfig, config_from_dict, deep_merge, load_config, load_yaml
from kdforge.data import DataBundle, build_data
from kdforge.engine import distributed
from kdforge.engine import loop as engine
from kdforge.engine.checkpoint import CHECKPOINT_FORMAT, atomic_write_json, load_checkpoint
from kdforge.engine.env import autocast, resolve_device, resolve_precision, seed_everything
from kdforge.engine.evaluation import collect_logits, evaluate
from kdforge.engine.loop import FitResult
from kdforge.errors import CheckpointError, ConfigError
from kdforge.methods import Method, create_method, instantiate_method
from kdforge.methods.params import method_defaults
from kdforge.models import count_parameters, create_model, load_weights
from kdforge.models.attention_sampled import AttentionSampledNet
from kdforge.registry import METHODS, TASKS
from kdforge.report.attention_pictures import attention_rows, plot_attention
from kdforge.report.classification import ClassificationReport, classification_report, write_classification_report
from kdforge.report.detection_pictures import detection_pictures
from kdforge.report.enhancement_pictures import enhancement_pictures
from kdforge.report.masks import MaskGrid, write_mask_grid
from kdforge.tasks.base import Task
from kdforge.tasks.detection import DetectionTask
from kdforge.tasks.enhancement import EnhancementTask
from kdforge.tasks.segmentation import SegmentationTask
from kdforge.validation import validate

WEIGHT_FILES = ("model.pt", "student.pt")


def resolve_weights(source: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """A state dict from a weight file, a kdforge training checkpoint or a run directory.

    A run directory gives its ``model.pt`` (``kdforge train``) or ``student.pt`` (``kdforge distill``); a training
    checkpoint (``last.pt``/``best.pt``) gives the student's weights from its method state.
    """
    path = Path(source)
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise CheckpointError(f"{path} holds none of {', '.join(WEIGHT_FILES)}; pass a weight file instead")
        path = found[0]
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        prefix = "student."
        obj = {k.removeprefix(prefix): v for k, v in obj["method"].items() if k.startswith(prefix)}
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj, path


def build_task(cfg: RunConfig, num_classes: int | None) -> Task:
    """The config's task (``task.name`` and its parameters, validated), told the dataset's class count when its
    constructor takes one."""
    cls = TASKS.get(cfg.task.name)
    params = dict(cfg.task.params)
    if num_classes is not None and "num_classes" in inspect.signature(cls.__init__).parameters:
        params.setdefault("num_classes", num_classes)
    try:
        return cls(**params)
    except ValueError as err:
        raise ConfigError(f"task '{cfg.task.name}': {err}") from None


def build_network(
    name: str,
    num_classes: int,
    checkpoint: str | Path | None = None,
    task: Task | None = None,
    pretrained: str | Path | None = None,
) -> nn.Module:
    """A network of ``task`` (default: a classification registry model) with ``num_classes`` outputs, with weights
    loaded from ``checkpoint`` when given; ``pretrained`` gives a task with ``takes_pretrained_backbone`` the weights of
    its backbone as a zoo classifier (a weight file or a run directory)."""
    if pretrained is not None:
        if task is None or not task.takes_pretrained_backbone:
            raise ConfigError("model.pretrained needs a task that puts its head on a zoo backbone (hashing)")
        state, path = resolve_weights(pretrained)
        try:
            model = task.build_model(name, num_classes=num_classes, pretrained=state)
        except CheckpointError as err:
            raise CheckpointError(f"model.pretrained {path}: {err}") from None
    else:
        model = (
            create_model(name, num_classes=num_classes)
            if task is None
            else task.build_model(name, num_classes=num_classes)
        )
    if checkpoint is not None:
        state, path = resolve_weights(checkpoint)
        try:
            load_weights(model, state)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
    return model


def data_from_config(d: DataConfig, device: torch.device, *, seed: int = 0, channels_last: bool = False) -> DataBundle:
    """``build_data`` with the keys of a ``DataConfig`` (channels_last applies on CUDA only), sharded for this process
    when torchrun started several (``data.batch_size`` is then per process)."""
    info = distributed.current()
    return build_data(
        d.name,
        root=d.root,
        download=d.download,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        image_size=d.image_size,
        augment=d.augment,
        train_subset=d.train_subset,
        test_subset=d.test_subset,
        device=device,
        seed=seed,
        rank=info.rank,
        world_size=info.world_size,
        channels_last=channels_last and device.type == "cuda",
        views=d.views,
        jda_p=d.jda_p,
        jda_ops=d.jda_ops,
        bad_images=d.bad_images,
        replay_views=d.replay_views,
    )


def fit(method: Method | nn.Module, data: Any, **kwargs: Any) -> FitResult:
    """:func:`kdforge.engine.loop.fit`, also for a plain network (trained with cross-entropy, method ``vanilla``).

    Keyword arguments are those of the engine's ``fit`` (``train``, ``optim``, ``schedule``, ``out_dir``, ...).
    """
    if not isinstance(method, Method):
        method = create_method("vanilla", method)
    return engine.fit(method, data, **kwargs)


def load_run_config(
    command: Literal["train", "distill"],
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    resume_dir: str | Path | None = None,
) -> RunConfig:
    """The config of a ``kdforge train``/``distill`` run: defaults, the YAML file, then ``key=value`` overrides.

    Resuming ``resume_dir`` without a ``config`` starts from that run's saved ``config.yaml``. Not validated yet:
    :func:`run` validates it (once).
    """
    if config is None and resume_dir is not None and (Path(resume_dir) / "config.yaml").is_file():
        return load_config(Path(resume_dir) / "config.yaml", list(overrides))
    defaults = {"method": {"name": "vanilla" if command == "train" else "kd"}}
    return load_config(config, list(overrides), defaults=defaults)


def default_run_dir(cfg: RunConfig, command: str) -> str:
    """``runs/<command>-<model>-<time>``; under torchrun rank 0's name (ranks may start in different seconds)."""
    return distributed.broadcast_object(f"runs/{command}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def build_run(
    cfg: RunConfig, command: Literal["train", "distill"] = "distill", device: torch.device | None = None
) -> tuple[Method, DataBundle]:
    """Data, networks and method for a config (model init is seeded by ``train.seed``), after validating it.

    Under torchrun this joins the process group first (:func:`kdforge.engine.distributed.init_distributed`).
    """
    validate(cfg, command)
    distributed.init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    return _build(cfg, device or resolve_device(cfg.train.device))


def _build(cfg: RunConfig, device: torch.device) -> tuple[Method, DataBundle]:
    """Data, networks and method of a validated config on ``device``, with the process group already joined."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    d = cfg.data
    data = data_from_config(d, device, seed=cfg.train.seed, channels_last=cfg.train.channels_last)
    for key, mc in (("model", cfg.model), ("teacher", cfg.teacher)):
        if mc is not None and mc.num_classes is not None and mc.num_classes != data.num_classes:
            raise ConfigError(
                f"{key}.num_classes={mc.num_classes} but dataset '{d.name}' has {data.num_classes} "
                f"classes; remove {key}.num_classes or use matching data"
            )
    task = build_task(cfg, data.num_classes)
    student = build_network(cfg.model.name, data.num_classes, cfg.model.checkpoint, task, cfg.model.pretrained)
    teacher = None
    if cfg.teacher is not None and cfg.teacher.name:
        if cfg.teacher.checkpoint is None:
            raise ConfigError(
                "teacher.checkpoint is not set: distilling from an untrained teacher is meaningless; "
                "train one with `kdforge train` and pass its run directory or weight file"
            )
        teacher = build_network(cfg.teacher.name, data.num_classes, cfg.teacher.checkpoint, task)
    context = {
        "num_classes": data.num_classes,
        "num_train": data.num_train,
        "train_targets": data.train_targets,
        "epochs": cfg.train.epochs,
        "steps_per_epoch": len(data.train),
    }
    # validate() checked and coerced the method's parameters and its need of a teacher; both networks have the
    # data's classes (checked above): nothing is checked again.
    method = instantiate_method(cfg.method.name, student, teacher, context=context, params=cfg.method.params, task=task)
    return method, data


#: ``out_dir`` for :func:`run` meaning "the default name" (:func:`default_run_dir`), as the CLI without ``--out``.
AUTO_RUN_DIR = "<auto>"


def with_method_defaults(cfg: RunConfig) -> RunConfig:
    """``cfg`` with every settable parameter of its method named, the constructor's defaults filled in where the
    config is silent: a run directory's ``config.yaml`` then still describes the run after a default changes (and
    the report shows the values that produced the numbers)."""
    cls = METHODS.get(cfg.method.name)
    params = {**method_defaults(cls), **cfg.method.params}
    return replace(cfg, method=replace(cfg.method, params=params))


def with_class_count(cfg: RunConfig, num_classes: int) -> RunConfig:
    """``cfg`` as the run directory saves it: ``model.num_classes`` (and the teacher's) filled in from the data when
    unset, so that ``kdforge export``/``profile`` of the run need not open its dataset (a COCO or DOTA folder's class
    count is in its annotation files, a folder dataset's in its sub-folders)."""
    if not num_classes:
        return cfg
    model = replace(cfg.model, num_classes=cfg.model.num_classes or num_classes)
    teacher = cfg.teacher and replace(cfg.teacher, num_classes=cfg.teacher.num_classes or num_classes)
    return replace(cfg, model=model, teacher=teacher)


def run(
    cfg: RunConfig,
    command: Literal["train", "distill"] = "distill",
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    force: bool = False,
) -> FitResult:
    """Everything ``kdforge train``/``distill`` does: validate, build, report the teacher, train, write the run dir.

    The one setup path: the config is validated once, the process group joined once (under torchrun every process
    calls this; rank 0 prints and writes), the device resolved once and handed to the engine.

    Args:
        cfg: the run config (:func:`load_run_config` or ``kdforge.config.config_from_dict``).
        command: ``train`` (no teacher) or ``distill``.
        out_dir: the run directory; :data:`AUTO_RUN_DIR` for ``runs/<command>-<model>-<time>``; ``None`` writes
            nothing.
        resume, force: continue the run in ``out_dir`` / overwrite it.
    """
    validate(cfg, command)
    info = distributed.init_distributed(cfg.train.device, cfg.train.dist_timeout_s)
    device = resolve_device(cfg.train.device)
    if out_dir == AUTO_RUN_DIR:
        out_dir = default_run_dir(cfg, command)
    method, data = _build(cfg, device)
    teacher_eval = None
    primary = method.task.evaluator().primary
    if method.teacher is not None:
        teacher_eval = evaluate(
            method.teacher.to(device), data.test, device=device, precision=cfg.train.precision, task=method.task
        )
    if teacher_eval is not None and info.is_main:
        # One line even without progress output: a wrong teacher checkpoint shows up here, before training.
        value = teacher_eval.get(primary, float("nan"))
        shown = f"top-1 {value:.2f}%" if primary == "top1" else f"{primary} {value:.4g}"
        print(
            f"teacher {cfg.teacher.name}: test {shown}  "  # type: ignore[union-attr]
            f"({count_parameters(method.teacher) / 1e6:.2f}M params)",
            flush=True,
        )
    result = engine.fit(
        method,
        data,
        train=cfg.train,
        optim=cfg.optim,
        schedule=cfg.schedule,
        out_dir=out_dir,
        config=with_method_defaults(with_class_count(cfg, data.num_classes)),
        resume=resume,
        force=force,
        device=device,
    )
    if result.out_dir is not None and info.is_main:
        summary_path = result.out_dir / "summary.json"
        summary = json.loads(summary_path.read_text())
        summary.update(
            {
                "command": command,
                "model": cfg.model.name,
                "method": cfg.method.name,
                "dataset": cfg.data.name,
                "params": count_parameters(method.student),
            }
        )
        if teacher_eval is not None:
            summary.update(
                {"teacher": cfg.teacher.name, f"teacher_{primary}": teacher_eval.get(primary)}  # type: ignore[union-attr]
            )
        atomic_write_json(summary_path, summary)
    return result


def checkpoint_config(
    checkpoint: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], Path, dict[str, Any]]:
    """The weights of a run directory, training checkpoint or weight file, and the config to rebuild its network.

    The config is the checkpoint's saved one (a training checkpoint, or the ``config.yaml`` beside a weight file)
    with ``overrides`` (a nested mapping of config keys) merged in. A bare state dict with no config must get
    ``model.name``.

    Returns:
        ``(state_dict, weight_file, config_mapping)``.
    """
    state, path = resolve_weights(Path(checkpoint))
    saved: dict[str, Any] = {}
    raw = load_checkpoint(path)
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:
        saved = raw.get("config") or {}
    elif (path.parent / "config.yaml").is_file():
        saved = load_yaml(path.parent / "config.yaml")
    merged = deep_merge(saved, overrides or {})
    if not (merged.get("model") or {}).get("name"):
        raise ConfigError(
            f"{path} does not say which architecture it holds; pass model.name=<model> (and data.name=... for the data)"
        )
    return state, path, merged


def _checkpoint_network(
    checkpoint: str | Path, overrides: dict[str, Any] | None
) -> tuple[nn.Module, Task, DataBundle, RunConfig, Path, torch.device, dict[str, Any] | None]:
    """The network of a checkpoint (weights loaded, on the device), its task, its test data without augmentation,
    the config, the weight file, the device and the saved config's ``teacher`` section (``None`` without one)."""
    state, path, merged = checkpoint_config(checkpoint, overrides)
    saved_teacher = merged.pop("teacher", None)
    merged["method"] = {"name": "vanilla"}  # the network is evaluated alone
    cfg = config_from_dict(merged)
    validate(cfg, "train")
    device = resolve_device(cfg.train.device)
    cfg.data.augment = False
    data = data_from_config(cfg.data, device)
    task = build_task(cfg, cfg.model.num_classes or data.num_classes)
    model = task.build_model(cfg.model.name, num_classes=cfg.model.num_classes or data.num_classes)
    try:
        load_weights(model, state)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return model.to(device), task, data, cfg, path, device, saved_teacher


def evaluate_checkpoint(checkpoint: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate a weight file or training checkpoint on the test split of its run's dataset.

    The architecture and data come from the checkpoint's saved config (see :func:`checkpoint_config`); ``overrides``
    change them, and must give ``model.name`` for a bare state dict with no config beside it.
    """
    model, task, data, cfg, path, device, _ = _checkpoint_network(checkpoint, overrides)
    result = evaluate(model, data.test, device=device, precision=cfg.train.precision, task=task)
    return {
        "checkpoint": str(path),
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "params": count_parameters(model),
        **result,
    }


def classification_report_of(
    checkpoint: str | Path, out_dir: str | Path, overrides: dict[str, Any] | None = None
) -> tuple[ClassificationReport, list[Path]]:
    """Per-class precision/recall/F1, confusion matrix (text and PNG), top-k and, for two classes, the ROC curve and
    threshold table of a classification checkpoint on its dataset's test split, written to ``out_dir``."""
    model, task, data, cfg, path, device, _ = _checkpoint_network(checkpoint, overrides)
    if task.name != "classification":
        raise ConfigError(f"--report is a classification report; {path} is a {task.name} run")
    logits, targets = collect_logits(model, data.test, device=device, precision=cfg.train.precision)
    report = classification_report(logits, targets, data.classes)
    return report, write_classification_report(report, out_dir)


def _teacher_network(
    teacher: str | Path | None, saved: dict[str, Any] | None, task: Task, num_classes: int, device: torch.device
) -> tuple[nn.Module, str] | None:
    """The teacher to draw beside a student: ``teacher`` (a run directory or weight file; ``"none"`` for no
    teacher), else the one the run distilled from (its config's ``teacher`` section), else ``None``."""
    if teacher is not None and str(teacher).lower() == "none":
        return None
    name = (saved or {}).get("name")
    if teacher is None:
        teacher = (saved or {}).get("checkpoint")
        if teacher is None:
            return None
        if not Path(teacher).exists():
            raise CheckpointError(
                f"the run's teacher checkpoint {teacher} does not exist (moved?); pass --teacher RUN_DIR_OR_WEIGHTS, "
                "or --teacher none for pictures without it"
            )
    state, path = resolve_weights(teacher)
    arch: str | None = None
    config_path = path.parent / "config.yaml"
    if config_path.is_file():  # the teacher's own run says what it is
        arch = (load_yaml(config_path).get("model") or {}).get("name")
    arch = arch or name
    if not arch:
        raise ConfigError(
            f"teacher {path} has no config.yaml beside it saying its architecture; pass the teacher's run directory"
        )
    model = task.build_model(arch, num_classes=num_classes)
    try:
        load_weights(model, state)
    except CheckpointError as err:
        raise CheckpointError(f"teacher {path}: {err}") from None
    return model.to(device), arch


def _class_maps(model: nn.Module, task: Task, x: torch.Tensor, size: torch.Size, precision: str) -> torch.Tensor:
    """The predicted class map ``[B, H, W]`` of ``model`` on ``x``, at the mask size ``size`` = ``(H, W)``."""
    with torch.no_grad(), autocast(x.device, resolve_precision(precision, x.device)):
        logits = model(x)
    logits = logits.float()
    if logits.shape[-2:] != size:  # scored at the mask's size, as the evaluator and the loss do
        logits = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return task.predict(logits)


def detection_pictures_of(
    checkpoint: str | Path, count: int, *, out: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> list[Path]:
    """``count`` PNGs of a detection checkpoint's boxes (and the ground truth) on the first test images, written to
    ``out`` (default: ``pictures/`` beside the weight file)."""
    if count < 1:
        raise ConfigError(f"--pictures {count}: ask for at least 1 picture")
    model, task, data, _, path, _, _ = _checkpoint_network(checkpoint, overrides)
    if not isinstance(task, DetectionTask):
        raise ConfigError(f"{path} is a {task.name} run, not a detection run")
    out_dir = Path(out) if out is not None else path.parent / "pictures"
    return detection_pictures(model, task, data.test, data.classes, data.mean, data.std, out_dir, count)


def _picture_file(out: str | Path | None, default: Path) -> Path:
    """Where a one-file picture goes: ``default`` without ``out``; inside ``out`` under the default's name when ``out``
    is a folder (an existing one, or a path ending in a separator, made when written); else ``out`` itself."""
    if out is None:
        return default
    if Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        return Path(out) / default.name
    return Path(out)


def retrieval_pictures_of(
    checkpoint: str | Path,
    count: int,
    *,
    k: int = 10,
    out: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """A PNG of a hashing checkpoint's first ``count`` test queries, each followed by its top ``k`` database images
    (Hamming ranking; frames: green = same label), written to ``out`` (default: ``retrieval.png`` beside the weight
    file)."""
    from kdforge.report.retrieval_pictures import retrieval_pictures

    if count < 1:
        raise ConfigError(f"--pictures {count}: ask for at least 1 picture")
    model, task, data, _, path, _, _ = _checkpoint_network(checkpoint, overrides)
    if task.name != "hashing":
        raise ConfigError(f"{path} is a {task.name} run, not a hashing run")
    return retrieval_pictures(model, data.test, _picture_file(out, path.parent / "retrieval.png"), count, k)


def mask_pictures(
    checkpoint: str | Path,
    count: int,
    *,
    teacher: str | Path | None = None,
    out: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> MaskGrid:
    """A PNG of a segmentation checkpoint's predictions on the first ``count`` test images.

    Each row: the input, the teacher's prediction (``teacher``, a run directory or weight file, or by default the
    teacher the run distilled from; ``"none"`` for none), the student's prediction and the ground truth, in the fixed
    VOC palette with a legend of class names; under each prediction its pixel accuracy on that image.

    Args:
        checkpoint: the student: run directory, training checkpoint or weight file (as :func:`evaluate_checkpoint`).
        count: how many test images (the first ones of the test split, in order).
        teacher: see above.
        out: the PNG (default: ``masks.png`` beside the weight file, i.e. in the run directory).
        overrides: config changes, as for :func:`evaluate_checkpoint`.

    Returns:
        The picture's :class:`~kdforge.report.masks.MaskGrid` (path, panel boxes, legend).
    """
    if count < 1:
        raise ConfigError(f"--pictures {count}: ask for at least 1 picture")
    model, task, data, cfg, path, device, saved_teacher = _checkpoint_network(checkpoint, overrides)
    if not isinstance(task, SegmentationTask):
        raise ConfigError(f"--pictures draws segmentation masks; {path} is a {task.name} run (task.name={task.name})")
    teacher_net = _teacher_network(teacher, saved_teacher, task, task.num_classes, device)
    networks = [(f"student {cfg.model.name}", model)]
    if teacher_net is not None:
        networks.insert(0, (f"teacher {teacher_net[1]}", teacher_net[0]))
    for _, net in networks:
        net.eval()
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    images: list[Any] = []
    maps: dict[str, list[Any]] = {name: [] for name, _ in networks}
    truth: list[Any] = []
    for batch in data.test:
        batch = batch.to(device)
        take = min(count - len(images), batch.input.shape[0])
        x, masks = batch.input[:take], batch.targets[:take]
        rgb = ((x.float() * std + mean) * 255.0).round().clamp(0, 255).to(torch.uint8)
        images += list(rgb.permute(0, 2, 3, 1).cpu().numpy())
        truth += list(masks.cpu().numpy())
        for name, net in networks:
            maps[name] += list(_class_maps(net, task, x, masks.shape[-2:], cfg.train.precision).cpu().numpy())
        if len(images) >= count:
            break
    captions = {}
    for name, predicted in maps.items():
        for i, (pred, gt) in enumerate(zip(predicted, truth, strict=True)):
            valid = gt != task.ignore_index
            if valid.any():
                captions[(i, name)] = f"pixel acc {100.0 * float((pred[valid] == gt[valid]).mean()):.1f}%"
    target = _picture_file(out, path.parent / "masks.png")
    return write_mask_grid(
        images,
        {**maps, "ground truth": truth},
        data.classes,
        target,
        ignore_index=task.ignore_index,
        title=f"{cfg.data.name}: first {len(images)} test images",
        captions=captions,
    )


def _first_test_batch(data: DataBundle, count: int, device: torch.device) -> tuple[torch.Tensor, Any]:
    """The inputs and targets of the first ``count`` test images, in order, on ``device``."""
    inputs: list[torch.Tensor] = []
    targets: list[Any] = []
    seen = 0
    for batch in data.test:
        batch = batch.to(device)
        take = min(count - seen, batch.input.shape[0])
        inputs.append(batch.input[:take])
        targets.append(batch.task_targets[:take])
        seen += take
        if seen >= count:
            break
    return torch.cat(inputs), torch.cat(targets)


def enhancement_pictures_of(
    checkpoint: str | Path,
    count: int,
    *,
    teacher: str | Path | None = None,
    baseline: str | Path | None = None,
    out: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """A PNG grid of an enhancement checkpoint on the first ``count`` test images: low-light input, teacher (by
    default the one the run distilled from; ``"none"`` for none), the student trained alone (``baseline``, a run
    directory or weight file, if given), the student and ground truth, each output captioned with its PSNR to the
    ground truth. ``out`` defaults to ``enhanced.png`` beside the weight file."""
    if count < 1:
        raise ConfigError(f"--pictures {count}: ask for at least 1 picture")
    model, task, data, _, path, device, saved_teacher = _checkpoint_network(checkpoint, overrides)
    if not isinstance(task, EnhancementTask):
        raise ConfigError(f"{path} is a {task.name} run, not an enhancement run")
    teacher_net = _teacher_network(teacher, saved_teacher, task, data.num_classes, device)
    alone = _teacher_network(baseline, None, task, data.num_classes, device) if baseline is not None else None
    low, clean = _first_test_batch(data, count, device)
    target = _picture_file(out, path.parent / "enhanced.png")
    return enhancement_pictures(
        model, teacher_net[0] if teacher_net else None, low, clean, target, baseline=alone[0] if alone else None
    )


def attention_pictures_of(
    checkpoint: str | Path, count: int, *, out: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Path:
    """A PNG of an attention-sampled student (``dats_*``) on the first ``count`` test images: the input, the
    structure map and the structure-preserving image it classifies, a detail map and the detail-preserving image its
    teacher learns from. The detail channel is drawn with a fixed seed (0), so the picture is reproducible. ``out``
    defaults to ``attention.png`` beside the weight file."""
    if count < 1:
        raise ConfigError(f"--pictures {count}: ask for at least 1 picture")
    model, _, data, cfg, path, device, _ = _checkpoint_network(checkpoint, overrides)
    if not isinstance(model, AttentionSampledNet):
        raise ConfigError(
            f"--pictures on a classification run draws the attention of an attention-sampled student (dats_*); "
            f"{path} is a {cfg.model.name}: use --report DIR for its per-class report"
        )
    images, labels = _first_test_batch(data, count, device)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = attention_rows(model, images, generator)
    titles = [f"{data.classes[int(y)]}" if data.classes else str(int(y)) for y in labels.tolist()]
    target = _picture_file(out, path.parent / "attention.png")
    return plot_attention(rows, data.mean, data.std, target, titles=titles)


def pictures_of(
    checkpoint: str | Path,
    count: int,
    *,
    teacher: str | Path | None = None,
    baseline: str | Path | None = None,
    out: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[list[Path], str]:
    """``kdforge eval --pictures``: the pictures of a checkpoint's task on its first ``count`` test images.

    Segmentation: a mask grid (input, teacher, student, ground truth); detection (axis-aligned or oriented): one PNG
    of boxes per image;
    enhancement: an image grid with PSNR captions; classification: the attention maps and resampled images of an
    attention-sampled (DATS) student; hashing: each query with its top 10 database images. ``baseline`` (enhancement
    only): the student trained alone, drawn beside the distilled one. Returns the files written and a one-line
    description of them.
    """
    _, _, merged = checkpoint_config(checkpoint, overrides)
    task_name = (merged.get("task") or {}).get("name", TaskConfig().name)
    if baseline is not None and task_name != "enhancement":
        raise ConfigError(f"--baseline is drawn in enhancement pictures only; this is a {task_name} run")
    if task_name in ("detection", "oriented_detection"):
        if teacher is not None:
            raise ConfigError("--teacher is not drawn in detection pictures (one PNG per image of the student's boxes)")
        paths = detection_pictures_of(checkpoint, count, out=out, overrides=overrides)
        return paths, f"{len(paths)} PNGs in {paths[0].parent if paths else out}"
    if task_name == "enhancement":
        grid = enhancement_pictures_of(
            checkpoint, count, teacher=teacher, baseline=baseline, out=out, overrides=overrides
        )
        return [grid], f"{grid} (low-light input, teacher, student(s), ground truth; PSNR under each output)"
    if task_name == "classification":
        if teacher is not None:
            raise ConfigError("--teacher is not drawn in attention pictures (the student's own attention is)")
        grid = attention_pictures_of(checkpoint, count, out=out, overrides=overrides)
        return [grid], f"{grid} (input, structure map and image, detail map and image)"
    if task_name == "segmentation":
        masks = mask_pictures(checkpoint, count, teacher=teacher, out=out, overrides=overrides)
        return [masks.path], f"{masks.path} ({', '.join(masks.columns)})"
    if task_name == "hashing":
        if teacher is not None:
            raise ConfigError("--teacher is not drawn in retrieval pictures (the student's own ranking is)")
        png = retrieval_pictures_of(checkpoint, count, out=out, overrides=overrides)
        queries = "1 query" if count == 1 else f"{count} queries"
        return [png], f"{png} ({queries}, each with its top 10 database images; green frame = same label)"
    raise ConfigError(f"--pictures has no picture for {task_name} runs yet; drop --pictures")


__all__ = [
    "AUTO_RUN_DIR",
    "FitResult",
    "attention_pictures_of",
    "build_data",
    "build_network",
    "build_run",
    "build_task",
    "classification_report_of",
    "create_method",
    "create_model",
    "default_run_dir",
    "detection_pictures_of",
    "enhancement_pictures_of",
    "evaluate",
    "evaluate_checkpoint",
    "fit",
    "load_run_config",
    "mask_pictures",
    "pictures_of",
    "resolve_weights",
    "retrieval_pictures_of",
    "run",
    "validate",
]
