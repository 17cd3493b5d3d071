"""``enhance_folder``: a trained low-light enhancer on a folder of the user's images, written as PNG files.

The network is a run directory of the ``enhancement`` task (``kdforge train``/``distill``), a weight file inside
one (its ``config.yaml`` beside it) or a training checkpoint: the architecture and the task come from the saved
config. Each image is decoded to RGB, fed whole at its own size as raw [0, 1] values (the task's input convention:
no normalisation), and its prediction (``EnhancementTask.predict``: clamped to [0, 1]) is rounded to 8 bits and
written losslessly as ``<out_dir>/<stem>.png``. Images that cannot be decoded are skipped and listed
(``on_error="skip"``) or stop the run with one :class:`~kdforge.errors.DataError` (``"stop"``). Each output file is
written to a temporary name and renamed, so an interrupted run never leaves a truncated PNG.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from kdforge.api import build_task, checkpoint_config
from kdforge.config import config_from_dict
from kdforge.data.lowlight import IMAGE_EXTENSIONS, read_rgb
from kdforge.engine.env import resolve_device
from kdforge.errors import CheckpointError, ConfigError, DataError
from kdforge.models import load_weights


@dataclass
class EnhanceResult:
    """What :func:`enhance_folder` did.

    Attributes:
        written: the output files, in input-name order.
        skipped: ``(input file, reason)`` of the images that could not be read.
        model: the architecture's name.
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    model: str = ""


def load_enhancer(run_dir: str | Path, device: torch.device | str = "cpu"):
    """The enhancement task and its trained network (eval mode, on ``device``) of a run directory or weight file.

    Raises:
        ConfigError: the run is not of the ``enhancement`` task.
        CheckpointError: the weights do not fit the saved architecture.
    """
    state, path, merged = checkpoint_config(run_dir)
    task_name = (merged.get("task") or {}).get("name", "classification")
    if task_name != "enhancement":
        raise ConfigError(f"{path} holds a {task_name} network; enhance_folder needs a run of task 'enhancement'")
    merged.pop("teacher", None)
    cfg = config_from_dict(merged)
    task = build_task(cfg, None)
    model = task.build_model(cfg.model.name)
    try:
        load_weights(model, state)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    return task, model.to(device).eval(), cfg.model.name


def _inputs(in_dir: Path) -> list[Path]:
    if not in_dir.is_dir():
        raise DataError(f"{in_dir} is not a folder; pass the folder of low-light images to enhance")
    paths = sorted(p for p in in_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise DataError(f"{in_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise DataError(f"{stems[p.stem].name} and {p.name} would both be written as {p.stem}.png; rename one")
        stems[p.stem] = p
    return paths


def enhance_folder(
    run_dir: str | Path,
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    on_error: Literal["skip", "stop"] = "skip",
    overwrite: bool = False,
) -> EnhanceResult:
    """Enhance every image of ``in_dir`` (sorted by name, not recursive) into ``out_dir/<stem>.png``.

    Args:
        run_dir: a run directory of the enhancement task, a weight file with its ``config.yaml``, or a training
            checkpoint.
        in_dir: the folder of low-light images (``.png .jpg .jpeg .bmp .tif .tiff .webp``; grey and palette images
            are converted to RGB).
        out_dir: created if missing.
        device: ``cpu``, ``cuda``, ``mps`` or ``auto``.
        on_error: ``skip`` (list the undecodable image and go on) or ``stop`` (raise).
        overwrite: replace existing output files (otherwise an existing one is a :class:`DataError`, before any
            work).

    Returns:
        :class:`EnhanceResult`.
    """
    if on_error not in ("skip", "stop"):
        raise ConfigError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    paths = _inputs(in_dir)
    targets = [out_dir / f"{p.stem}.png" for p in paths]
    if not overwrite:
        existing = [t for t in targets if t.exists()]
        if existing:
            raise DataError(
                f"{existing[0]} exists ({len(existing)} outputs do); pass overwrite=True or another out_dir"
            )
    dev = resolve_device(device)
    task, model, name = load_enhancer(run_dir, dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = EnhanceResult(model=name)
    for src, dst in zip(paths, targets, strict=True):
        try:
            image = read_rgb(src)
        except DataError as err:
            if on_error == "stop":
                raise
            result.skipped.append((src, str(err)))
            continue
        with torch.no_grad():
            x = image.to(dev).float().div_(255.0).unsqueeze(0)
            y = task.predict(model(x))[0]
        pixels = y.mul(255.0).round_().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        tmp = dst.with_name(f".{dst.name}.tmp")
        Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG")
        os.replace(tmp, dst)
        result.written.append(dst)
    return result


__all__ = ["EnhanceResult", "enhance_folder", "load_enhancer"]
